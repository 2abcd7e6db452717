"""Turn the seed logs of one configuration into the challenge's submission.json and a results table.

    python tools/summarize.py logs/train_seed42.log logs/train_seed314.log logs/train_seed999.log \\
        --name "SP8192 recurrence + score-first TTT" --author "Jane Doe" --github-id janedoe \\
        --technique "what the run does, one paragraph" --out submission.json

A seed's score is its quantized_ttt val_bpb if the run did TTT, else quantized_sliding_window, else
quantized. The `compliance` block is computed from the logs, never typed. The markdown table goes to
stdout (pack_record.py puts it in the record's README).

Refuses (exit 2, naming the file and the difference) a log that is incomplete (no run_complete, or a
stage missing) and logs of different configurations: a different `script:` sha256 or any `settings`
line other than SEED and RUN_ID.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.logparse import ARTIFACT_LIMIT_BYTES, CHALLENGE_TIME_LIMIT_MS, RunLog, parse_log

TRACK = "10min_16mb"
PER_SEED_SETTINGS = ("SEED", "RUN_ID")  # the only settings allowed to differ between seeds


class Refused(Exception):
    """The logs can't make a submission; the message says which file and why."""


def config_differences(a: RunLog, b: RunLog) -> list[str]:
    """Why b is not the same configuration as a (empty when it is)."""
    diffs = []
    sha_a, sha_b = (a.script or {}).get("sha256"), (b.script or {}).get("sha256")
    if sha_a != sha_b:
        diffs.append(f"script sha256 {sha_b} differs from {sha_a} in {a.path}")
    for name in sorted(set(a.settings) | set(b.settings)):
        if name in PER_SEED_SETTINGS:
            continue
        va, vb = a.settings.get(name, "<absent>"), b.settings.get(name, "<absent>")
        if va != vb:
            diffs.append(f"setting {name}={vb} differs from {name}={va} in {a.path}")
    return diffs


def load_runs(paths) -> list[RunLog]:
    """Parse seed logs, refusing incomplete ones, mixed configurations and repeated seeds; sorted by seed."""
    if not paths:
        raise Refused("no logs given")
    runs = []
    for path in paths:
        if not Path(path).is_file():
            raise Refused(f"{path}: no such file")
        run = parse_log(path)
        lacking = run.missing()
        if lacking:
            detail = "".join(f"\n  error: {e}" for e in run.errors[-3:])
            raise Refused(f"{path}: incomplete log, missing: {', '.join(lacking)}{detail}")
        if runs:
            diffs = config_differences(runs[0], run)
            if diffs:
                raise Refused(f"{path}: not the same configuration as {runs[0].path}:\n  " + "\n  ".join(diffs))
        clash = next((r for r in runs if r.seed == run.seed), None)
        if clash:
            raise Refused(f"{path}: SEED={run.seed} repeats the seed of {clash.path}")
        runs.append(run)
    return sorted(runs, key=lambda r: r.seed)


def _s(ms):
    return None if ms is None else round(ms / 1000, 3)


def seed_result(run: RunLog) -> dict:
    final, st = run.final, run.stages
    bpb = lambda key: st[key].val_bpb if key in st else None  # noqa: E731
    return {
        "val_bpb": final.val_bpb,
        "val_loss": final.val_loss,
        "final_stage": run.final_stage,
        "artifact_bytes": run.total_bytes,
        "code_bytes": run.code_bytes,
        "model_bytes": run.model_bytes,
        "steps": run.steps,
        "train_time_s": _s(run.train_time_ms),
        "calibration_time_s": _s(run.train_budget["calibration_ms"]),
        "eval_time_s": _s(run.eval_total["time_ms"]),
        "pre_quant_val_bpb": bpb("pre_quant"),
        "quantized_val_bpb": bpb("quantized"),
        "sliding_val_bpb": bpb("sliding"),
        "ttt_val_bpb": bpb("ttt"),
        "val_tokens": final.val_tokens,
        "val_bytes": final.val_bytes,
    }


def ttt_is_score_first(legality: dict) -> bool:
    return (legality.get("score_first") == "1" and legality.get("each_token_once") == "1"
            and legality.get("updates_before_score") == "0")


