"""The artifact: binary layout round trip, refusal of anything damaged, byte shuffle, both compressors,
exact size accounting in a tiny run's log, the packed (self-extracting) script, the 16 MB limit and
ARTIFACT_FIT. CPU only; two tiny training runs (~10 s each)."""
from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RandomTokens, run_script, tiny_settings

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
HEADER = tg.ARTIFACT_HEADER.size


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------



def make_h(**overrides) -> tg.Hyperparameters:
    return tg.Hyperparameters(tiny_settings(Path("/nonexistent"), **overrides), cuda_available=False)


def trained_looking_model(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def quantized():
    h = make_h()
    model = trained_looking_model(h)
    hessians = tg.collect_hessians(model, RandomTokens(h.vocab_size, 4, h.train_seq_len), h, torch.device("cpu"))
    tensors, _ = tg.quantize_model(model, hessians, h)
    return h, model, hessians, tensors


@pytest.fixture(scope="module")
def blob(quantized) -> bytes:
    h, _, _, tensors = quantized
    return tg.serialize_artifact(tensors, h.model_config(), "brotli")


def tensors_from_parse(blob: bytes, model: tg.GPT) -> tuple[list[tg.QuantizedTensor], dict]:
    """Rebuild QuantizedTensors from what parse_artifact returns (names come from the model)."""
    meta, table, codes, scale_codes, tops, plain = tg.parse_artifact(blob)
    out, c, r, k, p = [], 0, 0, 0, 0
    for (name, param), (bits, shape) in zip(model.named_parameters(), table):
        assert tuple(param.shape) == shape
        n = math.prod(shape)
        if bits == 16:
            values = np.frombuffer(plain, dtype="<f2", count=n, offset=2 * p).reshape(shape)
            out.append(tg.QuantizedTensor(name, shape, 16, values=values))
            p += n
        else:
            q = tg.stored_codes(codes, c, shape, meta["version"])
            sc = np.frombuffer(scale_codes, dtype=np.uint8, count=shape[0], offset=r)
            out.append(tg.QuantizedTensor(name, shape, bits, codes=q, scale_top=float(tops[k]), scale_codes=sc))
            c, r, k = c + n, r + shape[0], k + 1
    assert c == len(codes) and r == len(scale_codes) and k == len(tops) and 2 * p == len(plain)
    return out, meta


def flip(blob: bytes, i: int, mask: int = 0x01) -> bytes:
    b = bytearray(blob)
    b[i] ^= mask
    return bytes(b)


@pytest.fixture
def capture_log(tmp_path, monkeypatch):
    """Route train_gpt's module logger to a file; returns a function giving the text so far."""
    path = tmp_path / "captured.log"
    logger = tg.Logger(str(path), True)
    monkeypatch.setattr(tg, "log", logger)
    yield lambda: path.read_text() if path.exists() else ""
    logger.close()


# ------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_round_trip_is_bit_exact(quantized, compressor):
    h, model, _, tensors = quantized
    blob = tg.serialize_artifact(tensors, h.model_config(), compressor)
    magic, version, comp_id, _, crc, length, _ = tg.ARTIFACT_HEADER.unpack_from(blob)
    assert (magic, version, comp_id) == (tg.ARTIFACT_MAGIC, tg.ARTIFACT_VERSION, tg.COMPRESSORS[compressor])

    state = tg.load_artifact_state(blob, tg.GPT(h))
    assert list(state) == [t.name for t in tensors]
    for t in tensors:
        assert state[t.name].dtype == torch.float32
        assert torch.equal(state[t.name], t.dequantize().view(t.shape)), t.name
    fresh = tg.GPT(h)
    fresh.load_state_dict(state, strict=True)

    # what the loader reads back serializes to the very same bytes
    rebuilt, meta = tensors_from_parse(blob, model)
    assert meta["config"] == h.model_config()
    for a, b in zip(rebuilt, tensors):
        assert a.bits == b.bits and a.shape == b.shape
        if a.bits == 16:
            assert np.array_equal(a.values, b.values)
        else:
            assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale_codes, b.scale_codes)
            assert a.scale_top == b.scale_top
    assert tg.serialize_artifact(rebuilt, meta["config"], compressor) == blob
    assert tg.serialize_artifact(tensors, h.model_config(), compressor) == blob, "serialization is deterministic"


