"""Hand-written GPU kernels checked against the plain PyTorch code they replace, on CPU through Triton's
interpreter (TRITON_INTERPRET=1). The interpreter must be switched on before Triton is imported, so the
checks run in a fresh Python process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytest.importorskip("triton")

import train_gpt as tg  # noqa: E402
from conftest import tiny_h  # noqa: E402

# Runs in the child: fused soft-capped cross entropy vs head_loss, loss and both gradients, for a vocabulary
# that fills the kernel's chunks exactly and one that leaves masked columns, several chunks per row and one,
# in float32 and bfloat16, including rows whose logits saturate the soft cap and targets at both ends of
# the vocabulary.
CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import train_gpt as tg
out = []
for block, vocab, dtype in [(b, v, d) for b in (32, 128) for v in (64, 100) for d in (torch.float32, torch.bfloat16)]:
    tg.FUSED_CE_CONFIG = {"block": block, "num_warps": 4}  # 2 or 4 chunks per row (last one partial), or one
    g = torch.Generator().manual_seed(vocab)
    rows, dim, cap = 41, 16, 5.0
    hidden = torch.randn(2, rows, dim, generator=g)
    hidden[0, :3] *= 40  # logits far beyond the cap: tanh saturates
    hidden = hidden.to(dtype).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (2, rows), generator=g)
    targets[0, 0], targets[1, 0] = 0, vocab - 1
    results = []
    for fn in (tg.fused_head_loss, tg.head_loss):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets, cap)
        (2.5 * loss).backward()  # a non-unit upstream gradient
        results.append((loss.item(), hidden.grad.float(), weight.grad.clone()))
    (lf, hf, wf), (lr, hr, wr) = results
    out.append({"block": block, "vocab": vocab, "dtype": str(dtype), "loss": [lf, lr],
                "hidden_err": ((hf - hr).abs().max() / hr.abs().max()).item(),
                "weight_err": ((wf - wr).abs().max() / wr.abs().max()).item(),
                "finite": bool(torch.isfinite(hf).all() and torch.isfinite(wf).all())})
print(json.dumps(out))
"""


def run_interpreted(child: str):
    """Run a child script under Triton's CPU interpreter; returns the JSON of its last output line."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", child, str(REPO)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_fused_softcapped_cross_entropy_matches_plain_head_loss():
    cases = run_interpreted(CHILD)
    assert len(cases) == 8
    for case in cases:
        fused, plain = case["loss"]
        exact = case["dtype"] == "torch.float32"
        assert fused == pytest.approx(plain, rel=1e-5 if exact else 1e-3), case
        tol = 1e-5 if exact else 2e-2  # bf16: the gradient of the logits is rounded to bf16 on both paths
        assert case["hidden_err"] < tol and case["weight_err"] < tol, case
        assert case["finite"], case


SELF_CHECK_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import train_gpt as tg
cpu = torch.device("cpu")
out = {"good": tg.fused_ce_self_check(cpu, 300, 30.0)}
tg.FUSED_CE_CONFIG = {"block": 48, "num_warps": 4}  # not a power of two: Triton refuses the kernel
out["broken_kernel"] = tg.fused_ce_self_check(cpu, 300, 30.0)
tg.FUSED_CE_CONFIG = {"block": 2048, "num_warps": 8}
plain = tg.head_loss
tg.fused_head_loss = lambda h, w, t, cap: 1.5 * plain(h, w, t, cap)  # runs, but computes the wrong thing
out["wrong_numbers"] = tg.fused_ce_self_check(cpu, 300, 30.0)
print(json.dumps(out))
"""


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_fused_ce_self_check_accepts_the_kernel_and_rejects_broken_ones():
    """On GPU, build_runtime only uses the fused loss after this check; a failure falls back to the
    plain path with a warning instead of stopping the run."""
    out = run_interpreted(SELF_CHECK_CHILD)
    assert out["good"] is None
    assert out["broken_kernel"] and "Error" in out["broken_kernel"]
    assert out["wrong_numbers"] == "its loss differs from the plain path's"


def test_build_runtime_falls_back_when_the_self_check_fails(capsys):
    """A 'cuda' device on this CPU machine: the self-check cannot even allocate, so the run must go on with
    the plain loss and one warning line, not stop."""
    runtime = tg.build_runtime(tiny_h(COMPILE="0"), torch.device("cuda"))
    assert "fused_ce:0" in runtime.describe() and runtime.head_loss is tg.head_loss
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "fused cross entropy disabled" in warning[0], warning
