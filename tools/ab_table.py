"""An A/B of two settings from their seed logs: each stage's val_bpb, steps, tokens/s and eval time, and B - A.

    python tools/ab_table.py --a a/train_seed42.log --b b/train_seed42.log
    python tools/ab_table.py --a base/*.log --b change/*.log        # paired by seed

Logs are paired by their seed; a seed that only one side has is an error. Tokens/s come from the logged
step times, before recurrence switches on (steps 50 to the last one logged before the `layer_loop:enabled`
line) and after it (the first step logged after it to the last), times the logged TRAIN_BATCH_TOKENS. On one
card the same file moves about 0.002 bpb between machines (notes/quality.md, late evening of 2026-12-03), so
the table also prints both arms' tokens/s: if they differ by more than the change should cost, the two runs
probably did not share a machine. Exit status 0, or 2 when a log is incomplete or the seeds do not pair.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.logparse import RunLog, parse_text

STAGE_COLUMNS = ("pre_quant", "quantized", "sliding", "ttt")
FIRST_TIMED_STEP = 50  # the first steps include the allocator's and the compiled graphs' first calls


def throughput(log: RunLog, text: str) -> tuple[float | None, float | None]:
    """(tokens/s before recurrence, tokens/s with it) from the logged step times; None where too few steps."""
    batch = int(log.setting("TRAIN_BATCH_TOKENS", 0))
    loop = re.search(r"^layer_loop:enabled step:(\d+)", text, re.M)
    switch = int(loop.group(1)) if loop else None
    times = [(step, ms) for step, _, ms in log.train if step >= FIRST_TIMED_STEP]

    def rate(points):
        if len(points) < 2 or not batch:
            return None
        (s0, t0), (s1, t1) = points[0], points[-1]
        return batch * (s1 - s0) / ((t1 - t0) / 1000)

    before = [p for p in times if switch is None or p[0] < switch]
    after = [p for p in times if switch is not None and p[0] > switch]
    return rate(before), rate(after)


def summary(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    log = parse_text(text, path)  # one read: the throughput needs the raw lines too
    if not log.complete or log.seed is None:
        raise ValueError(f"{path}: not a complete seed log (no run_complete line or no SEED)")
    row = {"seed": log.seed, "steps": log.steps, "bytes": log.total_bytes,
           "eval_s": log.eval_total["time_ms"] / 1000 if log.eval_total else None}
    row["pre_tok_s"], row["loop_tok_s"] = throughput(log, text)
    for key in STAGE_COLUMNS:
        row[key] = log.stages[key].val_bpb if key in log.stages else None
    return row


def pair(a_paths: list[str], b_paths: list[str]) -> list[tuple[dict, dict]]:
    a = {r["seed"]: r for r in map(summary, a_paths)}
    b = {r["seed"]: r for r in map(summary, b_paths)}
    if set(a) != set(b) or len(a) != len(a_paths) or len(b) != len(b_paths):
        raise ValueError(f"the seeds do not pair one to one: A has {sorted(a)}, B has {sorted(b)}")
    return [(a[s], b[s]) for s in sorted(a)]


def _fmt(value, kind: str) -> str:
    if value is None:
        return "—"
    return {"bpb": f"{value:.5f}", "delta": f"{value:+.5f}", "int": f"{value:,}", "tok": f"{value / 1e3:,.0f} K",
            "s": f"{value:.1f}", "pct": f"{value:+.1f} %"}[kind]


def table(pairs: list[tuple[dict, dict]]) -> str:
    head = ["seed", "arm", "steps", *STAGE_COLUMNS, "bytes", "tok/s pre-loop", "tok/s loop", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    deltas = {key: [] for key in STAGE_COLUMNS}
    for a, b in pairs:
        for arm, r in (("A", a), ("B", b)):
            cells = [str(r["seed"]), arm, _fmt(r["steps"], "int"), *(_fmt(r[k], "bpb") for k in STAGE_COLUMNS),
                     _fmt(r["bytes"], "int"), _fmt(r["pre_tok_s"], "tok"), _fmt(r["loop_tok_s"], "tok"), _fmt(r["eval_s"], "s")]
            lines.append("| " + " | ".join(cells) + " |")
        cells = [str(a["seed"]), "B − A", _fmt(b["steps"] - a["steps"], "int")]
        for key in STAGE_COLUMNS:
            d = b[key] - a[key] if a[key] is not None and b[key] is not None else None
            if d is not None:
                deltas[key].append(d)
            cells.append(_fmt(d, "delta"))
        cells.append(_fmt(b["bytes"] - a["bytes"], "int") if a["bytes"] and b["bytes"] else "—")
        for key in ("pre_tok_s", "loop_tok_s"):
            cells.append(_fmt(100 * (b[key] / a[key] - 1), "pct") if a[key] and b[key] else "—")
        cells.append(_fmt(b["eval_s"] - a["eval_s"], "s") if a["eval_s"] and b["eval_s"] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if len(pairs) > 1:
        means = [_fmt(sum(v) / len(v), "delta") if v else "—" for v in deltas.values()]
        lines.append("| mean | B − A | | " + " | ".join(means) + " | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", nargs="+", required=True, help="the baseline's seed logs")
    parser.add_argument("--b", nargs="+", required=True, help="the change's seed logs")
    args = parser.parse_args(argv)
    try:
        print(table(pair(args.a, args.b)))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
