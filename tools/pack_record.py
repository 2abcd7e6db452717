"""Build a record folder for the challenge from one configuration's seed logs.

    python tools/pack_record.py logs/train_seed42.log logs/train_seed314.log logs/train_seed999.log \\
        --name "SP8192 recurrence + score-first TTT" --author "Jane Doe" --github-id janedoe \\
        --technique "one paragraph on what the run does"

Writes records/<date>_<name>/ (or --out DIR) with:
  train_gpt.py          the packed script: train_gpt.pack_source(<readable source>), imported from --script
                        (or --packed FILE, a copy packed elsewhere, e.g. by `python train_gpt.py --pack`)
  README.md             results table, technique summary, compliance, how to reproduce
  submission.json       as tools/summarize.py makes it
  train_seed<SEED>.log  one log per seed
  requirements.txt      copied from the repository root
  tokenizer/<MODEL>     with --tokenizer MODEL: the SentencePiece model the runs used (its sha256 must be the
                        one every log's `data:` line names), for runs on shards made with a tokenizer of their
                        own, e.g. case operators (data/prepare.py --case-ops)

Refuses (exit 2) when the logs don't summarize (incomplete, mixed configurations), when the readable
script's sha256 is not the one the logs name, when the packed file's sha256 or size differs from the
logs' `script:` line (packed_sha256, packed_bytes), or when a seed's artifact bytes are not code bytes +
model bytes. The folder is built beside its destination and only moved into place once every check
passes, so a refusal leaves nothing behind.

The README names the commit that produced the logs (tools/provenance.py), gives each seed's command
as the logs record it (the same function summarize uses), and says which Python the packed copy needs:
its program is compiled with the Python running this tool, and the runs' Python is named.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.provenance import python_support
from tools.summarize import Refused, build_submission, load_runs, results_table

REPO_DIR = Path(__file__).resolve().parent.parent


def load_pack_source(script: Path):
    """train_gpt.pack_source from the given script file (importing it runs no training)."""
    name = "train_gpt" if script.resolve() == REPO_DIR / "train_gpt.py" else "train_gpt_to_pack"
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", "")).resolve() != script.resolve():
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    if not hasattr(module, "pack_source"):
        raise Refused(f"{script} has no pack_source(source_text) function")
    return module.pack_source


def folder_name(date: str, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return f"{date}_{slug or 'submission'}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_runs_against_script(runs, source: bytes, script: Path) -> None:
    logged = runs[0].script
    if sha256_hex(source) != logged.get("sha256"):
        raise Refused(f"{script}: sha256 {sha256_hex(source)} is not the sha256 {logged.get('sha256')} in "
                      f"{runs[0].path}: the script changed after the runs")
    for run in runs:
        if run.total_bytes != run.code_bytes + run.model_bytes:
            raise Refused(f"{run.path}: artifact {run.total_bytes} bytes != code {run.code_bytes} + model "
                          f"{run.model_bytes} = {run.code_bytes + run.model_bytes} bytes")


def check_tokenizer(tokenizer: Path, runs) -> str:
    """The tokenizer's sha256, refused unless it is the one every run logged."""
    if not tokenizer.is_file():
        raise Refused(f"{tokenizer}: no such tokenizer file")
    digest = sha256_hex(tokenizer.read_bytes())
    logged = {run.data.get("tokenizer_sha256") for run in runs}
    if logged != {digest}:
        raise Refused(f"{tokenizer} has sha256 {digest}, but the logs name tokenizer_sha256 "
                      f"{', '.join(sorted(str(x) for x in logged))}: give the model the shards were made with")
    return digest


def check_folder(folder: Path, runs) -> None:
    """Every file present and non-empty; the packed script is the one the logs measured."""
    expected = ["train_gpt.py", "README.md", "submission.json", "requirements.txt"]
    expected += [f"train_seed{r.seed}.log" for r in runs]
    absent = [name for name in expected if not (folder / name).is_file() or (folder / name).stat().st_size == 0]
    if absent:
        raise Refused(f"{folder}: missing or empty: {', '.join(absent)}")
    packed = (folder / "train_gpt.py").read_bytes()
    logged = runs[0].script
    if sha256_hex(packed) != logged.get("packed_sha256") or len(packed) != logged.get("packed_bytes"):
        raise Refused(f"packed train_gpt.py is {len(packed)} bytes, sha256 {sha256_hex(packed)}; "
                      f"{runs[0].path} reports packed_bytes:{logged.get('packed_bytes')} "
                      f"packed_sha256:{logged.get('packed_sha256')} (pack with the script the logs name, or pass "
                      "--packed with the copy made where the runs were)")
    for run in runs:
        if run.code_bytes != len(packed):
            raise Refused(f"{run.path}: Code size {run.code_bytes} bytes, but the packed train_gpt.py is {len(packed)} bytes")


