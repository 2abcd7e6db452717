"""The rANS coder of the artifact's codes (version 4): exact round trips on skewed and edge-case data,
frequency tables that never drop a value that occurs, a size near the order-0 entropy, and refusal of
data that is not a coding of the given sizes. CPU only, small sizes, well under 10 s."""
from __future__ import annotations

import numpy as np
import pytest

import train_gpt as tg


def as_stream(codes: np.ndarray) -> np.ndarray:
    """What serialize_artifact codes: the int8 codes' bytes (two's complement) in column order."""
    return np.ascontiguousarray(codes.astype(np.int8).T).view(np.uint8).ravel()


def round_trip(tensors: list[np.ndarray]) -> bytes:
    streams = [as_stream(t) for t in tensors]
    tables = [tg.code_frequencies(t) for t in tensors]
    coded = tg.rans_encode(streams, tables)
    decoded = tg.rans_decode(coded, [s.size for s in streams], tables)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, np.concatenate(streams))
    return coded


def skewed(rng, shape, scale=3.0, bound=31) -> np.ndarray:
    """GPTQ-like codes: rounded Laplace draws clipped to the int6 range, a different spread per column."""
    spread = scale * rng.uniform(0.5, 1.5, size=shape[1])
    return np.clip(np.round(rng.laplace(0, spread, size=shape)), -bound, bound).astype(np.int8)


@pytest.fixture(params=[3, 512], ids=["3 lanes", "512 lanes"])
def lanes(request, monkeypatch):
    """The lane count is a constant of the format; a tiny one exercises many steps and partial steps."""
    monkeypatch.setattr(tg, "RANS_LANES", request.param)
    return request.param


def test_round_trip_on_skewed_data_of_awkward_sizes(lanes):
    rng = np.random.default_rng(0)
    shapes = [(37, 29), (1, 1), (1, 2), (2, 1), (64, 8), (lanes, 1), (lanes + 1, 1), (3, lanes - 1 or 1), (100, 41)]
    round_trip([skewed(rng, s, scale=rng.uniform(0.3, 6)) for s in shapes])


def test_round_trip_on_edge_cases(lanes):
    rng = np.random.default_rng(1)
    every_int6 = np.arange(-31, 32, dtype=np.int8).repeat(3).reshape(27, 7)
    every_int8 = rng.permutation(np.arange(-128, 128).repeat(2)).astype(np.int8).reshape(16, 32)
    tensors = [
        np.full((5, 9), 7, np.int8),  # one value only: its frequency is the whole total, nothing is written
        np.full((1, 1), -128, np.int8),
        every_int6,
        every_int8,
        np.clip(np.round(rng.normal(0, 30, (40, 25))), -127, 127).astype(np.int8),  # int8 embedding-like
        np.where(rng.random((30, 30)) < 0.999, 0, rng.integers(-127, 128, (30, 30))).astype(np.int8),  # rare outliers
        skewed(rng, (9, 11)),
    ]
    round_trip(tensors)
    round_trip([tensors[0]])
    round_trip([tensors[3], tensors[1]])


def test_frequency_table_keeps_every_value_that_occurs():
    rng = np.random.default_rng(2)
    total = 1 << tg.RANS_PRECISION
    # one dominant value and every other int8 value once: all must keep a frequency >= 1
    extreme = np.concatenate([np.zeros(10**6, np.int8), np.arange(-128, 128, dtype=np.int8)])
    for codes in (extreme, skewed(rng, (200, 50)), np.array([5], np.int8), np.array([-3, 4, 4], np.int8)):
        table = tg.code_frequencies(codes)
        lo, freq = table[0], np.array(table[1:])
        assert lo == codes.min() and lo + len(freq) - 1 == codes.max()
        assert freq.sum() == total
        occurs = np.isin(np.arange(lo, lo + len(freq)), codes)
        assert (freq[occurs] >= 1).all() and (freq[~occurs] == 0).all()
    assert tg.code_frequencies(np.array([-3, 4, 4], np.int8))[1:] == [21846] + [0] * 6 + [43690]


def test_size_is_near_the_order0_entropy():
    rng = np.random.default_rng(3)
    tensors = [skewed(rng, (256, 256), scale=s) for s in (1.0, 3.0, 8.0)]
    entropy = 0.0
    for t in tensors:
        _, counts = np.unique(t, return_counts=True)
        entropy += -(counts * np.log2(counts / counts.sum())).sum() / 8
    coded = round_trip(tensors)
    states = 5 * tg.RANS_LANES
    assert len(coded) - states < 1.002 * entropy + 64, (len(coded), states, entropy)


def test_data_that_is_not_a_coding_is_refused():
    rng = np.random.default_rng(4)
    tensors = [skewed(rng, (60, 50)), skewed(rng, (7, 3))]
    streams, tables = [as_stream(t) for t in tensors], [tg.code_frequencies(t) for t in tensors]
    sizes = [s.size for s in streams]
    coded = tg.rans_encode(streams, tables)
    for bad in (coded[:-2], coded + b"\0\0", coded[:100],
                coded[:5 * tg.RANS_LANES + 7] + bytes([coded[5 * tg.RANS_LANES + 7] ^ 0x20]) + coded[5 * tg.RANS_LANES + 8:]):
        with pytest.raises((ValueError, IndexError)):
            tg.rans_decode(bad, sizes, tables)
    with pytest.raises(ValueError, match="sum"):
        tg.rans_decode(coded, sizes, [tables[0], [tables[1][0], *tables[1][1:-1], tables[1][-1] + 1]])
    with pytest.raises((ValueError, IndexError)):
        tg.rans_decode(coded, [sizes[0], sizes[1] + 1], tables)
