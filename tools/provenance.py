"""Which code produced a log, what data it ran on, and the command that reproduces it.

    from tools.provenance import resolve_commit, reproduce_commands, data_facts
    prov = resolve_commit(run)            # run: a tools.logparse.RunLog
    prov.commit, prov.how, prov.checked

    python tools/provenance.py logs/train_seed42.log      # print commit, data verdict, reproduce command
    python tools/provenance.py --check-packed records/<folder>   # packed copy == that commit's program?

A log names its script's sha256 (`script:` line) and, from the `code:` line on, the commit and the
git blob id of the file. Older logs, and runs on a machine without a git checkout, say no commit (or
`commit:unknown`): the commit is then found in git history as the first commit whose train_gpt.py has
the logged blob id or sha256. One function, `resolve_commit`, does this for summarize, pack_record and
tests/test_provenance.py, so they cannot disagree.
"""
from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
SCRIPT = "train_gpt.py"

# The FineWeb validation split (first 50,000 documents) is about 62 M SP8192 tokens (SPEC section 1), and
# ~6.5 % more as case-operator shards (data/prepare.py --input-shards ... --case-ops; measured on the proxy
# corpus); the bundled sample and proxy corpora are 1-2 M. A window around 62 M tells the two apart from the
# logged count alone; the shard path layout cannot (proxy corpora reuse the fineweb10B_sp8192 names).
FINEWEB_VAL_TOKENS = (60_000_000, 68_000_000)
FINEWEB_VAL_FILES = re.compile(r"(^|/)datasets/fineweb10B_sp\d+/fineweb_val_\*\.bin$")


class ProvenanceError(Exception):
    """The code behind a log can't be established; the message says why and what to do."""


@dataclasses.dataclass
class Provenance:
    sha256: str
    commit: str
    how: str  # "logged", or "git history (blob|sha256)": how the commit was found
    checked: bool  # True when git showed that commit's train_gpt.py has the logged sha256


# ------------------------------------------------------------------------------------------------ git


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise ProvenanceError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def history_problem(repo: Path = REPO_DIR) -> str | None:
    """Why git history can't be searched here (None when it can)."""
    if shutil.which("git") is None:
        return "git is not installed (install git to check which commit produced the logs)"
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"{repo} is not a git checkout ({proc.stderr.strip()})"
    if proc.stdout.strip() == "true":
        return f"{repo} is a shallow clone: run `git fetch --unshallow` (the logs' commits may be older than its depth)"
    return None


def script_at(commit: str, repo: Path = REPO_DIR) -> bytes:
    return _git(repo, "show", f"{commit}:{SCRIPT}")


def commits_with_script(repo: Path = REPO_DIR) -> list[tuple[str, str]]:
    """(commit, blob id of its train_gpt.py) for every commit of every ref, oldest first."""
    commits = _git(repo, "rev-list", "--all", "--topo-order", "--reverse").decode().split()
    query = "".join(f"{c}:{SCRIPT}\n" for c in commits).encode()
    out = _git(repo, "cat-file", "--batch-check=%(objectname) %(objecttype)", stdin=query).decode().splitlines()
    return [(c, line.split()[0]) for c, line in zip(commits, out) if line.endswith(" blob")]


def _blob_sha256(repo: Path, blob: str) -> str:
    return hashlib.sha256(_git(repo, "cat-file", "blob", blob)).hexdigest()


def find_commit(sha256: str, blob: str | None = None, repo: Path = REPO_DIR) -> tuple[str, str] | None:
    """(first commit whose train_gpt.py is that file, 'blob' or 'sha256'), or None."""
    pairs = commits_with_script(repo)
    if blob:
        hit = next((c for c, b in pairs if b == blob), None)
        if hit:
            return hit, "blob"
    hashed = {}
    for commit, b in pairs:
        if b not in hashed:
            hashed[b] = _blob_sha256(repo, b)
        if hashed[b] == sha256:
            return commit, "sha256"
    return None


def resolve_commit(run, repo: Path = REPO_DIR) -> Provenance:
    """The commit whose train_gpt.py the log ran. A commit named in the log's `code:` line is checked
    against git (its train_gpt.py must have the logged sha256); otherwise, or when the log says the
    script was dirty, history is searched by blob id and sha256. Without usable git history a logged
    commit is returned unchecked and an unlogged one is an error."""
    sha = (run.script or {}).get("sha256")
    if not sha:
        raise ProvenanceError(f"{run.path}: no `script:` line with a sha256: nothing to identify the code by")
    code = run.code or {}
    logged = code.get("commit") if re.fullmatch(r"[0-9a-f]{40}", code.get("commit", "")) else None
    problem = history_problem(repo)
    if problem:
        if logged and code.get("dirty") == "0":
            return Provenance(sha, logged, f"logged; not checked: {problem}", False)
        raise ProvenanceError(f"{run.path}: cannot find the commit that produced this log: {problem}")
    if logged and code.get("dirty") == "0":
        try:
            there = hashlib.sha256(script_at(logged, repo)).hexdigest()
        except ProvenanceError:
            raise ProvenanceError(f"{run.path}: names commit {logged}, which is not in {repo} "
                                  "(fetch the branch that holds it)") from None
        if there != sha:
            raise ProvenanceError(f"{run.path}: names commit {logged} with dirty:0, but that commit's {SCRIPT} has "
                                  f"sha256 {there}, not the logged {sha}")
        return Provenance(sha, logged, "logged", True)
    found = find_commit(sha, code.get("git_blob"), repo)
    if found is None:
        state = "was uncommitted (dirty:1)" if code.get("dirty") == "1" else "is in no commit"
        raise ProvenanceError(f"{run.path}: the script it ran (sha256 {sha}) {state} of {repo}: commit it, or "
                              "fetch the branch that holds it")
    return Provenance(sha, found[0], f"git history ({found[1]})", True)


