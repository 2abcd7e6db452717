"""Run train_gpt.py once per seed and keep each seed's log as logs/train_seed<SEED>.log.

    python tools/run_seeds.py                                   # seeds 42 314 999, torchrun on 8 GPUs
    python tools/run_seeds.py --nproc 1                         # one GPU: plain `python train_gpt.py`
    python tools/run_seeds.py --seeds 42 --env TTT_ENABLED=1 --dry-run

Each seed runs as `torchrun --standalone --nproc_per_node=N train_gpt.py` (or `python train_gpt.py`
with --launcher python, the default for --nproc 1) with SEED=<seed> and RUN_ID=train_seed<SEED> set on
top of the current environment and any --env KEY=VALUE. The child's output goes straight to the console.

Logs: the script itself writes $LOGS_DIR/<RUN_ID>.txt (LOGS_DIR from --env or the environment, default
logs). After each seed the runner copies that file to <--logs-dir>/train_seed<SEED>.log, the name a
record folder uses. The script refuses a RUN_ID whose log or run folder (runs/<RUN_ID>/) exists, so a
leftover <RUN_ID>.txt or runs/<RUN_ID>/ from an earlier attempt is first renamed <name>.<N>.old.

Stops at the first seed that fails (non-zero exit code, or a log without run_complete), prints its exit
code and the last `error:` lines of its log, and exits with that code (1 for an incomplete log).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.logparse import error_lines, parse_log

DEFAULT_SEEDS = (42, 314, 999)


def run_id(seed: int) -> str:
    return f"train_seed{seed}"


def launch_argv(launcher: str, nproc: int, script: str) -> list[str]:
    if launcher == "python":
        return [sys.executable, script]
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", script]


def seed_env(seed: int, extra: dict[str, str]) -> dict[str, str]:
    """The variables this runner sets for one seed (on top of the inherited environment)."""
    return {**extra, "SEED": str(seed), "RUN_ID": run_id(seed)}


def show(env: dict[str, str], argv: list[str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)


def _set_aside(path: Path) -> Path | None:
    if not path.exists():
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}.old").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}.old")
    path.rename(target)
    return target


def run_seed(seed: int, argv: list[str], extra: dict[str, str], logs_dir: Path) -> tuple[int, Path]:
    """Run one seed; return (exit code, the copied log). Exit code 0 means a complete log."""
    env = seed_env(seed, extra)
    child_env = {**os.environ, **env}
    script_log = Path(child_env.get("LOGS_DIR", "logs")) / f"{run_id(seed)}.txt"
    # train_gpt.py refuses a RUN_ID whose log or run folder exists: move an earlier attempt's aside
    for leftover in (script_log, Path("runs") / run_id(seed)):
        moved = _set_aside(leftover)
        if moved:
            print(f"[run_seeds] moved the leftover {leftover} to {moved}", flush=True)
    print(f"[run_seeds] seed {seed}: {show(env, argv)}", flush=True)
    proc = subprocess.Popen(argv, env=child_env)
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM to the runner: stop the run too, letting it log why
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    kept = logs_dir / f"train_seed{seed}.log"
    if script_log.is_file():
        logs_dir.mkdir(parents=True, exist_ok=True)
        if script_log.resolve() != kept.resolve():
            shutil.copyfile(script_log, kept)
    else:
        kept = script_log  # nothing was written; report the path the script should have used
    if rc == 0 and not (kept.is_file() and parse_log(kept).complete):
        print(f"[run_seeds] seed {seed} exited 0 but {kept} has no run_complete line", flush=True)
        rc = 1
    return rc, kept


def run_all(seeds, launcher: str, nproc: int, script: str, extra: dict[str, str], logs_dir: Path,
            dry_run: bool = False) -> int:
    argv = launch_argv(launcher, nproc, script)
    if dry_run:
        for seed in seeds:
            print(show(seed_env(seed, extra), argv))
        return 0
    if launcher == "torchrun" and shutil.which("torchrun") is None:
        print("error: torchrun is not on PATH (install PyTorch, or use --launcher python --nproc 1)", file=sys.stderr)
        return 2
    seeds = list(seeds)
    for i, seed in enumerate(seeds):
        rc, log = run_seed(seed, argv, extra, logs_dir)
        if rc != 0:
            print(f"error: seed {seed} failed with exit code {rc}; log: {log}", file=sys.stderr)
            for line in error_lines(log):
                print(f"  {line}", file=sys.stderr)
            later = seeds[i + 1:]
            if later:
                print(f"  not run: seeds {' '.join(map(str, later))}", file=sys.stderr)
            return rc if 0 < rc < 256 else 1  # negative: killed by a signal
        print(f"[run_seeds] seed {seed} done -> {log}", flush=True)
    return 0


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r} is not KEY=VALUE")
        if key in ("SEED", "RUN_ID"):
            raise ValueError(f"--env {key} is set by the runner; use --seeds")
        env[key] = value
    return env


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="default: 42 314 999")
    ap.add_argument("--nproc", type=int, default=8, help="GPUs per run (default 8)")
    ap.add_argument("--launcher", choices=("auto", "python", "torchrun"), default="auto",
                    help="auto: python for --nproc 1, else torchrun")
    ap.add_argument("--script", default="train_gpt.py", help="training script (default train_gpt.py)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra setting, repeatable")
    ap.add_argument("--logs-dir", default="logs", help="where train_seed<SEED>.log goes (default logs)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    launcher = args.launcher if args.launcher != "auto" else ("python" if args.nproc == 1 else "torchrun")
    try:
        extra = parse_env(args.env)
        if launcher == "python" and args.nproc != 1:
            raise ValueError("--launcher python starts one process; use torchrun for --nproc > 1")
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_all(args.seeds, launcher, args.nproc, args.script, extra, Path(args.logs_dir), args.dry_run)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that a killed runner stops its child too
    sys.exit(main())
