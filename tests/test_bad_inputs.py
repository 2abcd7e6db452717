"""Bad inputs: every user mistake must end in one clean `error:` line that names the problem and the fix.

Each case runs train_gpt.py as a subprocess in tmp_path (CPU, tiny settings from conftest) and checks
  - the exit code (2 for user errors),
  - the `error:` line: in logs/<RUN_ID>.txt once the logger exists (it is the last line, and the log holds
    everything the console showed), otherwise on stderr,
  - no Python traceback on stderr,
  - no partial files (`*.tmp*`) anywhere under tmp_path, no half-written artifact,
  - a previous artifact (pre-created with known bytes) left untouched where the case could clobber it.
A few cases (artifact over the limit, an interrupted atomic write) run in-process on train_gpt's functions.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_VOCAB, run_script, tiny_settings

import train_gpt as tg

OLD_ARTIFACT = b"PGLF previous artifact: a failed or interrupted run must leave these bytes alone\n" * 64
ARTIFACT = "final_model.int6.ptz"  # ARTIFACT_PATH default, relative to the run's cwd
DATASET = f"datasets/fineweb10B_sp{TINY_VOCAB}"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def script_env(env: dict[str, str]) -> dict[str, str]:
    """The environment run_script builds: the caller's minus every setting name, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not (k.isupper() and k in tg.SETTINGS_BY_NAME)}
    base.update(env)
    base.setdefault("OMP_NUM_THREADS", "1")
    return base


def plant_old_artifact(folder: Path) -> Path:
    path = folder / ARTIFACT
    path.write_bytes(OLD_ARTIFACT)
    return path


def partial_files(root: Path) -> list[str]:
    """Names that only an interrupted atomic write leaves behind (dot files included)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if ".tmp" in name:
                found.append(str(Path(dirpath) / name))
    return found


def assert_clean_tree(root: Path, old_artifact: Path | None = None, model_written: bool = False):
    assert not partial_files(root), f"partial files left behind: {partial_files(root)}"
    over = [str(p) for p in root.rglob("*OVER_LIMIT*")]
    assert not over, f"an artifact was written by a run that failed: {over}"
    if not model_written:
        assert not (root / "final_model.pt").exists(), "a failed run wrote final_model.pt"
    if old_artifact is not None:
        assert old_artifact.read_bytes() == OLD_ARTIFACT, "the previous artifact was modified"
    elif not model_written:
        assert not (root / ARTIFACT).exists(), "a failed run wrote the artifact"


def no_traceback(proc):
    assert "Traceback" not in proc.stderr, f"traceback on stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in (proc.stdout or ""), f"traceback on stdout:\n{proc.stdout[-3000:]}"


def log_error(proc, log: str, code: int = 2) -> str:
    """Checks for a user error reported through the run log; returns the `error:` line."""
    assert proc.returncode == code, f"exit code {proc.returncode}, expected {code}\nstderr:\n{proc.stderr[-3000:]}\nlog:\n{log[-3000:]}"
    no_traceback(proc)
    assert log, f"no run log was written\nstderr:\n{proc.stderr[-3000:]}"
    assert log.endswith("\n"), "the log's last line is incomplete (not flushed)"
    lines = log.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, got {errors}"
    assert lines[-1] == errors[0], f"the error is not the last line of the log:\n{log[-2000:]}"
    # Complete up to the error: the header was written, and the file holds every line the console showed.
    for marker in ("script:", "env:", "preset:", "settings:", "derived:"):
        assert any(line.startswith(marker) for line in lines), f"log lacks its {marker} line"
    assert proc.stdout.splitlines() == lines, "the log file differs from what the console showed"
    return errors[0]


def stderr_error(proc, code: int = 2) -> str:
    """Checks for a user error found before the logger exists (settings): one `error:` line on stderr."""
    assert proc.returncode == code, f"exit code {proc.returncode}, expected {code}\nstderr:\n{proc.stderr[-3000:]}"
    no_traceback(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line on stderr, got:\n{proc.stderr[-3000:]}"
    return errors[0]


def has_all(text: str, *words: str):
    missing = [w for w in words if w not in text]
    assert not missing, f"{missing} not in: {text}"


def good_tokens(tiny_data: Path, which: str = "train_000000") -> np.ndarray:
    return tg.read_shard(tiny_data / DATASET / f"fineweb_{which}.bin")


def shard(tokens, magic: int = tg.SHARD_MAGIC, version: int = tg.SHARD_VERSION, count: int | None = None) -> bytes:
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One complete tiny run, with a typo'd variable in its environment (which must only warn).
    Its artifact serves the EVAL_ONLY cases."""
    cwd = tmp_path_factory.mktemp("finished_run")
    proc, log = run_script(tiny_settings(tiny_data, MATRIX_LRR="0.1"), cwd, timeout=240)
    assert proc.returncode == 0, f"the reference run failed:\n{proc.stderr[-3000:]}\n{log[-3000:]}"
    return cwd, proc, log


