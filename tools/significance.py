"""Is our result better than a previous record? One-sided Welch t-tests on per-seed val_bpb.

    python tools/significance.py logs/train_seed42.log logs/train_seed314.log logs/train_seed999.log \\
        --baseline 1.08079,1.08103,1.08118
    python tools/significance.py submission.json --baseline records/<previous>/submission.json

Ours: seed logs (their final scores) or one submission.json. Baseline: a submission.json or a comma
list. Improvement = mean(baseline) - mean(ours), in bpb and in nats per token
(nats = bpb * ln 2 * bytes_per_token). Bytes per token come from `--bytes-per-token` if given, else the
logs' `val_tokens:N val_bytes:M` lines (or a submission's seed_results), else 3.73 (FineWeb SP8192).

Two tests (SPEC section 1):
  record rule:   H0 improvement <= 0.005 nats/token; a record needs p < 0.01 (and >= 3 seeds);
  frontier rule: H0 improvement <= 0;                a new frontier row needs p < 0.25.
No scipy: the Student t tail comes from the regularized incomplete beta function (continued fraction).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.summarize import Refused, load_runs

DEFAULT_BYTES_PER_TOKEN = 3.73  # FineWeb SP8192 validation, SPEC section 1
RECORD_MARGIN_NATS = 0.005
RECORD_P = 0.01
FRONTIER_P = 0.25


# ------------------------------------------------------------------------------------------------
# Student t distribution without scipy
# ------------------------------------------------------------------------------------------------

def _beta_continued_fraction(a: float, b: float, x: float, max_terms: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of I_x(a, b) (even and odd terms), evaluated with the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, max_terms + 1):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            result *= step
        if abs(step - 1.0) < eps:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; use symmetry otherwise
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional, as in Welch)."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def welch_one_sided(ours, baseline, margin: float = 0.0) -> dict:
    """Test H0: mean(baseline) - mean(ours) <= margin against H1: it is larger (ours lower = better)."""
    if len(ours) < 2 or len(baseline) < 2:
        raise ValueError(f"Welch's test needs at least 2 values on each side (ours {len(ours)}, baseline {len(baseline)})")
    va, vb = statistics.variance(ours) / len(ours), statistics.variance(baseline) / len(baseline)
    diff = statistics.mean(baseline) - statistics.mean(ours)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical values on both sides: the answer is certain
        return {"t": math.copysign(math.inf, diff - margin), "df": math.inf, "p": 0.0 if diff > margin else 1.0}
    df = (va + vb) ** 2 / (va**2 / (len(ours) - 1) + vb**2 / (len(baseline) - 1))
    t = (diff - margin) / se
    return {"t": t, "df": df, "p": t_sf(t, df)}


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def _submission_scores(path: Path) -> tuple[list[float], float | None]:
    data = json.loads(path.read_text(encoding="utf-8"))
    results = data.get("seed_results")
    if not isinstance(results, dict) or not results:
        raise Refused(f"{path}: no seed_results with per-seed val_bpb; pass the values as a comma list instead")
    scores, tokens, nbytes = [], 0, 0
    for seed, res in results.items():
        value = res.get("val_bpb") if isinstance(res, dict) else res
        if not isinstance(value, (int, float)):
            raise Refused(f"{path}: seed {seed} has no numeric val_bpb")
        scores.append(float(value))
        if isinstance(res, dict) and res.get("val_tokens") and res.get("val_bytes"):
            tokens, nbytes = tokens + res["val_tokens"], nbytes + res["val_bytes"]
    return scores, (nbytes / tokens if tokens else None)


def load_scores(paths: list[str]) -> tuple[list[float], float | None]:
    """Per-seed final val_bpb and bytes per token (None if unknown) from logs or one submission.json."""
    if len(paths) == 1 and paths[0].endswith(".json"):
        return _submission_scores(Path(paths[0]))
    runs = load_runs(paths)
    ratios = [r.bytes_per_token() for r in runs]
    for r in runs:  # cross-check: val_loss / val_bpb = ln 2 * bytes per token
        implied, logged = r.final.val_loss / (r.final.val_bpb * math.log(2)), r.bytes_per_token()
        if logged and abs(implied / logged - 1) > 0.01:
            print(f"warning: {r.path}: val_bytes/val_tokens = {logged:.4f} but val_loss/(val_bpb*ln2) = "
                  f"{implied:.4f} bytes per token", file=sys.stderr)
    known = [x for x in ratios if x]
    return [r.final.val_bpb for r in runs], (statistics.mean(known) if known else None)


def load_baseline(spec: str) -> list[float]:
    path = Path(spec)
    if path.is_file():
        return _submission_scores(path)[0]
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise Refused(f"--baseline {spec!r} is neither a submission.json nor a comma list of val_bpb") from None


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def compare(ours, baseline, bytes_per_token: float) -> dict:
    nats_per_bpb = math.log(2) * bytes_per_token
    gain = statistics.mean(baseline) - statistics.mean(ours)
    record = welch_one_sided(ours, baseline, RECORD_MARGIN_NATS / nats_per_bpb)
    frontier = welch_one_sided(ours, baseline, 0.0)
    return {
        "ours_mean": statistics.mean(ours), "ours_std": statistics.stdev(ours), "ours_n": len(ours),
        "baseline_mean": statistics.mean(baseline), "baseline_std": statistics.stdev(baseline),
        "baseline_n": len(baseline), "bytes_per_token": bytes_per_token,
        "improvement_bpb": gain, "improvement_nats": gain * nats_per_bpb,
        "record": {**record, "met": record["p"] < RECORD_P and len(ours) >= 3},
        "frontier": {**frontier, "met": frontier["p"] < FRONTIER_P},
    }


def format_report(res: dict, bpt_source: str) -> str:
    def verdict(name, rule, test):
        word = "MET" if test["met"] else "NOT MET"
        return f"{name}: t={test['t']:.3f} df={test['df']:.2f} p={test['p']:.4g} -> {word} ({rule})"

    return "\n".join([
        f"ours:     mean {res['ours_mean']:.5f} bpb, std {res['ours_std']:.5f}, {res['ours_n']} seeds",
        f"baseline: mean {res['baseline_mean']:.5f} bpb, std {res['baseline_std']:.5f}, {res['baseline_n']} seeds",
        f"bytes per token: {res['bytes_per_token']:.4f} ({bpt_source})",
        f"improvement: {res['improvement_bpb']:+.5f} bpb = {res['improvement_nats']:+.5f} nats/token",
        verdict("record rule", f"needs improvement > {RECORD_MARGIN_NATS} nats at p < {RECORD_P}, >= 3 seeds", res["record"]),
        verdict("frontier rule", f"needs improvement > 0 at p < {FRONTIER_P}", res["frontier"]),
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("ours", nargs="+", help="our seed logs, or one submission.json")
    ap.add_argument("--baseline", required=True, help="previous record: submission.json or 'v1,v2,v3' (val_bpb)")
    ap.add_argument("--bytes-per-token", type=float, default=None,
                    help=f"override; default: from the logs, else {DEFAULT_BYTES_PER_TOKEN}")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead")
    args = ap.parse_args(argv)
    try:
        ours, logged_bpt = load_scores(args.ours)
        baseline = load_baseline(args.baseline)
        if args.bytes_per_token:
            bpt, source = args.bytes_per_token, "--bytes-per-token"
        elif logged_bpt:
            bpt, source = logged_bpt, "from val_bytes/val_tokens"
        else:
            bpt, source = DEFAULT_BYTES_PER_TOKEN, "default for FineWeb SP8192"
        res = compare(ours, baseline, bpt)
    except (Refused, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else format_report(res, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
