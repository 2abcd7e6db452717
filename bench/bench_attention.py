"""Causal GQA attention of one micro-batch (48 x 2048 tokens, 8 query heads, 4 KV heads, head dim 64, bf16),
forward + backward, through each backend that imports here: PyTorch SDPA (cuDNN on an H100), FlashAttention 3
(`flash_attn_interface`) and FlashAttention 4 (`flash_attn.cute`). Prints one JSON line: milliseconds (median
of --reps), TFLOP/s, the first call's time (FA4 compiles its kernels then), and the largest difference of the
output and the gradients from SDPA's.

  python bench/bench_attention.py --reps 20
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from bench_ce import median_ms  # noqa: E402 - same folder (the script's own, first on sys.path)


def backends() -> tuple[dict, dict]:
    """({name: attention function (None for SDPA)}, {name: why it did not import})."""
    found, missing = {"sdpa": None}, {}
    for name, module in (("fa3", "flash_attn_interface"), ("fa4", "flash_attn.cute")):
        try:
            found[name] = importlib.import_module(module).flash_attn_func
        except Exception as e:  # noqa: BLE001 - not installed, or installed without what it needs
            missing[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return found, missing


def attention(name, fn, q, k, v):
    if name == "sdpa":
        return tg.causal_attention(q, k, v, "sdpa")
    out = fn(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, Hkv, D = args.batch, args.seq, 8, 4, 64
    q = torch.randn(B, T, H, D, device=device, generator=g).bfloat16().requires_grad_()
    k = torch.randn(B, T, Hkv, D, device=device, generator=g).bfloat16().requires_grad_()
    v = torch.randn(B, T, Hkv, D, device=device, generator=g).bfloat16().requires_grad_()
    dout = torch.randn(B, T, H, D, device=device, generator=g).bfloat16()
    flops = 3.5 * 4 * B * H * T * T * D / 2  # causal: half the score matrix; backward = 2.5 x forward
    out = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "shape": [B, T, H, Hkv, D]}
    reference = None
    found, missing = backends()
    out["not_imported"] = missing
    for name, fn in found.items():

        def step():
            q.grad = k.grad = v.grad = None
            y = attention(name, fn, q, k, v)
            y.backward(dout)
            return y

        try:
            y, first_ms = tg.timed(device, step)
            result = [y.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
            ms = median_ms(device, step, args.reps)
            entry = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "first_call_s": round(first_ms / 1000, 1)}
            if reference is None:
                reference = result
            else:
                for label, a, b in zip(("out", "dq", "dk", "dv"), result, reference):
                    entry[f"max_diff_{label}"] = round((a - b).abs().max().item() / b.abs().max().item(), 5)
        except Exception as e:  # noqa: BLE001 - report and go on with the next backend
            entry = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[name] = entry
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
