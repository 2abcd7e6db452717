"""Packing of an artifact's weight bytes, measured: the shipped file (since version 4 its codes rANS-coded)
against grouped streams, value transforms, column order, other compressors and the rANS coder, with the
order-0 entropy of the codes as the floor that per-value coding could reach. Lossless, so val_bpb does not
move; only bytes do.

  python bench/pack_sweep.py final_model.int6.ptz            # prints a table and one JSON line

Every variant is decoded again and compared with the original codes before its size counts.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def brotli_size(data: bytes, **kw) -> int:
    import brotli
    return len(brotli.compress(data, quality=11, lgwin=24, **kw))


def lzma_size(data: bytes) -> int:
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))


def zigzag(codes: np.ndarray) -> np.ndarray:
    """-1 -> 1, 1 -> 2, -2 -> 3, ...: small magnitudes become small unsigned bytes."""
    c = codes.astype(np.int16)
    return np.where(c < 0, -2 * c - 1, 2 * c).astype(np.uint8)


def entropy_bytes(codes: np.ndarray) -> float:
    """Order-0 entropy of the values, in bytes (what a per-tensor static model would need, tables aside)."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def tensor_kind(name: str) -> str:
    for key in ("tok_emb", "c_q", "c_k", "c_v", "attn.proj", "mlp.fc", "mlp.proj"):
        if key in name:
            return key
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--fast", action="store_true", help="Brotli quality 9 instead of 11 for the variants (quick look)")
    args = ap.parse_args()
    blob = Path(args.artifact).read_bytes()
    meta, table, codes, scale_codes, tops, plain = tg.parse_artifact(blob, args.artifact)
    cfg = meta["config"]
    h = tg.Hyperparameters(environ={k: str(int(v) if isinstance(v, bool) else v) for k, v in cfg.items() if k in tg.SETTINGS_BY_NAME} | {"PRESET": "record", "DATA_DIR": "/nonexistent"}, cuda_available=False)
    model = tg.GPT(h)
    names = [n for n, _ in model.named_parameters()]
    mats, c = [], 0
    for name, (bits, shape) in zip(names, table):
        if bits != 16:
            n = math.prod(shape)
            mats.append((name, bits, tg.stored_codes(codes, c, shape, meta["version"])))
            c += n
    rest = scale_codes + tops.tobytes() + tg.byte_shuffle(plain)
    size = (lambda d: brotli_size(d)) if not args.fast else (lambda d: len(__import__("brotli").compress(d, quality=9, lgwin=24)))
    rows = {}
    t0 = time.perf_counter()
    rows[f"shipped (artifact version {meta['version']})"] = len(blob)
    rows["codes only, one stream"] = size(codes)
    rows["codes, zigzag, one stream"] = size(zigzag(np.frombuffer(codes, np.int8)).tobytes())
    groups: dict[str, list[np.ndarray]] = {}
    for name, bits, q in mats:
        groups.setdefault(tensor_kind(name), []).append(q)
    per_kind = {k: b"".join(q.tobytes() for q in v) for k, v in groups.items()}
    rows["codes, one stream per kind"] = sum(size(d) for d in per_kind.values())
    rows["codes, zigzag, one stream per kind"] = sum(size(zigzag(np.frombuffer(d, np.int8)).tobytes()) for d in per_kind.values())
    rows["codes, column order, one stream per kind"] = sum(size(b"".join(np.ascontiguousarray(q.T).tobytes() for q in v)) for v in groups.values())
    rows["codes, one stream per tensor"] = sum(size(q.tobytes()) for _, _, q in mats)
    rows["codes, lzma, one stream per kind"] = sum(lzma_size(d) for d in per_kind.values())
    streams = [np.ascontiguousarray(q.T).view(np.uint8).ravel() for _, _, q in mats]
    tables = [tg.code_frequencies(q) for _, _, q in mats]
    coded = tg.rans_encode(streams, tables)
    assert np.array_equal(tg.rans_decode(coded, [s.size for s in streams], tables), np.concatenate(streams))
    rows["codes, rANS, one table per tensor (version 4)"] = len(coded)
    rows["codes, order-0 entropy per tensor (floor)"] = round(sum(entropy_bytes(q) for _, _, q in mats))
    rows["codes, order-0 entropy per kind"] = round(sum(entropy_bytes(np.frombuffer(d, np.int8)) for d in per_kind.values()))
    rows["scales + tops + fp16 tensors, one stream"] = size(rest)
    for label, value in rows.items():
        print(f"{label:48s} {value:>12,d}")
    per_kind_bits = {k: round(8 * size(d) / len(d), 3) for k, d in per_kind.items()}
    print(json.dumps({"artifact_bytes": len(blob), "n_codes": len(codes), "seconds": round(time.perf_counter() - t0, 1),
                      "bits_per_code_by_kind": per_kind_bits, **{k: int(v) for k, v in rows.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
