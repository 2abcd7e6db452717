"""Every committed log is tied to the code that produced it, and every submission.json to its logs.

Runs in CI on a fresh clone with full history: for each logs/*.log and records/*/train_seed*.log the
script sha256 it names is that of `git show <commit>:train_gpt.py` for its commit (logged, or found in
history); each record folder's packed train_gpt.py unpacks to that commit's program; each
submission.json is exactly what tools/summarize.py computes from its logs (hand edits fail). Without
git, or in a shallow clone, these tests fail and say so. The rest checks the history search and the
reproduce command on a small repository made here.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools import logparse, provenance, summarize  # noqa: E402

LOGS = sorted(REPO.glob("logs/*.log")) + sorted(REPO.glob("records/*/train_seed*.log"))
RECORDS = sorted(p.parent for p in REPO.glob("records/*/submission.json"))
SUBMISSIONS = [REPO] + RECORDS  # folders holding a submission.json and the logs it summarizes


def seed_logs(folder: Path) -> list[Path]:
    return sorted((folder / "logs").glob("*.log")) if folder == REPO else sorted(folder.glob("train_seed*.log"))


@pytest.fixture(scope="module")
def history():
    problem = provenance.history_problem(REPO)
    if problem:
        pytest.fail(f"cannot check which code produced the logs: {problem}")


def test_there_is_something_to_check():
    assert LOGS and RECORDS, "expected committed logs in logs/ and records/*/"


@pytest.mark.parametrize("log", LOGS, ids=lambda p: str(p.relative_to(REPO)))
def test_log_names_a_commit_whose_script_it_ran(log, history):
    run = logparse.parse_log(log)
    prov = provenance.resolve_commit(run, REPO)
    assert prov.checked
    assert hashlib.sha256(provenance.script_at(prov.commit, REPO)).hexdigest() == run.script["sha256"]


@pytest.mark.parametrize("folder", RECORDS, ids=lambda p: p.name)
def test_record_packed_copy_is_that_commits_program(folder, history):
    try:
        problems = provenance.check_packed(folder, REPO)
    except provenance.WrongPython as e:
        problems = check_packed_with_other_python(folder, e)
    assert problems == []


def check_packed_with_other_python(folder: Path, why: provenance.WrongPython) -> list[str]:
    """Re-run the check under the Python minor the packed copy was made with, if one is installed."""
    minor = str(why).split("reproduced on Python ")[1].split(" ")[0]
    python = shutil.which(f"python{minor}")
    probe = python and subprocess.run([python, "-c", "import brotli"], capture_output=True).returncode == 0
    if not probe:
        pytest.skip(f"{why}; no python{minor} with brotli on PATH to check it "
                    f"(python{minor} tools/provenance.py --check-packed {folder.relative_to(REPO)})")
    proc = subprocess.run([python, str(REPO / "tools/provenance.py"), "--check-packed", str(folder)],
                          capture_output=True, text=True)
    return [] if proc.returncode == 0 else [proc.stderr.strip() or proc.stdout.strip()]


@pytest.mark.parametrize("folder", SUBMISSIONS, ids=lambda p: str(p.relative_to(REPO)) or "top level")
def test_submission_json_is_what_summarize_computes(folder, history):
    stored = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    runs = summarize.load_runs([str(p) for p in seed_logs(folder)])
    typed = {key: stored.get(key, "") for key in summarize.METADATA}
    computed = summarize.build_submission(runs, typed["name"], typed["author"], typed["github_id"],
                                          typed["technique_summary"], typed["date"], REPO)
    differing = sorted(k for k in set(stored) | set(computed) if stored.get(k) != computed.get(k))
    assert not differing, (f"{folder / 'submission.json'} differs from what tools/summarize.py computes from its "
                           f"logs in {differing}: regenerate it (tools/summarize.py ... --out ... --force)")


# ------------------------------------------------------------------------------------------------ on a made repository

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


SCRIPT_V1 = '''import os
def _s(name, kind, default, help):
    return (name, default)
SETTINGS = [_s("SEED", int, 1337, "seed"), _s("DATA_DIR", str, "./data/", "data"), _s("TTT_ENABLED", bool, False, "ttt"),
            _s("MAX_WALLCLOCK_SECONDS", float, 600.0, "cap"), _s("NUM_LAYERS", int, 11, "depth"),
            _s("PRESET", str, "auto", "preset")]
SMALL_PRESET = {"NUM_LAYERS": 4}
'''
SCRIPT_V2 = SCRIPT_V1 + "# v2\n"


@pytest.fixture
def made_repo(tmp_path):
    if shutil.which("git") is None:
        pytest.fail("git is not installed: these tests need it")
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    commits = []
    for text in (SCRIPT_V1, SCRIPT_V1 + "x = 1\n", SCRIPT_V2):
        (repo / "train_gpt.py").write_text(text)
        git(repo, "add", "train_gpt.py")
        git(repo, "commit", "-qm", "c")
        commits.append(git(repo, "rev-parse", "HEAD"))
    (repo / "other.txt").write_text("later commit, same script\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-qm", "d")
    return repo, commits


def log_text(source: str, code: str | None = None, env_extra: str = "", env_set: str | None = None,
             settings=("SEED=42", "DATA_DIR='data_corpus'", "TTT_ENABLED=True", "MAX_WALLCLOCK_SECONDS=180.0",
                       "NUM_LAYERS=11"), world_size: int = 1) -> str:
    sha = hashlib.sha256(source.encode()).hexdigest()
    lines = [f"script: train_gpt.py sha256:{sha} bytes:{len(source)} packed_sha256:{'0' * 64} packed_bytes:10"]
    if code:
        lines.append(f"code: {code}")
    lines.append(f"env: python:3.11.7 torch:2.13.0 cuda:None device:cpu gpus:0 world_size:{world_size} host:h{env_extra}")
    lines += ["preset: record (PRESET set)", "settings:"] + [f"  {s}" for s in settings]
    if env_set is not None:
        lines.append(f"env_set: {env_set}")
    return "\n".join(lines) + "\n"


def test_commit_found_in_history_by_sha256_when_the_log_names_none(made_repo):
    repo, commits = made_repo
    prov = provenance.resolve_commit(logparse.parse_text(log_text(SCRIPT_V1)), repo)
    assert (prov.commit, prov.how, prov.checked) == (commits[0], "git history (sha256)", True)
    unknown = log_text(SCRIPT_V2, "commit:unknown dirty:unknown git_blob:" + provenance.git_blob_id(SCRIPT_V2.encode()))
    prov = provenance.resolve_commit(logparse.parse_text(unknown), repo)
    assert (prov.commit, prov.how) == (commits[2], "git history (blob)")  # the first commit holding it


def test_logged_commit_is_checked_against_its_script(made_repo):
    repo, commits = made_repo
    good = log_text(SCRIPT_V2, f"commit:{commits[2]} dirty:0 git_blob:x")
    assert provenance.resolve_commit(logparse.parse_text(good), repo).how == "logged"
    wrong = log_text(SCRIPT_V2, f"commit:{commits[0]} dirty:0 git_blob:x")
    with pytest.raises(provenance.ProvenanceError, match="that commit's train_gpt.py has sha256"):
        provenance.resolve_commit(logparse.parse_text(wrong), repo)
    absent = log_text(SCRIPT_V2, f"commit:{'1' * 40} dirty:0 git_blob:x")
    with pytest.raises(provenance.ProvenanceError, match="not in"):
        provenance.resolve_commit(logparse.parse_text(absent), repo)
    dirty = log_text(SCRIPT_V2 + "# local edit\n", f"commit:{commits[2]} dirty:1 git_blob:x")
    with pytest.raises(provenance.ProvenanceError, match="uncommitted"):
        provenance.resolve_commit(logparse.parse_text(dirty), repo)


def test_shallow_clone_and_no_git_are_reported(made_repo, tmp_path):
    repo, commits = made_repo
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    assert "shallow" in provenance.history_problem(shallow)
    with pytest.raises(provenance.ProvenanceError, match="shallow"):
        provenance.resolve_commit(logparse.parse_text(log_text(SCRIPT_V1)), shallow)
    nowhere = tmp_path / "not_a_repo"
    nowhere.mkdir()
    logged = log_text(SCRIPT_V1, f"commit:{commits[0]} dirty:0 git_blob:x")
    prov = provenance.resolve_commit(logparse.parse_text(logged), nowhere)
    assert prov.commit == commits[0] and not prov.checked and "not a git checkout" in prov.how


def test_reproduce_command_from_env_set_and_from_old_defaults(made_repo):
    repo, commits = made_repo
    new = log_text(SCRIPT_V1, f"commit:{commits[0]} dirty:0 git_blob:x", " launcher:torchrun backend:nccl",
                   "DATA_DIR=my data TTT_ENABLED=1 SEED=42", world_size=8)
    assert provenance.reproduce_command(logparse.parse_text(new), repo) == (
        "DATA_DIR='my data' SEED=42 TTT_ENABLED=1 torchrun --standalone --nproc_per_node=8 train_gpt.py")
    old = logparse.parse_text(log_text(SCRIPT_V1))  # no env_set: what differs from commit 0's defaults
    assert provenance.reproduce_command(old, repo) == (
        "DATA_DIR=data_corpus MAX_WALLCLOCK_SECONDS=180.0 SEED=42 TTT_ENABLED=1 python train_gpt.py")
    small = log_text(SCRIPT_V1, settings=("SEED=1", "NUM_LAYERS=4", "PRESET='small'"))  # 4: the small preset's default
    assert provenance.reproduce_command(logparse.parse_text(small), repo) == "PRESET=small SEED=1 python train_gpt.py"
    unknown = log_text(SCRIPT_V1, settings=("SEED=1", "NEW_KNOB=3"))
    with pytest.raises(provenance.ProvenanceError, match="NEW_KNOB is not in the SETTINGS"):
        provenance.reproduce_command(logparse.parse_text(unknown), repo)


def test_new_contract_lines_are_parsed():
    text = log_text(SCRIPT_V1, "commit:" + "a" * 40 + " dirty:0 git_blob:" + "b" * 40, " launcher:torchrun backend:nccl",
                    "SEED=42 TRAIN_FILES=/d/x_*.bin")
    text += ("run: id:train_seed42 log:logs/train_seed42.txt artifact:/tmp/a.ptz model:/tmp/m.pt\n"
             "data: train_shards:1 train_tokens:9 val_tokens:62000000 tokenizer_sha256:ab val_files:/d/datasets/"
             "fineweb10B_sp8192/fineweb_val_*.bin tokenizer:/d/tok.model\n"
             "eval_settings: EVAL_SEQ_LEN=2048(artifact) TTT_LR=0.005(env) EVAL_STRIDE=64(default)\n"
             "compliance: score_first:1 each_token_once:1 train_within_budget:1 calibration_data:train "
             "val_training_before_quant:0 artifact_within_limit:1 eval_within_limit:1\n")
    run = logparse.parse_text(text)
    assert run.code == {"commit": "a" * 40, "dirty": "0", "git_blob": "b" * 40}
    assert run.env["launcher"] == "torchrun" and run.env["backend"] == "nccl" and run.env["world_size"] == "1"
    assert run.env_set == {"SEED": "42", "TRAIN_FILES": "/d/x_*.bin"}
    assert run.run_info["artifact"] == "/tmp/a.ptz"
    assert run.data["tokenizer"] == "/d/tok.model" and run.data["val_files"].endswith("fineweb_val_*.bin")
    assert run.eval_settings == {"EVAL_SEQ_LEN": ("2048", "artifact"), "TTT_LR": ("0.005", "env"),
                                 "EVAL_STRIDE": ("64", "default")}
    assert run.compliance["val_training_before_quant"] == "0" and run.compliance["calibration_data"] == "train"
    assert provenance.data_facts(run)["fineweb"] is True
    eval_only = logparse.parse_text("data: val_tokens:5 tokenizer_sha256:ab12 (EVAL_ONLY: training data not read)\n")
    assert eval_only.data == {"val_tokens": "5", "tokenizer_sha256": "ab12"}


def test_data_is_fineweb_only_with_the_full_validation_split():
    proxy = logparse.parse_log(REPO / "logs/train_seed42.log")
    facts = provenance.data_facts(proxy)
    val_tokens = int(proxy.data["val_tokens"])  # the proxy corpus: ~1.6 M, far from FineWeb's ~62 M
    assert val_tokens < 10_000_000
    assert facts["fineweb"] is False and f"{val_tokens:,}" in facts["why_not"][0]


def test_git_blob_id_is_what_git_prints(tmp_path):
    if shutil.which("git") is None:
        pytest.fail("git is not installed")
    path = tmp_path / "f"
    path.write_bytes(b"some bytes\n")
    assert provenance.git_blob_id(path.read_bytes()) == git(tmp_path, "hash-object", str(path))


def packed_copy(program: bytes) -> str:
    """The shape every packed train_gpt.py has had: a base85 string of Brotli bytes given to b85decode."""
    import base64

    import brotli
    return f'import brotli,base64\nexec(brotli.decompress(base64.b85decode("{base64.b85encode(brotli.compress(program)).decode()}")))\n'


def test_python_support_compiles_the_packed_program():
    assert provenance.packed_payload(packed_copy(b"x = 1\n")) == "x = 1\n"
    assert provenance.python_support(packed_copy(b"x = 1\n"), "3.12.3").startswith("compiles on Python")
    major, minor = sys.version_info[:2]
    assert provenance.python_support(packed_copy(b"x = (\n")).startswith(f"needs Python >= {major}.{minor + 1}")
    assert provenance.python_support("print(1)\n").startswith("could not be checked")