def older_artifact(tensors: list[tg.QuantizedTensor], config: dict, version: int, compressor: str = "lzma") -> bytes:
    """A file as versions 2 (codes in row order) and 3 (column order) wrote it: the int8 codes inside the
    compressed payload, between the JSON and the row scales, and a zero last header field."""
    quantized = [t for t in tensors if t.bits != 16]
    meta = json.dumps({"config": config, "table": [[t.bits, *t.shape] for t in tensors],
                       "names_digest": tg.names_digest((t.name, list(t.shape)) for t in tensors)}).encode()
    codes = b"".join((t.codes.astype(np.int8).T if version >= 3 else t.codes.astype(np.int8)).tobytes() for t in quantized)
    payload = (len(meta).to_bytes(4, "little") + meta + codes
               + b"".join(t.scale_codes.astype(np.uint8).tobytes() for t in quantized)
               + np.array([t.scale_top for t in quantized], dtype="<f4").tobytes()
               + tg.byte_shuffle(b"".join(t.values.astype("<f2").tobytes() for t in tensors if t.bits == 16)))
    header = tg.ARTIFACT_HEADER.pack(tg.ARTIFACT_MAGIC, version, tg.COMPRESSORS[compressor], 0, zlib.crc32(payload), len(payload), 0)
    return header + tg.compress(payload, compressor)


def test_codes_are_entropy_coded_in_column_order_and_older_artifacts_still_load(quantized):
    h, model, _, tensors = quantized
    blob = tg.serialize_artifact(tensors, h.model_config(), "lzma")
    meta, _, codes, *_ = tg.parse_artifact(blob)
    assert meta["version"] == tg.ARTIFACT_VERSION == 4
    first = next(t for t in tensors if t.bits != 16)
    assert codes[:first.codes.size] == np.ascontiguousarray(first.codes.astype(np.int8).T).tobytes()
    # the codes are not in the compressed payload but in the coded section after it
    coded_len = tg.ARTIFACT_HEADER.unpack_from(blob)[6]
    n_codes = sum(t.codes.size for t in tensors if t.bits != 16)
    assert 0 < coded_len < n_codes and len(tg.decompress(blob[HEADER:len(blob) - coded_len], "lzma")) < n_codes
    new = tg.load_artifact_state(blob, model)
    for version in (2, 3):  # the same tensors in the older layouts: the same weights come back
        old_blob = older_artifact(tensors, h.model_config(), version)
        assert tg.parse_artifact(old_blob)[0]["version"] == version
        old = tg.load_artifact_state(old_blob, model)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new), version
    # a non-zero last header field is refused in the older versions, where it is reserved
    v3 = older_artifact(tensors, h.model_config(), 3)
    assert_refused(v3[:20] + b"\x01\x00\x00\x00" + v3[24:], "reserved")


def test_coded_section_damage_is_refused(quantized):
    """Damage in the coded section, in the compressed part before it, or in the header field giving the
    coded section's length is caught by the checksum; a coded section that is consistent with the checksum
    but does not decode (a writer bug) is refused too."""
    h, _, _, tensors = quantized
    blob = tg.serialize_artifact(tensors, h.model_config(), "brotli")
    coded_len = tg.ARTIFACT_HEADER.unpack_from(blob)[6]
    split = len(blob) - coded_len
    for i in (split - 1, split, split + 5 * tg.RANS_LANES - 1, split + 5 * tg.RANS_LANES, len(blob) - 2):
        assert_refused(flip(blob, i, 0x04), "corrupt")
    for length in (coded_len - 2, coded_len + 2, len(blob)):
        assert_refused(blob[:20] + length.to_bytes(4, "little") + blob[24:])
    for keep in (split - 1, split, split + 1):
        assert_refused(blob[:keep], "corrupt")
    payload = tg.decompress(blob[HEADER:split], "brotli")
    for coded in (flip(blob[split:], 5 * tg.RANS_LANES + 3), blob[split:-2], blob[split:] + b"\0\0", b""):
        header = tg.ARTIFACT_HEADER.pack(tg.ARTIFACT_MAGIC, 4, 0, 0, zlib.crc32(coded, zlib.crc32(payload)), len(payload), len(coded))
        assert_refused(header + blob[HEADER:split] + coded, "do not decode", "corrupt")


