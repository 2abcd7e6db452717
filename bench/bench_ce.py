"""Soft-capped cross entropy of the output head alone: the compiled plain path (head_loss) against the
fused Triton kernels of train_gpt.py under several launch configurations. Forward + backward of one
micro-batch (default 98,304 tokens, model 512, vocab 8192, as in a record step), median of --reps.
Prints one JSON line: ms per configuration and the largest gradient difference to the plain path.

  python bench/bench_ce.py --reps 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CONFIGS = [  # chunk width and warps of the kernel; 8192 = a whole row of the record vocabulary in one chunk
    {"block": 1024, "num_warps": 4},
    {"block": 2048, "num_warps": 8},
    {"block": 4096, "num_warps": 8},
    {"block": 4096, "num_warps": 16},
    {"block": 8192, "num_warps": 16},
]


def median_ms(device, fn, reps: int) -> float:
    """Median milliseconds of fn over reps runs, after 2 untimed ones."""
    return statistics.median([tg.timed(device, fn)[1] for _ in range(reps + 2)][2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=98304)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, device=dev, generator=g).bfloat16().requires_grad_()
    weight = (0.05 * torch.randn(args.vocab, args.dim, device=dev, generator=g)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=dev, generator=g)
    plain = torch.compile(tg.head_loss, dynamic=False, fullgraph=True)

    def step(fn):
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, 30.0).backward()

    step(plain)
    ref_h, ref_w = hidden.grad.float().clone(), weight.grad.clone()
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "tokens": args.tokens,
           "vocab": args.vocab, "plain_ms": round(median_ms(dev, lambda: step(plain), args.reps), 3), "fused": []}
    for cfg in CONFIGS:
        tg.FUSED_CE_CONFIG = cfg
        step(tg.fused_head_loss)
        err_h = ((hidden.grad.float() - ref_h).abs().max() / ref_h.abs().max()).item()
        err_w = ((weight.grad - ref_w).abs().max() / ref_w.abs().max()).item()
        out["fused"].append({**cfg, "ms": round(median_ms(dev, lambda: step(tg.fused_head_loss), args.reps), 3),
                             "grad_err": round(max(err_h, err_w), 5)})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
