"""Quantization settings screened on one trained model: each variant re-collects GPTQ Hessians on training
data (cached per batch count), quantizes, packs and reloads the weights from the packed bytes, then scores
the plain (non-overlapping) val_bpb. The quantization gap of a variant is its score minus the float
model's, printed first.

  DATA_DIR=./data_corpus python bench/quant_sweep.py final_model.pt "" "MLP_CLIP_SIGMAS=12" "EMBED_BITS=7" ...

A variant is a space-separated list of NAME=value settings (quantization ones: MATRIX_BITS, EMBED_BITS,
MATRIX_CLIP_SIGMAS, MLP_CLIP_SIGMAS, EMBED_CLIP_SIGMAS, GPTQ_CALIBRATION_BATCHES); "" is the run's own.
The model's architecture comes from the environment (the protocol's defaults), as in the run that wrote
the weights. Prints one JSON line per variant; stops starting variants after --budget seconds.
The scored weights come from a fast Brotli pass of the same payload (decoding does not depend on the
quality); the Brotli-11 size each variant would ship at is computed beside, in worker processes.
This is a bench: it reads training data outside any timer, which a real run must not do.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import sys
import time

import torch

from sweep_common import arguments, parse_variant, setup, tg, within_budget


def shipped_bytes(tensors, config, eval_config, compressor) -> int:
    """Size of the artifact as a run would write it (in a fresh process: real compression settings)."""
    return len(tg.serialize_artifact(tensors, config, compressor, eval_config))


def fast_compress(data: bytes, compressor: str) -> bytes:
    import brotli
    return brotli.compress(data, quality=1) if compressor == "brotli" else tg.lzma.compress(data, preset=0)


def main() -> int:
    args = arguments(__doc__.splitlines()[0], "model", "float weights written by a run (MODEL_PATH)")
    t_start = time.perf_counter()
    h, device, val = setup()
    runtime = tg.build_runtime(h, device)
    model = tg.GPT(h).to(device)
    model.load_state_dict(torch.load(args.model, map_location=device), strict=True)
    model.use_runtime(runtime)
    model.looping = h.num_loops > 0
    _, float_bpb, _, _ = tg.evaluate_plain(model, val, h, device)
    print(json.dumps({"variant": "float weights", "val_bpb": round(float_bpb, 6)}), flush=True)
    hessians: dict[int, dict] = {}
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=8, mp_context=multiprocessing.get_context("spawn"))
    real_compress, rows = tg.compress, []
    for text in within_budget(args.variants, args.budget, t_start):
        hv = h.replace(**parse_variant(text))
        n = hv.gptq_calibration_batches
        if n not in hessians:
            loader = tg.TrainLoader(hv, device)
            hessians[n] = tg.collect_hessians(model, loader, hv, device)
            loader.close()
        t0 = time.perf_counter()
        tensors, _ = tg.quantize_model(model, hessians[n], hv)
        quantize_s = time.perf_counter() - t0
        size = pool.submit(shipped_bytes, tensors, hv.model_config(), hv.eval_config(), hv.compressor)
        tg.compress = fast_compress
        try:
            blob = tg.serialize_artifact(tensors, hv.model_config(), hv.compressor, hv.eval_config())
        finally:
            tg.compress = real_compress
        qmodel = tg.GPT(hv).to(device)
        qmodel.load_state_dict(tg.load_artifact_state(blob, qmodel), strict=True)
        qmodel.use_runtime(runtime)
        qmodel.looping = model.looping
        _, bpb, _, _ = tg.evaluate_plain(qmodel, val, hv, device)
        row = {"variant": text, "val_bpb": round(bpb, 6), "gap": round(bpb - float_bpb, 6), "quantize_s": round(quantize_s, 1)}
        print(json.dumps(row), flush=True)
        rows.append((row, size))
        del qmodel
    for row, size in rows:  # the same rows again, with the bytes each would ship at
        print(json.dumps({**row, "model_bytes": size.result()}), flush=True)
    pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