# ------------------------------------------------------------------------------------------------ settings and command


def settings_defaults(source: str) -> tuple[dict, dict]:
    """(name -> default, small-preset overrides) read from a train_gpt.py's SETTINGS table (its `_s(...)`
    calls) and SMALL_PRESET, without importing it (an old commit's module may not import here)."""
    tree = ast.parse(source)
    defaults, small = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_s" and len(node.args) >= 3:
            defaults[ast.literal_eval(node.args[0])] = ast.literal_eval(node.args[2])
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SMALL_PRESET" for t in node.targets):
            small = ast.literal_eval(node.value)
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "SMALL_PRESET":
            small = ast.literal_eval(node.value)
    if not defaults:
        raise ProvenanceError("no SETTINGS table (`_s(NAME, kind, default, ...)` calls) in that train_gpt.py")
    return defaults, small


def _env_text(value) -> str:
    """A logged setting value as the environment gives it (booleans as 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def explicit_settings(run, repo: Path = REPO_DIR, prov: Provenance | None = None) -> tuple[dict, str]:
    """(NAME -> value text the environment set, where that came from). From the `env_set:` line when
    the log has one; older logs lack it, so the settings whose logged value differs from the default of
    the commit that ran are taken instead (an equivalent command: values the script derived, such as
    TRAIN_FILES from DATA_DIR, appear set by hand)."""
    if run.env_set is not None:
        return dict(run.env_set), "those the log's env_set: line records"
    prov = prov or resolve_commit(run, repo)
    if not prov.checked:
        raise ProvenanceError(f"{run.path}: no `env_set:` line, and the defaults of commit {prov.commit} can't be read ({prov.how})")
    defaults, small = settings_defaults(script_at(prov.commit, repo).decode("utf-8"))
    if run.setting("PRESET") == "small":
        defaults.update(small)
    out = {}
    for name in run.settings:
        value = run.setting(name)
        if name not in defaults:
            raise ProvenanceError(f"{run.path}: setting {name} is not in the SETTINGS table of commit {prov.commit}")
        if repr(value) != repr(defaults[name]):
            out[name] = _env_text(value)
    return out, f"those whose logged value differs from the default of commit {prov.commit[:12]} (the log predates env_set:)"


def launcher(run) -> tuple[str, int]:
    """(torchrun | python, processes): logged from the `env:` line on; before that, torchrun when the
    run had more than one process."""
    nproc = int(run.env.get("world_size") or 1)
    return run.env.get("launcher") or ("torchrun" if nproc > 1 else "python"), nproc


def reproduce_command(run, repo: Path = REPO_DIR, prov: Provenance | None = None) -> str:
    """One line to paste in the folder holding train_gpt.py: the settings the run was given, its seed,
    and its launcher."""
    settings, _ = explicit_settings(run, repo, prov)
    if run.seed is not None:
        settings["SEED"] = str(run.seed)
    env = " ".join(f"{name}={shlex.quote(value)}" for name, value in sorted(settings.items()))
    how, nproc = launcher(run)
    cmd = f"torchrun --standalone --nproc_per_node={nproc} {SCRIPT}" if how == "torchrun" else f"python {SCRIPT}"
    return f"{env} {cmd}" if env else cmd


# ------------------------------------------------------------------------------------------------ data


def data_facts(run) -> dict:
    """Was the run scored on the FineWeb validation split? Decided from logged facts only: the number of
    validation tokens (FINEWEB_VAL_TOKENS) and the validation files' path layout."""
    val_tokens = int(run.data["val_tokens"]) if run.data.get("val_tokens", "").isdigit() else None
    # Older logs name no val_files; the script then used VAL_FILES, or DATA_DIR's challenge layout.
    layout = f"{str(run.setting('DATA_DIR', './data/')).rstrip('/')}/datasets/fineweb10B_sp{run.setting('VOCAB_SIZE', 8192)}/fineweb_val_*.bin"
    val_files = run.data.get("val_files") or run.setting("VAL_FILES") or (layout if run.settings else "")
    reasons = []
    if val_tokens is None:
        reasons.append("the log has no data: val_tokens count")
    elif not FINEWEB_VAL_TOKENS[0] <= val_tokens <= FINEWEB_VAL_TOKENS[1]:
        reasons.append(f"val_tokens {val_tokens:,} is not the FineWeb validation split's ~62 M")
    if not FINEWEB_VAL_FILES.search(val_files):
        reasons.append(f"val files {val_files or '(not logged)'} are not datasets/fineweb10B_spV/fineweb_val_*.bin")
    return {"fineweb": not reasons, "why_not": reasons, "val_tokens": val_tokens, "val_files": val_files or None,
            "tokenizer_sha256": run.data.get("tokenizer_sha256")}


