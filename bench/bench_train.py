"""Training-throughput benchmark: N timed steps without and with depth recurrence.

Prints one JSON line with device, tok_s_noloop, tok_s_loop, ms_step (noloop, loop), mfu (loop-weighted
as in a real run is not assumed: both phases are reported), peak_mem_gb and compile_s (warm-up of both
graphs), then optionally a per-kernel table (--profile). Settings come from the environment exactly as
for train_gpt.py (the record configuration by default with CUDA and shards present).

  DATA_DIR=./data_corpus python bench/bench_train.py --steps 20
  DATA_DIR=./data_corpus ATTENTION_BACKEND=sdpa_cudnn python bench/bench_train.py --steps 20 --profile

--train-steps N also runs N steps through the script's own training loop (Trainer.train: per-step checks,
EMA, logging), once without and once with looping, and reports their tokens/s as tok_s_train_noloop and
tok_s_train_loop: what a real run gets. --script PATH benchmarks another copy of train_gpt.py (to compare
two versions on one machine).

FLOPs per token are counted from the configuration (model FLOPs, no recomputation): 6 x (linear weights
of every virtual layer + the output head) + attention 6 x seq_len x model_dim per virtual layer (QK^T and
AV, each 2 x d x t multiply-adds at average causal context t = T/2, forward + 2x backward). MFU divides by
the H100 SXM dense bf16 peak, 989 TFLOP/s.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch


def load_train_gpt():
    """This repository's train_gpt.py, or the copy named by --script."""
    path = Path(__file__).resolve().parents[1] / "train_gpt.py"
    for i, arg in enumerate(sys.argv):  # read before argparse runs: the module is needed to build the model
        if arg == "--script" and i + 1 < len(sys.argv):
            path = Path(sys.argv[i + 1]).resolve()
        elif arg.startswith("--script="):
            path = Path(arg.split("=", 1)[1]).resolve()
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module
    spec.loader.exec_module(module)
    return module


tg = load_train_gpt()

H100_BF16_PEAK = 989e12


def flops_per_token(h, looping: bool) -> float:
    enc, dec = tg.layer_order(h.num_layers, h.num_loops, h.loop_start, h.loop_end, looping)
    d, kv = h.model_dim, h.num_kv_heads * (h.model_dim // h.num_heads)
    block = 2 * d * d + 2 * d * kv + 2 * d * int(h.mlp_mult * d)
    attention = 6 * h.train_seq_len * d
    head = h.vocab_size * h.embedding_dim
    return 6 * (len(enc + dec) * block + head) + len(enc + dec) * attention


def timed_steps(trainer, device, steps: int) -> float:
    """Median-free simple timing: total wall time of `steps` steps after 3 untimed ones (ms per step)."""
    for _ in range(3):
        trainer.step(0, 1.0, trainer.h.grad_accum_steps)
    tg.sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.step(i, 1.0, trainer.h.grad_accum_steps)
    tg.sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


def write_trace(trainer, device, path: Path, steps: int = 2):
    """A gzipped Chrome trace (chrome://tracing, Perfetto) of `steps` steps; tools/trace_gaps.py reads it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            trainer.step(i, 1.0, trainer.h.grad_accum_steps)
        tg.sync(device)
    raw = path.with_suffix("")  # .json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def profile_table(trainer, device, rows: int = 100) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            trainer.step(i, 1.0, trainer.h.grad_accum_steps)
        tg.sync(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print a per-kernel CUDA time table for each phase")
    ap.add_argument("--label", default="", help="free text stored with the result")
    ap.add_argument("--train-steps", type=int, default=0, help="also time this many steps of Trainer.train per phase")
    ap.add_argument("--trace", default="", metavar="DIR", help="also write a Chrome trace of 2 steps per phase to DIR/trace_<phase>.json.gz")
    ap.add_argument("--script", default="", help="benchmark this copy of train_gpt.py instead of the repository's")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=JSON",
                    help="set torch._inductor.config.KEY before compiling (an experiment; repeatable)")
    args = ap.parse_args()
    import torch._inductor.config as inductor_config
    for item in args.inductor:
        key, value = item.split("=", 1)
        setattr(inductor_config, key, json.loads(value))
    h = tg.Hyperparameters()
    device = tg.setup_device(h)
    tg.log.open(None, enabled=h.is_main)
    model = tg.GPT(h).to(device)
    model.use_runtime(tg.build_runtime(h, device))
    runtime = model.runtime.describe()
    trainer = tg.Trainer(h, model, device)
    t0 = time.time()
    trainer.warm_up()
    tg.sync(device)
    compile_s = time.time() - t0
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "label": args.label, "runtime": runtime, "batch_tokens": h.train_batch_tokens, "inductor": args.inductor, "grad_accum": h.grad_accum_steps,
           "micro_batch_seqs": h.micro_batch_seqs, "gpus": h.world_size, "compile_s": round(compile_s, 1), "launch_to_ready_s": round(time.time() - tg.PROCESS_START, 1)}
    tables = {}
    for looping in (False, True):
        model.looping = looping
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = timed_steps(trainer, device, args.steps)
        key = "loop" if looping else "noloop"
        tok_s = h.train_batch_tokens / (ms / 1000)
        out[f"ms_step_{key}"] = round(ms, 2)
        out[f"tok_s_{key}"] = round(tok_s)
        out[f"mflop_per_token_{key}"] = round(flops_per_token(h, looping) / 1e6, 1)
        # per GPU: tokens/s of all ranks over the peak of all ranks
        out[f"mfu_{key}"] = round(tok_s * flops_per_token(h, looping) / (H100_BF16_PEAK * h.world_size), 4)
        if device.type == "cuda":
            out[f"peak_mem_gb_{key}"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if args.profile:
            tables[key] = profile_table(trainer, device)
        if args.trace:
            write_trace(trainer, device, Path(args.trace) / f"trace_{key}.json.gz")
    for looping in (False, True) if args.train_steps else ():  # the real loop: per-step checks, EMA, logging
        key = "loop" if looping else "noloop"
        model.looping = False
        trainer.h = h.replace(iterations=args.train_steps, max_wallclock_seconds=0.0, warmup_steps=0, val_loss_every=0,
                              train_log_every=0, enable_looping_at=0.0 if looping else 2.0)
        result, _ = trainer.train(None)
        ms = result.train_time_ms / result.steps
        out[f"ms_step_train_{key}"], out[f"tok_s_train_{key}"] = round(ms, 2), round(h.train_batch_tokens / (ms / 1000))
    out["script"] = args.script or "train_gpt.py"
    out["ms_step"] = [out["ms_step_noloop"], out["ms_step_loop"]]
    out["mfu"] = out["mfu_loop"]
    out["peak_mem_gb"] = max(out.get("peak_mem_gb_noloop", 0), out.get("peak_mem_gb_loop", 0))
    trainer.loader.close()
    if h.is_main:
        for key, table in tables.items():
            print(f"--- profile ({key}) ---\n{table}")
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
