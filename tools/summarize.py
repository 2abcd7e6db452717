"""Turn the seed logs of one configuration into the challenge's submission.json and a results table.

    python tools/summarize.py logs/train_seed42.log logs/train_seed314.log logs/train_seed999.log \\
        --name "SP8192 recurrence + score-first TTT" --author "Jane Doe" --github-id janedoe \\
        --technique "what the run does, one paragraph" --out submission.json

The JSON goes to stdout unless --out PATH is given; an existing PATH is only replaced with --force.
The markdown results table and a one-line summary go to stdout after --out, else to stderr
(pack_record.py puts the table in the record's README).

Only name, author, github_id, technique_summary and date are typed; every other field is computed from
the logs: the score (a seed's quantized_ttt val_bpb if the run did TTT, else quantized_sliding_window,
else quantized), the script's sha256 and the commit that holds it (tools/provenance.py), the track,
hardware, world size, data (FineWeb or not), training and evaluation seconds, the command that
reproduces each seed, and the compliance block.

Refuses (exit 2, naming the file and the difference) a log that is incomplete (no run_complete, or a
stage missing), logs of different configurations (a different `script:` sha256 or any `settings` line
other than SEED and RUN_ID), and logs whose commit can't be established.
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
from tools.provenance import (REPO_DIR, ProvenanceError, data_facts, explicit_settings, launcher, reproduce_command,
                              resolve_commit)

# Track names as the challenge's records use them (records/track_10min_16mb, records/track_non_record_16mb).
RECORD_TRACK = "10min_16mb"
NON_RECORD_TRACK = "non_record_16mb"
RECORD_WORLD_SIZE = 8
RECORD_DEVICE = "H100"
METADATA = ("name", "author", "github_id", "technique_summary", "date")  # typed, not computed
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


def _logged_rule(runs: list[RunLog], key: str, good: str):
    """True/False when every seed's compliance: line has `key`, else 'not logged' (older or newer logs)."""
    values = [r.compliance.get(key) for r in runs]
    return "not logged" if None in values else all(v == good for v in values)


def compliance(runs: list[RunLog]) -> dict:
    """Each rule must hold for every seed; all facts come from the logs."""
    uses_ttt = [r.ttt_legality is not None for r in runs]
    if not any(uses_ttt):
        score_first = "not used"
    else:
        score_first = all(uses_ttt) and all(ttt_is_score_first(r.ttt_legality) for r in runs)
    # The compliance: line said pre_quant_val_training:none before it said val_training_before_quant:0.
    no_pre_quant = all(r.compliance.get("pre_quant_val_training") == "none"
                       or r.compliance.get("val_training_before_quant") == "0" for r in runs)
    return {
        "train_under_600s": all(r.train_total_ms <= CHALLENGE_TIME_LIMIT_MS for r in runs),
        "eval_under_600s": all(r.eval_total["time_ms"] <= CHALLENGE_TIME_LIMIT_MS for r in runs),
        "artifact_under_16mb": all(r.total_bytes <= ARTIFACT_LIMIT_BYTES and r.artifact["fits"] for r in runs),
        "score_first_ttt": score_first,
        "no_pre_quant_ttt": no_pre_quant,
        "train_data_closed_before_eval": _logged_rule(runs, "train_data_closed_before_eval", "1"),
        "three_seeds": len(runs) >= 3,
    }


def hardware(run: RunLog) -> str:
    count = run.env.get("world_size") or run.env.get("gpus") or "1"
    return f"{count}x{run.env.get('device', 'unknown device')}"


def track(runs: list[RunLog], data: dict) -> tuple[str, list[str]]:
    """(track, why it is not the record track). The record track needs what the challenge measures:
    8 H100-class GPUs, FineWeb validation data, training and evaluation each within 600 s, and an
    artifact within 16,000,000 bytes, in every seed."""
    why = []
    sizes = sorted({int(r.env.get("world_size") or 1) for r in runs})
    devices = sorted({r.env.get("device", "unknown device") for r in runs})
    if sizes != [RECORD_WORLD_SIZE]:
        why.append(f"world size {'/'.join(map(str, sizes))}, not {RECORD_WORLD_SIZE}")
    if not all(RECORD_DEVICE in d for d in devices):
        why.append(f"device {', '.join(devices)}, not {RECORD_DEVICE}")
    if not data["fineweb"]:
        why.append("not FineWeb data: " + "; ".join(data["why_not"]))
    slowest_train = max(r.train_total_ms for r in runs)
    if slowest_train > CHALLENGE_TIME_LIMIT_MS:
        why.append(f"training took {slowest_train / 1000:.1f} s > 600 s")
    slowest_eval = max(r.eval_total["time_ms"] for r in runs)
    if slowest_eval > CHALLENGE_TIME_LIMIT_MS:
        why.append(f"evaluation took {slowest_eval / 1000:.1f} s > 600 s")
    largest = max(r.total_bytes for r in runs)
    if largest > ARTIFACT_LIMIT_BYTES:
        why.append(f"artifact {largest:,} bytes > {ARTIFACT_LIMIT_BYTES:,}")
    return (NON_RECORD_TRACK if why else RECORD_TRACK), why


