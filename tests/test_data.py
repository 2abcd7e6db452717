"""Shards (format, header checks), the random training windows and the per-rank loader."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

SEQ = 64


# ---------------------------------------------------------------------------------------- shards


def test_write_read_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 8191, 2, 3, 40000] * 100, dtype=np.uint16)
    path = tmp_path / "sub" / "fineweb_train_000000.bin"
    tg.write_shard(path, tokens)
    assert path.stat().st_size == 1024 + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, tokens.size] and not header[3:].any()
    assert tg.read_shard_header(path) == tokens.size
    back = tg.read_shard(path)
    assert back.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(back, tokens)
    # int64 input and an empty shard
    tg.write_shard(path, tokens.astype(np.int64))
    np.testing.assert_array_equal(tg.read_shard(path), tokens)
    tg.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert tg.read_shard(path).size == 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_write_shard_refuses_ids_outside_uint16(tmp_path):
    with pytest.raises(tg.DataError):
        tg.write_shard(tmp_path / "a.bin", np.array([1, 70000]))
    with pytest.raises(tg.DataError):
        tg.write_shard(tmp_path / "a.bin", np.array([-1, 2]))
    assert not (tmp_path / "a.bin").exists()


def _good(tmp_path, n=100) -> Path:
    path = tmp_path / "fineweb_train_000007.bin"
    tg.write_shard(path, np.arange(n, dtype=np.uint16))
    return path


def _patch_int(path: Path, index: int, value: int):
    data = bytearray(path.read_bytes())
    data[4 * index:4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["bad_magic", "bad_version", "truncated_body", "longer_body", "short_header",
                                  "empty_file", "negative_count"])
def test_bad_shard_header_is_a_data_error_naming_file_and_fix(tmp_path, case):
    path = _good(tmp_path)
    if case == "bad_magic":
        _patch_int(path, 0, 12345)
    elif case == "bad_version":
        _patch_int(path, 1, 2)
    elif case == "truncated_body":
        path.write_bytes(path.read_bytes()[:-10])
    elif case == "longer_body":
        path.write_bytes(path.read_bytes() + b"\0\0")
    elif case == "short_header":
        path.write_bytes(path.read_bytes()[:500])
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "negative_count":
        _patch_int(path, 2, -5)
    for fn in (tg.read_shard_header, tg.read_shard):
        with pytest.raises(tg.DataError) as e:
            fn(path)
        msg = str(e.value)
        assert str(path) in msg, msg
        assert any(w in msg.lower() for w in ("regenerate", "re-download", "remove")), msg
    if case == "bad_magic":
        assert "12345" in msg and "20240520" in msg
    if case == "bad_version":
        assert "version 2" in msg
    if case in ("short_header", "empty_file"):
        assert "header" in msg


def test_missing_shard_and_missing_folder_are_data_errors(tmp_path):
    with pytest.raises(tg.DataError, match="cannot read shard"):
        tg.read_shard_header(tmp_path / "nope.bin")
    with pytest.raises(tg.DataError) as e:
        tg.find_shards(str(tmp_path / "nowhere" / "fineweb_train_*.bin"), "train")
    assert "does not exist" in str(e.value) and "TRAIN_FILES" in str(e.value)
    with pytest.raises(tg.DataError) as e:
        tg.find_shards(str(tmp_path / "fineweb_val_*.bin"), "val")
    assert "fineweb_val_*.bin" in str(e.value) and "VAL_FILES" in str(e.value)


def test_find_shards_sorted(tmp_path):
    for i in (2, 0, 1):
        tg.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(10))
    assert [p.name for p in tg.find_shards(str(tmp_path / "fineweb_train_*.bin"), "train")] == [
        f"fineweb_train_{i:06d}.bin" for i in range(3)]


# ---------------------------------------------------------------------------------------- windows


def make_shards(folder: Path, sizes, base=0) -> list[Path]:
    """Shards whose tokens are unique across all shards: token = global position + base (< 65536)."""
    files, start = [], base
    for i, n in enumerate(sizes):
        path = folder / f"fineweb_train_{i:06d}.bin"
        tg.write_shard(path, np.arange(start, start + n, dtype=np.int64))
        files.append(path)
        start += n
    assert start < 65536
    return files


def test_windows_are_deterministic_per_seed(tmp_path):
    files = make_shards(tmp_path, [3000, 2000, 700])
    a = tg.TrainWindows(files, SEQ, seed=1)
    b = tg.TrainWindows(files, SEQ, seed=1)
    c = tg.TrainWindows(files, SEQ, seed=2)
    for n in (5, 17, 40):
        sa, oa = a.next_windows(n)
        sb, ob = b.next_windows(n)
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(oa, ob)
    a2 = tg.TrainWindows(files, SEQ, seed=1)
    s1, o1 = a2.next_windows(60)
    s2, o2 = c.next_windows(60)
    assert not (np.array_equal(s1, s2) and np.array_equal(o1, o2))


def test_one_epoch_covers_every_window_once(tmp_path):
    sizes = [3000, 2000, 700, 130, 64]  # the last shard has no full window (needs SEQ+1 tokens)
    files = make_shards(tmp_path, sizes)
    w = tg.TrainWindows(files, SEQ, seed=3)
    total = w.order_shard.size
    shards, offsets = w.next_windows(total)
    assert w.epoch == 0
    pairs = list(zip(shards.tolist(), offsets.tolist()))
    assert len(set(pairs)) == total  # no duplicates
    counts = np.array(sizes)
    for s in range(len(sizes)):
        mine = np.sort(offsets[shards == s])
        if mine.size == 0:
            assert counts[s] < 2 * SEQ + 1 or counts[s] - 1 < SEQ
            continue
        phase = int(mine[0])
        assert 0 <= phase < SEQ
        # windows at phase + k*SEQ for k = 0..n-1, each SEQ+1 tokens inside the shard, and no room for another
        np.testing.assert_array_equal(mine, phase + SEQ * np.arange(mine.size))
        assert mine[-1] + SEQ + 1 <= counts[s]
        assert phase + (mine.size + 1) * SEQ + 1 > counts[s]
    assert not (shards == len(sizes) - 1).any()
    # the order is shuffled across shards, not shard after shard
    assert (np.diff(shards) != 0).sum() > len(sizes)
    # the window contents are those tokens
    out = np.empty((total, SEQ + 1), dtype=np.uint16)
    w.read(shards, offsets, out)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    np.testing.assert_array_equal(out, (starts[shards] + offsets)[:, None] + np.arange(SEQ + 1))


def test_next_epoch_reshuffles_and_again_covers_everything(tmp_path):
    files = make_shards(tmp_path, [1500, 900])
    w = tg.TrainWindows(files, SEQ, seed=4)
    total = w.order_shard.size
    first = list(zip(*w.next_windows(total - 3)))
    spill = list(zip(*w.next_windows(10)))  # 3 from epoch 0, 7 from epoch 1
    assert w.epoch == 1
    epoch0 = first + spill[:3]
    assert len(set(epoch0)) == total
    rest = list(zip(*w.next_windows(w.order_shard.size - 7)))
    epoch1 = spill[3:] + rest
    assert len(set(epoch1)) == len(epoch1) == w.order_shard.size
    assert [tuple(map(int, p)) for p in epoch1] != [tuple(map(int, p)) for p in epoch0]


def test_all_shards_too_short_is_a_data_error(tmp_path):
    files = make_shards(tmp_path, [SEQ, 10])
    with pytest.raises(tg.DataError, match="TRAIN_SEQ_LEN"):
        tg.TrainWindows(files, SEQ, seed=0)


# ---------------------------------------------------------------------------------------- loader


def loader_h(tiny_env, rank=None, world=None, **overrides):
    env = tiny_env(**{"VOCAB_SIZE": "65536", "TRAIN_BATCH_TOKENS": str(16 * SEQ), "MICRO_BATCH_TOKENS": str(16 * SEQ),
                      **overrides})
    if world is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return tg.Hyperparameters(environ=env)


def take(h, files, n_batches) -> list[torch.Tensor]:
    loader = tg.TrainLoader(h, torch.device("cpu"), files=files)
    try:
        out = []
        for _ in range(n_batches):
            x, y = loader.next()
            assert x.dtype == torch.int64 and x.shape == (h.micro_batch_seqs, SEQ) and y.shape == x.shape
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
            out.append(torch.cat([x, y[:, -1:]], 1))
        return out
    finally:
        loader.close()
        assert not loader.thread.is_alive()


@pytest.mark.parametrize("sizes,world", [([3000, 2000, 700], 2), ([2500], 4)])
def test_ranks_get_disjoint_rows_whose_union_is_the_single_process_batch(tmp_path, tiny_env, sizes, world):
    files = make_shards(tmp_path, sizes)
    single_h = loader_h(tiny_env)
    assert (single_h.world_size, single_h.micro_batch_seqs, single_h.grad_accum_steps) == (1, 16, 1)
    single = take(single_h, files, 3)
    per_rank = []
    for r in range(world):
        h = loader_h(tiny_env, r, world)
        assert (h.rank, h.world_size, h.distributed) == (r, world, True)
        assert h.micro_batch_seqs == 16 // world
        per_rank.append(take(h, files, 3))
    seen = set()
    for step in range(3):
        joined = torch.cat([per_rank[r][step] for r in range(world)])
        assert torch.equal(joined, single[step])
        for r in range(world):
            firsts = set(per_rank[r][step][:, 0].tolist())
            assert not (firsts & seen)  # no window is used twice, by any rank, in the epoch
            seen |= firsts


def test_grad_accumulation_sees_the_same_windows_in_the_same_order(tmp_path, tiny_env):
    files = make_shards(tmp_path, [3000, 2000])
    one = take(loader_h(tiny_env), files, 2)
    h = loader_h(tiny_env, MICRO_BATCH_TOKENS=str(4 * SEQ))
    assert (h.grad_accum_steps, h.micro_batch_seqs) == (4, 4)
    four = take(h, files, 8)
    assert torch.equal(torch.cat(one), torch.cat(four))


def test_loader_is_deterministic_and_seed_dependent(tmp_path, tiny_env):
    files = make_shards(tmp_path, [3000, 2000])
    a = take(loader_h(tiny_env), files, 2)
    b = take(loader_h(tiny_env), files, 2)
    c = take(loader_h(tiny_env, SEED="8"), files, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_token_outside_vocab_in_a_window_is_a_data_error(tmp_path, tiny_env):
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = np.full(4000, 5, dtype=np.uint16)
    tokens[::50] = 600  # every window holds one
    tg.write_shard(path, tokens)
    h = tg.Hyperparameters(environ=tiny_env())  # VOCAB_SIZE=512
    loader = tg.TrainLoader(h, torch.device("cpu"), files=[path])
    try:
        with pytest.raises(tg.DataError) as e:
            loader.next()
    finally:
        loader.close()
    assert "600" in str(e.value) and "VOCAB_SIZE=512" in str(e.value)
    # the same shard is fine with a vocabulary that holds 600
    assert take(tg.Hyperparameters(environ=tiny_env(VOCAB_SIZE="1024")), [path], 1)[0].max() == 600


def test_loader_reads_the_tiny_dataset(tiny_env):
    h = tg.Hyperparameters(environ=tiny_env())
    loader = tg.TrainLoader(h, torch.device("cpu"))
    try:
        assert len(loader.windows.files) == 3
        x, y = loader.next()
        assert x.shape == (16, 64) and int(x.max()) < 512
    finally:
        loader.close()
    assert not loader.thread.is_alive()
