"""Do two runs follow the same training-loss curve? For checking that a speed change left the numerics alone.

    python tools/compare_curves.py logs/plain.txt logs/fast.txt --noise logs/fast_seed2.txt --steps 200

Compares train_loss at the steps both logs have (up to --steps). The reference for "within noise" is the
gap between the first log and --noise, a run that differs only in something that should not matter (the
seed); without --noise only the gaps are printed. Verdict: the mean absolute gap of the tested pair is
at most the noise pair's. Exit status 0 = same within noise (or no noise given), 1 = not, 2 = bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.logparse import parse_log


def train_curve(path: str, max_step: int) -> dict[int, float]:
    return {step: loss for step, loss, _ in parse_log(path).train if step <= max_step}


def curve_gap(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean and max |a - b| over the steps both curves have, and where the max is."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two logs share no logged training step")
    gaps = {s: abs(a[s] - b[s]) for s in common}
    worst = max(gaps, key=gaps.get)
    return {"steps": len(common), "first": common[0], "last": common[-1],
            "mean_abs": sum(gaps.values()) / len(gaps), "max_abs": gaps[worst], "max_at": worst}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="log of the unoptimized (plain) path")
    ap.add_argument("candidate", help="log of the optimized path, same seed and settings")
    ap.add_argument("--noise", help="log of the reference setup with another seed: the noise yardstick")
    ap.add_argument("--steps", type=int, default=200, help="compare steps 1..N (default 200)")
    args = ap.parse_args(argv)
    try:
        ref, cand = train_curve(args.reference, args.steps), train_curve(args.candidate, args.steps)
        result = {"tested": curve_gap(ref, cand)}
        if args.noise:
            result["noise"] = curve_gap(ref, train_curve(args.noise, args.steps))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "noise" in result:
        result["within_noise"] = result["tested"]["mean_abs"] <= result["noise"]["mean_abs"]
    print(json.dumps(result))
    return 0 if result.get("within_noise", True) else 1


if __name__ == "__main__":
    sys.exit(main())