def measured_compliance(runs: list[RunLog]) -> dict:
    """The compliance: and ttt:legality lines as each seed logged them (absent lines are left out)."""
    out = {}
    for r in runs:
        lines = {k: v for k, v in (("compliance", r.compliance), ("ttt_legality", r.ttt_legality)) if v}
        if lines:
            out[str(r.seed)] = lines
    return out


def provenance(runs: list[RunLog], repo: Path = REPO_DIR) -> dict:
    """Script sha256 and commit (all seeds ran one script: load_runs checks the sha256)."""
    try:
        prov = resolve_commit(runs[0], repo)
    except ProvenanceError as e:
        raise Refused(str(e)) from None
    return {"sha256": prov.sha256, "commit": prov.commit, "commit_found_by": prov.how, "commit_checked": prov.checked}


def reproduce(runs: list[RunLog], repo: Path = REPO_DIR) -> tuple[dict, str]:
    """(seed -> command, where its settings were read from)."""
    try:
        return {str(r.seed): reproduce_command(r, repo) for r in runs}, explicit_settings(runs[0], repo)[1]
    except ProvenanceError as e:
        raise Refused(str(e)) from None


def build_submission(runs, name, author, github_id, technique, date=None, repo: Path = REPO_DIR) -> dict:
    scores = [r.final.val_bpb for r in runs]
    losses = [r.final.val_loss for r in runs]
    data = data_facts(runs[0])
    track_name, not_record = track(runs, data)
    code = provenance(runs, repo)
    commands, settings_from = reproduce(runs, repo)
    return {
        "name": name,
        "author": author,
        "github_id": github_id,
        "date": date or datetime.date.today().isoformat(),
        "track": track_name,
        "non_record_reasons": not_record,
        "val_bpb": round(statistics.mean(scores), 5),
        "val_bpb_std": round(statistics.stdev(scores), 5) if len(scores) > 1 else 0.0,
        "val_loss": round(statistics.mean(losses), 5),
        "bytes_total": max(r.total_bytes for r in runs),
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): seed_result(r) for r in runs},
        "hardware": hardware(runs[0]),
        "world_size": int(runs[0].env.get("world_size") or 1),
        "launcher": launcher(runs[0])[0],
        "pytorch_version": runs[0].env.get("torch", "unknown"),
        "python_version": runs[0].env.get("python", "unknown"),
        "data": data,
        "train_seconds": _s(max(r.train_total_ms for r in runs)),  # slowest seed, training + GPTQ calibration
        "eval_seconds": _s(max(r.eval_total["time_ms"] for r in runs)),  # slowest seed, all evaluation
        "technique_summary": technique,
        "script_sha256": runs[0].script.get("packed_sha256"),  # the file shipped in the record
        "source_sha256": code["sha256"],  # the readable train_gpt.py the logs name
        "source_commit": code["commit"],  # a commit whose train_gpt.py has that sha256
        "source_commit_found_by": code["commit_found_by"],
        "source_commit_checked": code["commit_checked"],
        "reproduce": commands,  # seed -> command, run where train_gpt.py is
        "reproduce_settings_from": settings_from,
        "compliance": compliance(runs),
        "compliance_logged": measured_compliance(runs),
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


def write_new(path: Path, text: str, force: bool) -> None:
    """Write text to path; an existing file is only replaced with force (a tracked submission.json is
    never overwritten by accident)."""
    if path.exists() and not force:
        raise Refused(f"{path} exists: give --force to replace it, or another --out")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("logs", nargs="+", help="one log per seed (train_seedN.log or logs/<RUN_ID>.txt)")
    ap.add_argument("--name", default="", help="submission name")
    ap.add_argument("--author", default="", help="author's name")
    ap.add_argument("--github-id", default="", help="author's GitHub id")
    ap.add_argument("--technique", default="", help="technique summary, one paragraph")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
    ap.add_argument("--out", default=None, help="write the JSON here (default: print it to stdout)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--repo", default=str(REPO_DIR), help="git checkout whose history holds the logs' script")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.logs)
        sub = build_submission(runs, args.name, args.author, args.github_id, args.technique, args.date, Path(args.repo))
        text = json.dumps(sub, indent=2) + "\n"
        if args.out:
            write_new(Path(args.out), text, args.force)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = sys.stdout if args.out else sys.stderr  # stdout carries the JSON when there is no --out
    if not args.out:
        sys.stdout.write(text)
    print(results_table(runs), file=report)
    print(f"\nval_bpb {sub['val_bpb']:.5f} (std {sub['val_bpb_std']:.5f}, {len(runs)} seeds), track {sub['track']}"
          + (f" -> {args.out}" if args.out else ""), file=report)
    failed = [k for k, v in sub["compliance"].items() if v is False]
    if failed:
        print(f"warning: compliance fails: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