# ------------------------------------------------------------------------------------------------ packed copies


def packed_payload(packed: str) -> str:
    """The source inside a packed train_gpt.py (the base85 string handed to b85decode, Brotli inside).
    Reads every wrapper this project has used, whatever its first lines."""
    import brotli
    m = re.search(r'b85decode\("([^"]+)"', packed)
    if not m:
        raise ProvenanceError("not a packed train_gpt.py: no b85decode(\"...\") payload")
    return brotli.decompress(base64.b85decode(m.group(1))).decode("utf-8")


def python_support(packed: str, ran_on: str | None = None) -> str:
    """A sentence on the Python the packed copy needs, from compiling its program with this Python."""
    here = platform.python_version()
    ran = f"; the runs used {ran_on}" if ran_on else ""
    try:
        compile(packed_payload(packed), "<train_gpt>", "exec")
    except ProvenanceError as e:
        return f"could not be checked ({e})"
    except SyntaxError as e:
        major, minor = sys.version_info[:2]
        return (f"needs Python >= {major}.{minor + 1}: Python {here} cannot compile it ({e.msg}, line {e.lineno}){ran}")
    return f"compiles on Python {here} (checked when this folder was built){ran}"


def check_packed(folder: Path, repo: Path = REPO_DIR) -> list[str]:
    """Problems with folder/train_gpt.py as the packed copy of the commit behind folder's logs ([] = none).
    The program must equal that commit's own minifier output: strip_source when the commit has it (same
    on every Python), else its ast.unparse round trip, comparable only on the Python minor the runs used."""
    from tools.logparse import parse_log
    logs = sorted(Path(folder).glob("train_seed*.log"))
    if not logs:
        return [f"{folder}: no train_seed*.log"]
    run = parse_log(logs[0])
    packed_bytes = (Path(folder) / SCRIPT).read_bytes()
    problems = []
    if hashlib.sha256(packed_bytes).hexdigest() != run.script.get("packed_sha256"):
        problems.append(f"{folder}/{SCRIPT}: sha256 is not the packed_sha256 {run.script.get('packed_sha256')} of {logs[0]}")
    prov = resolve_commit(run, repo)
    source = script_at(prov.commit, repo).decode("utf-8")
    unpacked = packed_payload(packed_bytes.decode("utf-8"))
    expected = minified_program(source, run.env.get("python"))
    if unpacked != expected:
        problems.append(f"{folder}/{SCRIPT} does not unpack to the program of commit {prov.commit} "
                        f"({len(unpacked)} vs {len(expected)} characters)")
    return problems


class WrongPython(ProvenanceError):
    """The commit's minifier gives different text on other Python versions; run on the one named."""


def minified_program(source: str, ran_on: str | None) -> str:
    """What that source's own packer compresses: strip_source when it defines one (version independent),
    else ast.unparse of the tree without docstrings (which differs between Python minors)."""
    namespace = {}
    tree = ast.parse(source)
    wanted = {"strip_source", "_docstring_owners", "strip_docstrings"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    exec(compile(ast.Module(body=[ast.parse("import ast, io").body[0], *funcs], type_ignores=[]), "<defs>", "exec"), namespace)
    if "strip_source" in namespace:
        return namespace["strip_source"](source)
    here = ".".join(platform.python_version().split(".")[:2])
    if ran_on and ".".join(ran_on.split(".")[:2]) != here:
        raise WrongPython(f"this packed copy was made by ast.unparse on Python {ran_on}; its text can only be "
                          f"reproduced on Python {'.'.join(ran_on.split('.')[:2])} (this is {platform.python_version()})")
    return ast.unparse(namespace["strip_docstrings"](ast.parse(source)))


def main(argv=None) -> int:
    import argparse
    import json

    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO_DIR))
    from tools.logparse import parse_log

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("logs", nargs="*", help="logs to report on")
    ap.add_argument("--check-packed", metavar="FOLDER", help="check FOLDER/train_gpt.py against the commit of FOLDER's logs")
    ap.add_argument("--repo", default=str(REPO_DIR), help="git checkout to search (default: this repository)")
    args = ap.parse_args(argv)
    repo = Path(args.repo)
    try:
        if args.check_packed:
            problems = check_packed(Path(args.check_packed), repo)
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            if not problems:
                print(f"{args.check_packed}/{SCRIPT}: unpacks to the program of the commit its logs name")
            return 1 if problems else 0
        for path in args.logs:
            run = parse_log(path)
            prov = resolve_commit(run, repo)
            print(json.dumps({"log": path, **dataclasses.asdict(prov), "data": data_facts(run),
                              "reproduce": reproduce_command(run, repo, prov)}, indent=1))
    except ProvenanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