def readme(sub: dict, table: str, runs, packed: str, tokenizer: str = "") -> str:
    c = sub["compliance"]
    yes = lambda ok: "yes" if ok is True else (ok if isinstance(ok, str) else "**NO**")  # noqa: E731
    worst_train = max(r.train_total_ms for r in runs) / 1000
    worst_eval = max(r.eval_total["time_ms"] for r in runs) / 1000
    credit = " ".join(x for x in (sub["author"], f"(@{sub['github_id']})" if sub["github_id"] else "") if x)
    credit = f"{credit}, {sub['date']}" if credit else sub["date"]
    why = "".join(f"\n- {reason}" for reason in sub["non_record_reasons"])
    track = f"Track {sub['track']}." + (f" Not a record run:{why}\n" if why else "")
    commands = "\n".join(sub["reproduce"][str(r.seed)] for r in runs)
    return f"""# {sub['name']}

**val_bpb {sub['val_bpb']:.5f}** (std {sub['val_bpb_std']:.5f}, {len(runs)} seeds) on {sub['hardware']},
PyTorch {sub['pytorch_version']}. {credit}.

{track}
Produced by commit `{sub['source_commit']}` (its `train_gpt.py`, sha256 `{sub['source_sha256']}`, is the
script every log names; commit found by: {sub['source_commit_found_by']}).

## Technique

{sub['technique_summary'] or '(no summary given)'}

## Results (val_bpb; the score is the last stage run)

{table}

## Compliance (computed from the logs)

- training + GPTQ calibration under 600 s: {yes(c['train_under_600s'])} (slowest seed {worst_train:.1f} s)
- evaluation under 600 s: {yes(c['eval_under_600s'])} (slowest seed {worst_eval:.1f} s)
- artifact (code + compressed model) at most 16,000,000 bytes: {yes(c['artifact_under_16mb'])} (largest {sub['bytes_total']:,})
- test-time training is score-first, each token scored once: {yes(c['score_first_ttt'])}
- no training on validation data before quantization: {yes(c['no_pre_quant_ttt'])}
- at least three seeds: {yes(c['three_seeds'])}

## Reproduce

`train_gpt.py` here is the packed copy of that commit's script; it {python_support(packed, sub['python_version'])}.
One command per seed, run in this folder (DATA_DIR must hold the data); the settings in it are
{sub['reproduce_settings_from']}:

```
pip install -r requirements.txt
{commands}
```
{tokenizer}
Every setting of each run is listed in the `settings:` block of its log. In the repository,
`python tools/provenance.py --check-packed <this folder>` checks that this `train_gpt.py` unpacks to
that commit's program.
"""


def build(logs, name, author="", github_id="", technique="", date=None, out=None,
          script: Path = REPO_DIR / "train_gpt.py", requirements: Path = REPO_DIR / "requirements.txt",
          force: bool = False, packed: Path | None = None, repo: Path = REPO_DIR, tokenizer: Path | None = None) -> Path:
    runs = load_runs(logs)
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    digest = check_tokenizer(tokenizer, runs) if tokenizer is not None else None
    date = date or datetime.date.today().isoformat()
    out = Path(out) if out else REPO_DIR / "records" / folder_name(date, name)
    script, requirements = Path(script), Path(requirements)
    if not script.is_file():
        raise Refused(f"{script}: no such script")
    if not requirements.is_file():
        raise Refused(f"{requirements}: no such file (the record ships the repository's requirements.txt)")
    if out.exists() and any(out.iterdir()) and not force:
        raise Refused(f"{out} exists and is not empty (use --force to replace it)")
    check_runs_against_script(runs, script.read_bytes(), script)
    if packed is not None:
        packed_bytes = Path(packed).read_bytes()
    else:  # read as the script does for its own Code size: text mode, UTF-8
        packed_bytes = load_pack_source(script)(script.read_text(encoding="utf-8")).encode("utf-8")

    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        (staging / "train_gpt.py").write_bytes(packed_bytes)
        sub = build_submission(runs, name, author, github_id, technique, date, repo)
        (staging / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        note = ""
        if tokenizer is not None:
            (staging / "tokenizer").mkdir()
            shutil.copyfile(tokenizer, staging / "tokenizer" / tokenizer.name)
            note = (f"\nThe runs read shards made with the SentencePiece model `tokenizer/{tokenizer.name}` "
                    f"(sha256 `{digest}`, as each log's `data:` line says); DATA_DIR must hold shards made with it "
                    "(`data/prepare.py` in the repository makes them) and its copy under `tokenizers/`.\n")
        (staging / "README.md").write_text(readme(sub, results_table(runs), runs, packed_bytes.decode("utf-8"), note),
                                           encoding="utf-8")
        for run in runs:
            shutil.copyfile(run.path, staging / f"train_seed{run.seed}.log")
        shutil.copyfile(requirements, staging / "requirements.txt")
        check_folder(staging, runs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("logs", nargs="+", help="one log per seed")
    ap.add_argument("--name", required=True, help="submission name (also names the folder)")
    ap.add_argument("--author", default="")
    ap.add_argument("--github-id", default="")
    ap.add_argument("--technique", default="", help="technique summary, one paragraph")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
    ap.add_argument("--out", default=None, help="folder to create (default: records/<date>_<name>)")
    ap.add_argument("--script", default=str(REPO_DIR / "train_gpt.py"), help="readable script the logs name")
    ap.add_argument("--requirements", default=str(REPO_DIR / "requirements.txt"))
    ap.add_argument("--packed", default=None, help="use this already packed copy instead of calling pack_source")
    ap.add_argument("--force", action="store_true", help="replace an existing, non-empty --out folder")
    ap.add_argument("--repo", default=str(REPO_DIR), help="git checkout whose history holds the logs' script")
    ap.add_argument("--tokenizer", default=None, help="ship this SentencePiece model (the logs' tokenizer_sha256) in tokenizer/")
    args = ap.parse_args(argv)
    try:
        out = build(args.logs, args.name, args.author, args.github_id, args.technique, args.date, args.out,
                    Path(args.script), Path(args.requirements), args.force, args.packed, Path(args.repo),
                    Path(args.tokenizer) if args.tokenizer else None)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