def test_both_compressors_compress(quantized):
    h, _, _, tensors = quantized
    sizes = {}
    for comp in ("brotli", "lzma"):
        blob = tg.serialize_artifact(tensors, h.model_config(), comp)
        length, coded_len = tg.ARTIFACT_HEADER.unpack_from(blob)[5:]
        sizes[comp] = len(blob)
        assert len(blob) - HEADER - coded_len < 0.9 * length, f"{comp} barely compresses"
        assert tg.artifact_config(blob, "x") == h.model_config()
    raw_codes = sum(t.codes.size for t in tensors if t.bits != 16)
    assert max(sizes.values()) < raw_codes, "6-bit codes in int8 bytes must compress below one byte per weight"


def test_byte_shuffle_is_invertible():
    rng = np.random.default_rng(0)
    for stride in (2, 4):
        for n in (0, stride, 2 * stride, 1000 * stride):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            shuffled = tg.byte_shuffle(data, stride)
            assert len(shuffled) == len(data)
            assert tg.byte_unshuffle(shuffled, stride) == data
    # grouping: the low bytes of all fp16 values first, then the high bytes
    values = np.array([1.0, -2.5, 65504.0, 1e-3], dtype="<f2")
    raw = values.tobytes()
    shuffled = tg.byte_shuffle(raw)
    assert shuffled[:4] == raw[0::2] and shuffled[4:] == raw[1::2]


# ------------------------------------------------------------------------------------------------
# refusing damaged input
# ------------------------------------------------------------------------------------------------