def compliance(runs: list[RunLog]) -> dict:
    """Each rule must hold for every seed; all facts come from the logs."""
    uses_ttt = [r.ttt_legality is not None for r in runs]
    if not any(uses_ttt):
        score_first = "not used"
    else:
        score_first = all(uses_ttt) and all(ttt_is_score_first(r.ttt_legality) for r in runs)
    return {
        "train_under_600s": all(r.train_total_ms <= CHALLENGE_TIME_LIMIT_MS for r in runs),
        "eval_under_600s": all(r.eval_total["time_ms"] <= CHALLENGE_TIME_LIMIT_MS for r in runs),
        "artifact_under_16mb": all(r.total_bytes <= ARTIFACT_LIMIT_BYTES and r.artifact["fits"] for r in runs),
        "score_first_ttt": score_first,
        "no_pre_quant_ttt": all(r.compliance.get("pre_quant_val_training") == "none" for r in runs),
        "train_data_closed_before_eval": all(r.compliance.get("train_data_closed_before_eval") == "1" for r in runs),
        "three_seeds": len(runs) >= 3,
    }


def hardware(run: RunLog) -> str:
    count = run.env.get("world_size") or run.env.get("gpus") or "1"
    return f"{count}x{run.env.get('device', 'unknown device')}"


def build_submission(runs, name, author, github_id, technique, date=None) -> dict:
    scores = [r.final.val_bpb for r in runs]
    losses = [r.final.val_loss for r in runs]
    return {
        "name": name,
        "author": author,
        "github_id": github_id,
        "date": date or datetime.date.today().isoformat(),
        "track": TRACK,
        "val_bpb": round(statistics.mean(scores), 5),
        "val_bpb_std": round(statistics.stdev(scores), 5) if len(scores) > 1 else 0.0,
        "val_loss": round(statistics.mean(losses), 5),
        "bytes_total": max(r.total_bytes for r in runs),
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): seed_result(r) for r in runs},
        "hardware": hardware(runs[0]),
        "pytorch_version": runs[0].env.get("torch", "unknown"),
        "technique_summary": technique,
        "script_sha256": runs[0].script.get("packed_sha256"),  # the file shipped in the record
        "source_sha256": runs[0].script.get("sha256"),  # the readable train_gpt.py the logs name
        "compliance": compliance(runs),
    }


def results_table(runs: list[RunLog]) -> str:
    """Markdown: seed | steps | pre-quant | quantized | sliding | TTT | artifact bytes, plus a mean row."""
    def bpb(values):
        values = [v for v in values if v is not None]
        return f"{statistics.mean(values):.5f}" if values else "-"

    cols = ("pre_quant", "quantized", "sliding", "ttt")
    lines = ["| seed | steps | pre-quant | quantized | sliding | TTT | artifact bytes |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        cells = [bpb([r.stages[c].val_bpb if c in r.stages else None]) for c in cols]
        lines.append(f"| {r.seed} | {r.steps} | " + " | ".join(cells) + f" | {r.total_bytes:,} |")
    means = [bpb([r.stages[c].val_bpb if c in r.stages else None for r in runs]) for c in cols]
    steps = round(statistics.mean(r.steps for r in runs))
    lines.append(f"| **mean** | {steps} | " + " | ".join(means) + f" | {max(r.total_bytes for r in runs):,} (max) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("logs", nargs="+", help="one log per seed (train_seedN.log or logs/<RUN_ID>.txt)")
    ap.add_argument("--name", default="", help="submission name")
    ap.add_argument("--author", default="", help="author's name")
    ap.add_argument("--github-id", default="", help="author's GitHub id")
    ap.add_argument("--technique", default="", help="technique summary, one paragraph")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
    ap.add_argument("--out", default="submission.json", help="where to write (default: submission.json)")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.logs)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sub = build_submission(runs, args.name, args.author, args.github_id, args.technique, args.date)
    Path(args.out).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    print(results_table(runs))
    print(f"\nval_bpb {sub['val_bpb']:.5f} (std {sub['val_bpb_std']:.5f}, {len(runs)} seeds) -> {args.out}")
    failed = [k for k, v in sub["compliance"].items() if v is False]
    if failed:
        print(f"warning: compliance fails: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