def copy_artifact(finished_run, dest: Path) -> Path:
    return Path(shutil.copyfile(finished_run[0] / ARTIFACT, dest / ARTIFACT))


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_missing_data_dir(tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    missing = tmp_path / "no_such_data_dir"
    proc, log = run_script(tiny_env(DATA_DIR=missing), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, str(missing), "DATA_DIR", "prepare.py")
    assert "not found" in err or "does not exist" in err, err
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_no_val_shards(tiny_data, tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    empty = tmp_path / "val"
    empty.mkdir()
    proc, log = run_script(tiny_env(VAL_FILES=empty / "fineweb_val_*.bin"), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, "no val shards", str(empty), "fineweb_val_*.bin", "VAL_FILES", "prepare.py")
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_shard_with_wrong_magic(tiny_data, tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    train = tmp_path / "train"
    train.mkdir()
    shutil.copy(tiny_data / DATASET / "fineweb_train_000000.bin", train / "fineweb_train_000000.bin")
    bad = put(train / "fineweb_train_000001.bin", shard(good_tokens(tiny_data), magic=0x12345678))
    proc, log = run_script(tiny_env(TRAIN_FILES=train / "fineweb_train_*.bin"), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, str(bad), "magic", str(0x12345678), str(tg.SHARD_MAGIC), "prepare.py")
    assert "remove it" in err or "Regenerate" in err, err
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_shard_with_wrong_version(tiny_data, tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    bad = put(tmp_path / "val" / "fineweb_val_000000.bin", shard(good_tokens(tiny_data, "val_000000"), version=7))
    proc, log = run_script(tiny_env(VAL_FILES=tmp_path / "val" / "fineweb_val_*.bin"), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, str(bad), "version 7", f"version {tg.SHARD_VERSION}", "Regenerate", "prepare.py")
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
@pytest.mark.parametrize("cut", ["body", "header"])
def test_truncated_shard(tiny_data, tiny_env, tmp_path, cut):
    old = plant_old_artifact(tmp_path)
    full = shard(good_tokens(tiny_data))
    keep = len(full) - 1001 if cut == "body" else tg.SHARD_HEADER_BYTES - 24
    bad = put(tmp_path / "train" / "fineweb_train_000000.bin", full[:keep])
    proc, log = run_script(tiny_env(TRAIN_FILES=tmp_path / "train" / "*.bin"), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, str(bad), "truncated", f"{keep} bytes")
    assert "Re-download" in err or "regenerate" in err, err
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_tokenizer_vocab_differs_from_vocab_size(tiny_data, tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    model = tiny_data / "tokenizers" / f"fineweb_{TINY_VOCAB}_bpe.model"
    env = tiny_env(VOCAB_SIZE=1024, TOKENIZER_PATH=model, TRAIN_FILES=tiny_data / DATASET / "fineweb_train_*.bin",
                   VAL_FILES=tiny_data / DATASET / "fineweb_val_*.bin")
    proc, log = run_script(env, tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, str(model), f"{TINY_VOCAB} pieces", "VOCAB_SIZE=1024", "Set VOCAB_SIZE", "TOKENIZER_PATH")
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_val_token_id_outside_vocab(tiny_data, tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    tokens = good_tokens(tiny_data, "val_000000").copy()
    tokens[1234] = TINY_VOCAB + 88
    bad = put(tmp_path / "val" / "fineweb_val_000000.bin", shard(tokens))
    proc, log = run_script(tiny_env(VAL_FILES=bad.parent / "fineweb_val_*.bin"), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, str(bad.parent), f"token id {TINY_VOCAB + 88}", "position 1234", f"VOCAB_SIZE={TINY_VOCAB}",
            "Set VOCAB_SIZE", "regenerate")
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_train_token_id_outside_vocab(tiny_data, tiny_env, tmp_path):
    """The train check runs in the loader's thread: the error must still reach main() cleanly, and say
    which shard holds the bad id (the user may have hundreds)."""
    old = plant_old_artifact(tmp_path)
    tokens = good_tokens(tiny_data).copy()
    tokens[::16] = TINY_VOCAB + 5  # in every training window, whatever the random order
    bad = put(tmp_path / "train" / "fineweb_train_000007.bin", shard(tokens))
    proc, log = run_script(tiny_env(TRAIN_FILES=tmp_path / "train" / "*.bin"), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, f"token id {TINY_VOCAB + 5}", f"VOCAB_SIZE={TINY_VOCAB}", "Set VOCAB_SIZE", "regenerate")
    assert bad.name in err, f"the error does not say which shard holds the bad token: {err}"
    position = re.search(r"at position (\d+)", err)
    assert position and tokens[int(position.group(1))] == TINY_VOCAB + 5, f"the position is not the shard's: {err}"
    assert_clean_tree(tmp_path, old)


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_world_size_cannot_split_batch(tiny_env, tmp_path):
    """RANK/WORLD_SIZE set by hand (no torchrun): the check runs before any process group is formed,
    so it fails at once instead of waiting for ranks that will never come."""
    env = tiny_env(TRAIN_BATCH_TOKENS=3 * 64, TRAIN_SEQ_LEN=64)
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    proc, log = run_script(env, tmp_path, timeout=60)  # a hang raises TimeoutExpired
    err = stderr_error(proc)
    has_all(err, "TRAIN_BATCH_TOKENS=192", "WORLD_SIZE=2", "multiple of 128")
    assert log == ""
    assert_clean_tree(tmp_path)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_negative_value(tiny_env, tmp_path):
    proc, log = run_script(tiny_env(MATRIX_LR=-1), tmp_path, timeout=60)
    err = stderr_error(proc)
    has_all(err, "MATRIX_LR=-1", ">= 0")
    assert log == ""
    assert_clean_tree(tmp_path)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_non_numeric_value(tiny_env, tmp_path):
    proc, log = run_script(tiny_env(ITERATIONS="abc"), tmp_path, timeout=60)
    err = stderr_error(proc)
    has_all(err, "ITERATIONS='abc'", "not a valid int", "unset ITERATIONS")
    assert log == ""
    assert_clean_tree(tmp_path)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_typo_of_a_setting_warns_and_runs(finished_run):
    cwd, proc, log = finished_run
    assert proc.returncode == 0
    no_traceback(proc)
    assert "run_complete" in log
    lines = log.splitlines()
    warnings = [line for line in lines if line.startswith("warning:") and "MATRIX_LRR" in line]
    assert len(warnings) == 2, log[:4000]  # first, and again at the end where it is seen
    assert lines[0] == warnings[0] and lines[-2] == warnings[1] and lines[-1] == "run_complete"
    has_all(warnings[0], "MATRIX_LRR", "did you mean MATRIX_LR?")
    assert "  MATRIX_LR=0.04\n" in log, "the misspelt variable must not change MATRIX_LR (small preset: 0.04)"
    assert not partial_files(cwd)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_nan_loss_stops_the_run(tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    proc, log = run_script(tiny_env(DEBUG_NAN_AT_STEP=3, ITERATIONS=8, TRAIN_LOG_EVERY=1), tmp_path, timeout=180)
    err = log_error(proc, log)
    has_all(err, "nan", "step 3", "diverged", "MATRIX_LR", "no artifact")
    lines = log.splitlines()
    assert any(line.startswith("2/8 train_loss:") for line in lines), "steps before the NaN were not logged"
    assert not any(line.startswith(("3/8 train_loss:", "4/8 train_loss:")) for line in lines), \
        "the run logged a train line for the step whose loss was NaN (or went past it)"
    assert not any(line.startswith(("gptq:", "Serialized", "artifact:")) for line in lines)
    assert_clean_tree(tmp_path, old)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_sigterm_during_training(tiny_env, tmp_path):
    old = plant_old_artifact(tmp_path)
    env = script_env(tiny_env(ITERATIONS=100000, TRAIN_LOG_EVERY=1))
    logfile = tmp_path / "logs" / "test.txt"
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as errf:
        proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=env, stdout=out, stderr=errf)
        try:
            deadline = time.time() + 150
            while time.time() < deadline and proc.poll() is None:
                if logfile.exists() and "\n3/100000 train_loss:" in logfile.read_text():
                    break
                time.sleep(0.05)
            assert proc.poll() is None, f"the run ended before it was signalled:\n{(tmp_path / 'stderr.txt').read_text()[-3000:]}"
            assert "\n3/100000 train_loss:" in logfile.read_text(), "no third train line within 150 s"
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result = subprocess.CompletedProcess(proc.args, code, (tmp_path / "stdout.txt").read_text(),
                                         (tmp_path / "stderr.txt").read_text())
    (tmp_path / "stdout.txt").unlink()
    (tmp_path / "stderr.txt").unlink()
    log = logfile.read_text()
    err = log_error(result, log)
    has_all(err, "error: received SIGTERM", "Re-run")
    assert "\n3/100000 train_loss:" in log
    assert "gptq:" not in log and "ema:" not in log, "the run went on after SIGTERM"
    assert_clean_tree(tmp_path, old)


# ------------------------------------------------------------------------------------------------
# artifact: over the limit, interrupted writes
# ------------------------------------------------------------------------------------------------


def inproc_settings(tmp_path: Path) -> tg.Hyperparameters:
    return tg.Hyperparameters(environ={"PRESET": "small", "DATA_DIR": str(tmp_path), "RUN_ID": "inproc",
                                       "ARTIFACT_PATH": str(tmp_path / ARTIFACT)}, cuda_available=False)


def test_artifact_over_limit(tmp_path, monkeypatch, captured_log):
    assert tg.ARTIFACT_LIMIT_BYTES == 16_000_000
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", 1000)
    old = plant_old_artifact(tmp_path)
    blob = bytes(range(256)) * 4  # 1024 bytes + 26 bytes of code = 50 over
    path = tg.write_artifact(blob, inproc_settings(tmp_path), code_bytes=26, readable_bytes=99)
    expected = tmp_path / "final_model.int6.OVER_LIMIT_by_50_bytes.ptz"
    assert path == expected
    assert expected.read_bytes() == blob
    assert old.read_bytes() == OLD_ARTIFACT, "ARTIFACT_PATH was overwritten by an over-limit artifact"
    warnings = [m for m in captured_log if m.startswith("warning:")]
    assert len(warnings) == 1, captured_log
    has_all(warnings[0], "50 bytes over", "1,000-byte limit", str(expected), "ARTIFACT_PATH is left untouched",
            "ARTIFACT_FIT=1", "MATRIX_CLIP_SIGMAS")
    assert any(m.startswith("artifact:") and "fits:0" in m and "margin:-50" in m for m in captured_log), captured_log
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ARTIFACT, expected.name])


class _HalfWriter:
    """A file whose write() puts half the data on disk, then is interrupted (as by the SIGTERM handler)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise tg.Interrupted("received SIGTERM (simulated, mid-write)")

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_interrupted_artifact_write_leaves_no_partial_file(tmp_path, monkeypatch, captured_log, where):
    old = plant_old_artifact(tmp_path)
    seen = {}

    def interrupt(*args, **kwargs):
        seen["tmp"] = [p.name for p in tmp_path.iterdir()]
        raise tg.Interrupted(f"received SIGTERM (simulated, in {where})")

    if where == "write":
        real_open = open

        def half_open(path, mode="r", *a, **k):
            seen["tmp"] = [Path(path).name]
            return _HalfWriter(real_open(path, mode, *a, **k))
        monkeypatch.setattr(tg, "open", half_open, raising=False)
    else:
        monkeypatch.setattr(tg.os, where, interrupt)
    with pytest.raises(tg.Interrupted):
        tg.write_artifact(b"new artifact " * 100_000, inproc_settings(tmp_path), code_bytes=100, readable_bytes=100)
    assert any(".tmp" in n for n in seen["tmp"]), f"the write did not go through a temporary file: {seen}"
    assert not partial_files(tmp_path), f"temporary file left behind: {partial_files(tmp_path)}"
    assert old.read_bytes() == OLD_ARTIFACT
    assert [p.name for p in tmp_path.iterdir()] == [ARTIFACT]


SLOW_WRITER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import train_gpt as tg

def on_sigterm(signum, frame):  # what train_gpt.main() installs
    raise tg.Interrupted("received SIGTERM: stopped.")

signal.signal(signal.SIGTERM, on_sigterm)
real_fsync = os.fsync

def slow_fsync(fd):  # a slow disk: the rename is still 30 s away when the signal comes
    real_fsync(fd)
    print("fsynced", flush=True)
    time.sleep(30)

os.fsync = slow_fsync
blob = b"\\xab" * 200_000_000
print("writing", flush=True)
try:
    tg.atomic_write_bytes({target!r}, blob)
except tg.Interrupted as e:
    print(f"error: {{e}}", file=sys.stderr)
    sys.exit(2)
print("written", flush=True)
"""


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_sigterm_while_writing_a_big_file(tmp_path):
    """A real SIGTERM, through the same kind of handler main() installs, while atomic_write_bytes writes a
    200 MB blob: the temporary file goes, the old file stays."""
    old = plant_old_artifact(tmp_path)
    helper = tmp_path / "slow_writer.py"
    helper.write_text(SLOW_WRITER.format(repo=str(REPO), target=str(old)))
    proc = subprocess.Popen([sys.executable, str(helper)], cwd=tmp_path, env=script_env({}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        deadline = time.time() + 30
        while time.time() < deadline and not partial_files(tmp_path):
            time.sleep(0.001)
        assert partial_files(tmp_path), "the temporary file never appeared"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, (proc.returncode, out, err[-2000:])
    assert "written" not in out, "the signal came too late: the write had completed"
    assert "Traceback" not in err, err[-3000:]
    assert "error: received SIGTERM" in err
    assert not partial_files(tmp_path), f"temporary file left behind: {partial_files(tmp_path)}"
    assert old.read_bytes() == OLD_ARTIFACT
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ARTIFACT, helper.name])


# ------------------------------------------------------------------------------------------------
# evaluation of a shipped artifact
# ------------------------------------------------------------------------------------------------


def corrupt(blob: bytes, how: str) -> bytes:
    if how == "flipped":
        mid = len(blob) // 2
        return blob[:mid] + bytes(b ^ 0xFF for b in blob[mid:mid + 16]) + blob[mid + 16:]
    if how == "truncated":
        return blob[:len(blob) // 2]
    return np.random.default_rng(0).integers(0, 256, len(blob), dtype=np.uint8).tobytes()


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
@pytest.mark.parametrize("how", ["flipped", "truncated", "random"])
def test_corrupt_artifact_in_eval_only(finished_run, tiny_env, tmp_path, how):
    path = copy_artifact(finished_run, tmp_path)
    bad = corrupt(path.read_bytes(), how)
    path.write_bytes(bad)
    proc, log = run_script(tiny_env(EVAL_ONLY=1), tmp_path, timeout=120)
    err = log_error(proc, log)
    has_all(err, ARTIFACT, "re-run training")
    assert "corrupt" in err or "damaged" in err, err
    assert path.read_bytes() == bad, "EVAL_ONLY modified the artifact it was given"
    assert not partial_files(tmp_path)
    assert not (tmp_path / "final_model.pt").exists()


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_eval_only_does_not_read_training_data(finished_run, tiny_env, tmp_path):
    path = copy_artifact(finished_run, tmp_path)
    blob = path.read_bytes()
    proc, log = run_script(tiny_env(EVAL_ONLY=1, TRAIN_FILES=tmp_path / "nowhere" / "fineweb_train_*.bin"), tmp_path,
                           timeout=180)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{log[-3000:]}"
    no_traceback(proc)
    assert "training data not read" in log
    assert "quantized val_loss:" in log and "run_complete" in log
    assert not any(line.startswith(("error:", "warning:")) for line in log.splitlines()), log
    assert path.read_bytes() == blob
    assert not (tmp_path / "final_model.pt").exists()
    assert not partial_files(tmp_path)