def assert_refused(blob: bytes, *words: str, model: tg.GPT | None = None):
    with pytest.raises(tg.ArtifactError) as exc:
        if model is None:
            tg.parse_artifact(blob, "art.ptz")
        else:
            tg.load_artifact_state(blob, model, "art.ptz")
    msg = str(exc.value)
    assert "art.ptz" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_flipped_byte_in_body_is_refused(blob):
    body = range(HEADER, len(blob))
    positions = sorted({HEADER, HEADER + 1, len(blob) - 1, *body[::max(1, len(body) // 40)]})
    for i in positions:
        for mask in (0x01, 0x80):
            msg = assert_refused(flip(blob, i, mask))
            assert "corrupt" in msg or "damaged" in msg, (i, msg)


@pytest.mark.parametrize("i", range(HEADER))
def test_flipped_byte_in_header_is_refused(blob, i):
    """Every header byte matters: magic, version, compressor, checksum, length, and the reserved fields
    (which this version writes as zero; anything else means the file is damaged)."""
    assert_refused(flip(blob, i, 0x10))


@pytest.mark.parametrize("keep", [0, 3, HEADER - 1, HEADER, HEADER + 10, -100, -1])
def test_truncated_file_is_refused(blob, keep):
    assert_refused(blob[:keep])


def test_wrong_magic_is_refused(blob):
    msg = assert_refused(b"PK\x03\x04" + blob[4:], "magic")
    assert "PGLF" in msg


def test_wrong_version_is_refused(blob):
    bad = blob[:4] + bytes([tg.ARTIFACT_VERSION + 1]) + blob[5:]
    assert_refused(bad, f"version {tg.ARTIFACT_VERSION + 1}", "versions 2, 3, 4")


def test_unknown_compressor_is_refused(blob):
    bad = blob[:5] + bytes([7]) + blob[6:]
    assert_refused(bad, "compressor")


def test_model_of_another_shape_is_refused(blob):
    assert_refused(blob, "different network shape", model=tg.GPT(make_h(MODEL_DIM="32", EMBEDDING_DIM="32", ROPE_DIMS="8")))
    assert_refused(blob, "different network shape", model=tg.GPT(make_h(NUM_LAYERS="2", XSA_LAST_N="2")))
    assert_refused(blob, "different network shape", model=tg.GPT(make_h(TIE_EMBEDDINGS="0")))


def test_consistent_payload_with_a_wrong_table_is_refused(quantized):
    """A well-formed file whose tensor table promises more data than it holds."""
    h, _, _, tensors = quantized
    good = tg.serialize_artifact(tensors, h.model_config(), "lzma")
    payload = tg.decompress(good[HEADER:], "lzma")
    bad_payload = payload[:-2]  # drop the last fp16 value
    header = tg.ARTIFACT_HEADER.pack(tg.ARTIFACT_MAGIC, tg.ARTIFACT_VERSION, 1, 0, zlib.crc32(bad_payload),
                                     len(bad_payload), 0)
    assert_refused(header + tg.compress(bad_payload, "lzma"), "table")


def test_eval_model_is_built_from_the_artifact_config(quantized, tmp_path, capture_log):
    h, _, _, tensors = quantized
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(tensors, h.model_config(), "brotli"))
    other = make_h(MODEL_DIM="32", EMBEDDING_DIM="32", ROPE_DIMS="8")
    model, hh = tg.load_eval_model(path, other, torch.device("cpu"))
    assert hh.model_dim == h.model_dim and model.tok_emb.weight.shape == (h.vocab_size, h.model_dim)
    assert "MODEL_DIM" in capture_log() and "warning" in capture_log()
    with pytest.raises(tg.ArtifactError, match="not found"):
        tg.load_eval_model(tmp_path / "missing.ptz", h, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# the 16 MB limit and ARTIFACT_FIT
# ------------------------------------------------------------------------------------------------


def test_over_limit_artifact_gets_its_own_name(quantized, blob, tmp_path, monkeypatch, capture_log):
    h, _, _, _ = quantized
    target = tmp_path / "out" / "model.int6.ptz"
    target.parent.mkdir()
    target.write_bytes(b"previous artifact")
    hh = h.replace(artifact_path=str(target))
    code_bytes = 1234
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", code_bytes + len(blob) - 100)
    path = tg.write_artifact(blob, hh, code_bytes, 5678)
    assert path == target.with_name("model.int6.OVER_LIMIT_by_100_bytes.ptz")
    assert path.read_bytes() == blob
    assert target.read_bytes() == b"previous artifact", "ARTIFACT_PATH must be left untouched"
    text = capture_log()
    assert re.search(r"^artifact: path=.*OVER_LIMIT_by_100_bytes\.ptz fits:0 limit:\d+ margin:-100$", text, re.M), text
    assert "warning: the submission is 100 bytes over" in text
    assert f"Total submission size quantized+brotli: {code_bytes + len(blob)} bytes" in text

    # exactly at the limit fits
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", code_bytes + len(blob))
    assert tg.write_artifact(blob, hh, code_bytes, 5678) == target
    assert target.read_bytes() == blob
    assert re.search(r"fits:1 limit:\d+ margin:0$", capture_log(), re.M)


def test_artifact_fit_coarsens_the_grid_until_it_fits(quantized, monkeypatch, capture_log):
    h, model, hessians, _ = quantized
    code_bytes = 1000
    base_blob, base_clip = tg.build_artifact(model, hessians, h, code_bytes)
    assert base_clip == h.matrix_clip_sigmas
    limit = code_bytes + int(0.85 * len(base_blob))
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", limit)
    # without ARTIFACT_FIT nothing changes
    blob, clip = tg.build_artifact(model, hessians, h, code_bytes)
    assert blob == base_blob and clip == base_clip
    # with it the matrix grid is coarsened (larger clip) and the file shrinks below the limit
    blob, clip = tg.build_artifact(model, hessians, h.replace(artifact_fit=True), code_bytes)
    assert clip > h.matrix_clip_sigmas
    assert len(blob) < len(base_blob)
    assert code_bytes + len(blob) <= limit
    assert "artifact_fit:" in capture_log()
    # still a valid artifact of the same model
    tg.GPT(h).load_state_dict(tg.load_artifact_state(blob, tg.GPT(h)), strict=True)
    # a model that already fits is left alone
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", 16_000_000)
    blob2, clip2 = tg.build_artifact(model, hessians, h.replace(artifact_fit=True), code_bytes)
    assert blob2 == base_blob and clip2 == h.matrix_clip_sigmas


# ------------------------------------------------------------------------------------------------
# size accounting in a real (tiny) run, and the packed script
# ------------------------------------------------------------------------------------------------


def stage_lines(log: str) -> list[str]:
    """Evaluation result lines without their timing."""
    keep = [l for l in log.splitlines() if re.match(r"^(pre-quantization post-ema|quantized\S*) val_", l)]
    return [re.sub(r" eval_time:\d+ms", "", l) for l in keep]


def sizes(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log, re.M)
        assert m, f"no line matching {pattern!r} in the log"
        return m.groups()

    out = {}
    out["model"] = int(num(r"^Serialized model quantized\+brotli: (\d+) bytes$")[0])
    code, readable = num(r"^Code size: (\d+) bytes \(readable: (\d+) bytes\)$")
    out["code"], out["readable"] = int(code), int(readable)
    out["total"] = int(num(r"^Total submission size quantized\+brotli: (\d+) bytes$")[0])
    sha, nbytes, psha, pbytes = num(r"^script: \S+ sha256:(\w+) bytes:(\d+) packed_sha256:(\w+) packed_bytes:(\d+)$")
    out.update(sha=sha, bytes=int(nbytes), packed_sha=psha, packed_bytes=int(pbytes))
    out["margin"] = int(num(r"^artifact: path=\S+ fits:1 limit:16000000 margin:(-?\d+)$")[0])
    return out


@pytest.fixture(scope="module")
def readable_run(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("readable_run")
    proc, log = run_script(tiny_settings(tiny_data), cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, log


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_size_accounting_in_the_log(readable_run):
    cwd, log = readable_run
    s = sizes(log)
    source = SCRIPT.read_text(encoding="utf-8")
    packed = tg.pack_source(source).encode("utf-8")
    assert s["total"] == s["code"] + s["model"]
    assert s["model"] == (cwd / "final_model.int6.ptz").stat().st_size
    assert s["code"] == len(packed) == s["packed_bytes"]
    assert s["packed_sha"] == hashlib.sha256(packed).hexdigest()
    assert s["readable"] == s["bytes"] == len(source.encode("utf-8"))
    assert s["sha"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    assert s["margin"] == 16_000_000 - s["total"]
    assert s["code"] < s["readable"]


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_packed_script_is_smaller_and_runs_the_same_program(readable_run, tiny_data, tmp_path):
    cwd, log = readable_run
    out = tmp_path / "submission" / "train_gpt.py"
    proc, _ = run_script({}, tmp_path, args=["--pack", str(out)])
    assert proc.returncode == 0, proc.stderr
    packed = out.read_bytes()
    readable = SCRIPT.read_bytes()
    assert len(packed) < 0.4 * len(readable), (len(packed), len(readable))
    assert packed == tg.pack_source(readable.decode()).encode()
    assert packed.decode().startswith(tg.PACKED_HEAD)
    unpacked = tg.unpack_source(packed.decode())
    assert unpacked == tg.strip_source(readable.decode())
    assert ast.dump(ast.parse(unpacked)) == ast.dump(tg.strip_docstrings(ast.parse(readable.decode())))

    run_dir = tmp_path / "packed_run"
    run_dir.mkdir()
    proc, plog = run_script(tiny_settings(tiny_data), run_dir, script=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines, plines = stage_lines(log), stage_lines(plog)
    assert any(l.startswith("pre-quantization post-ema val_loss:") for l in lines)
    assert any(l.startswith("quantized val_loss:") for l in lines)
    assert any(l.startswith("quantized_sliding_window val_loss:") for l in lines)
    assert plines == lines
    assert (run_dir / "final_model.int6.ptz").read_bytes() == (cwd / "final_model.int6.ptz").read_bytes()
    # the packed copy reports its own size as the code size
    s = sizes(plog)
    assert s["code"] == s["readable"] == s["bytes"] == s["packed_bytes"] == len(packed)
    assert s["sha"] == s["packed_sha"] == hashlib.sha256(packed).hexdigest()
    assert s["total"] == len(packed) + s["model"]


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_pack_usage_errors(tmp_path):
    proc, _ = run_script({}, tmp_path, args=["--pack"])
    assert proc.returncode == 2 and "usage" in proc.stderr


# ------------------------------------------------------------------------------------------------
# LQER: low-rank correction of the quantization error
# ------------------------------------------------------------------------------------------------


def weighted_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T): the squared output error of E = W - Q on inputs whose second moment is H."""
    E = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


def test_lqer_corrects_the_matrices_it_helps_most_and_the_artifact_carries_it(quantized):
    base_h, model, hessians, plain_tensors = quantized
    h = base_h.replace(lqer_rank=2, lqer_top_k=2, lqer_bits=8)
    tensors, notes = tg.quantize_model(model, hessians, h)
    factors = [t for t in tensors if t.name.endswith(tg.LQER_SUFFIXES)]
    assert len(factors) == 4 and any(n.startswith("lqer: ") for n in notes)
    assert [t.name for t in tensors[:len(plain_tensors)]] == [t.name for t in plain_tensors]  # parameters first, unchanged
    corrected = [t.name[:-len(".lqer_a")] for t in factors[::2]]
    blob = tg.serialize_artifact(tensors, h.model_config(), "brotli")
    plain_blob = tg.serialize_artifact(plain_tensors, h.model_config(), "brotli")
    # about a byte a factor value, plus each factor's code table in the header's JSON (a few hundred bytes)
    assert 0 < len(blob) - len(plain_blob) < sum(math.prod(t.shape) for t in factors) + 500 * len(factors)
    state, plain_state = tg.load_artifact_state(blob, tg.GPT(h)), tg.load_artifact_state(plain_blob, tg.GPT(h))
    tg.GPT(h).load_state_dict(state, strict=True)  # the factors are folded in, not extra parameters
    weights = dict(model.named_parameters())
    for name in state:
        if name not in corrected:
            assert torch.equal(state[name], plain_state[name]), name
    # the chosen matrices lose error as their layer's inputs see it; of all matrices, they had the most to gain
    for name in corrected:
        H = hessians[tg.hessian_key(name)]
        W = weights[name].detach()
        assert weighted_error(W, state[name], H) < 0.97 * weighted_error(W, plain_state[name], H), name
    assert "tok_emb.weight" not in corrected


def test_lqer_artifact_refuses_a_tampered_correction_list(quantized):
    base_h, model, hessians, _ = quantized
    h = base_h.replace(lqer_rank=1, lqer_top_k=1)
    tensors, _ = tg.quantize_model(model, hessians, h)
    renamed = [t if not t.name.endswith(tg.LQER_SUFFIXES) else
               tg.QuantizedTensor("blocks.0.mlp.proj.weight" + t.name[-7:], t.shape, t.bits, t.codes, t.scale_top, t.scale_codes)
               for t in tensors]
    if renamed == tensors:
        pytest.skip("the chosen matrix is blocks.0.mlp.proj.weight already")
    good = tg.serialize_artifact(tensors, h.model_config(), "brotli")
    meta = tg.parse_artifact(good)[0]
    assert len(meta["lqer"]) == 1
    # a correction recorded for another weight than the one whose factors are stored: the digest catches it
    bad = tg.serialize_artifact(renamed, h.model_config(), "brotli")
    parsed = list(tg.parse_artifact(bad))
    parsed[0]["lqer"] = meta["lqer"]
    with pytest.raises(tg.ArtifactError, match="different network shape"):
        tg.load_artifact_state(bad, tg.GPT(h), "art.ptz", tuple(parsed))


# ------------------------------------------------------------------------------------------------
# AWQ_ALPHA: activation-aware column scaling before GPTQ
# ------------------------------------------------------------------------------------------------


def test_awq_column_scales_follow_the_input_rms_on_the_stored_grid():
    H = torch.diag(torch.tensor([4.0, 1.0, 0.0, 16.0, 2.25]))[None]  # input RMS 2, 1, 0 (dead), 4, 1.5
    s = tg.awq_column_scales(H, 0.5)[0]
    rms = np.array([2.0, 1.0, 0.0, 4.0, 1.5])
    want = np.clip(0.5 * np.log2(np.maximum(rms / rms.mean(), 2.0 ** -32)), -4, 4)
    want = np.float16(2.0 ** (np.round(16 * want) / 16)).astype(np.float32)
    assert np.array_equal(s.numpy(), want)
    assert s[2] == 2.0 ** -4  # an input that never fires gets the smallest scale
    assert torch.equal(tg.awq_column_scales(H, 0.5), tg.awq_column_scales(H.double(), 0.5))


def test_awq_scales_travel_with_the_codes_and_compose_with_lqer(quantized):
    base_h, model, hessians, plain_tensors = quantized
    assert all(t.col_scale is None for t in plain_tensors)  # AWQ_ALPHA=0: nothing changes, nothing is stored
    assert "awq" not in tg.parse_artifact(tg.serialize_artifact(plain_tensors, base_h.model_config(), "brotli"))[0]
    h = base_h.replace(awq_alpha=0.5)
    tensors, _ = tg.quantize_model(model, hessians, h)
    scaled = [t for t in tensors if t.col_scale is not None]
    gptq_names = {t.name for t in plain_tensors if t.bits != 16} - {"tok_emb.weight", "lm_head.weight"}
    assert {t.name for t in scaled} == gptq_names and gptq_names  # every GPTQ matrix but the embedding
    blob = tg.serialize_artifact(tensors, h.model_config(), "brotli")
    assert tg.parse_artifact(blob)[0]["awq"] == [t.name for t in scaled]
    state = tg.load_artifact_state(blob, tg.GPT(h))
    tg.GPT(h).load_state_dict(state, strict=True)  # the scales are divided out, not extra parameters
    for t in tensors:
        assert torch.equal(state[t.name], t.dequantize()), t.name  # the loader divides by the stored scales
    # the layer outputs stay about as close to the float model's as without AWQ (GPTQ sees the same outputs)
    weights, plain_state = dict(model.named_parameters()), tg.load_artifact_state(
        tg.serialize_artifact(plain_tensors, base_h.model_config(), "brotli"), tg.GPT(base_h))
    for name in gptq_names:
        H = hessians[tg.hessian_key(name)]
        W = weights[name].detach()
        assert weighted_error(W, state[name], H) < 1.5 * weighted_error(W, plain_state[name], H), name
    # with LQER on top, the correction is of the scaled matrix's error: W = Q diag(s)^-1 + A B
    h2 = base_h.replace(awq_alpha=0.5, lqer_rank=2, lqer_top_k=2)
    tensors2, _ = tg.quantize_model(model, hessians, h2)
    state2 = tg.load_artifact_state(tg.serialize_artifact(tensors2, h2.model_config(), "brotli"), tg.GPT(h2))
    corrected = [t.name[:-len(".lqer_a")] for t in tensors2 if t.name.endswith(".lqer_a")]
    assert len(corrected) == 2
    for name in corrected:
        H = hessians[tg.hessian_key(name)]
        assert weighted_error(weights[name].detach(), state2[name], H) < weighted_error(weights[name].detach(), state[name], H)


def test_extra_bit_goes_to_the_groups_with_the_most_error_per_weight(quantized):
    base_h, model, hessians, plain_tensors = quantized
    h = base_h.replace(matrix_extra_bit_top_k=2)
    tensors, notes = tg.quantize_model(model, hessians, h)
    plain = {t.name: t for t in plain_tensors}
    weights = dict(model.named_parameters())
    upgraded = {t.name for t in tensors if t.bits == h.matrix_bits + 1}
    groups = {tg.hessian_key(n) for n in upgraded}
    assert len(groups) == 2 and any(n.startswith("extra bit: ") for n in notes)
    assert upgraded == {n for n, t in plain.items() if t.bits == h.matrix_bits and tg.hessian_key(n) in groups}  # whole groups
    # the chosen groups had the largest Hessian-weighted error per weight at MATRIX_BITS
    per_weight = {}
    for name, t in plain.items():
        if t.bits == h.matrix_bits:
            key = tg.hessian_key(name)
            err, n = per_weight.get(key, (0.0, 0))
            per_weight[key] = (err + tg.weighted_quant_error(weights[name].detach(), t, hessians[key]), n + t.codes.size)
    ranked = sorted(per_weight, key=lambda k: -per_weight[k][0] / per_weight[k][1])
    assert groups == set(ranked[:2])
    for t in tensors:
        if t.name in upgraded:  # one more bit: about a quarter of the error
            key = tg.hessian_key(t.name)
            before = tg.weighted_quant_error(weights[t.name].detach(), plain[t.name], hessians[key])
            assert tg.weighted_quant_error(weights[t.name].detach(), t, hessians[key]) < 0.5 * before
            assert t.scale_top == pytest.approx(plain[t.name].scale_top * 31 / 63, rel=1e-3)  # the same clip, 63 steps not 31
        elif t.bits != 16:
            assert np.array_equal(t.codes, plain[t.name].codes)  # the rest is untouched
    blob = tg.serialize_artifact(tensors, h.model_config(), "brotli")
    tg.GPT(h).load_state_dict(tg.load_artifact_state(blob, tg.GPT(h)), strict=True)
