"""Finding and trusting a run: its id and files, the evaluation settings an artifact carries, EVAL_ONLY
without guessing, and the packed copy run from another folder."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, RandomTokens, run_script, tiny_settings

import train_gpt as tg


def settings(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters(dict({"PRESET": "small"}, **env), cuda_available=False)


# ------------------------------------------------------------------------------------------------
# run ids and files
# ------------------------------------------------------------------------------------------------


def test_default_run_id_and_paths():
    h = settings(SEED="42")
    assert re.fullmatch(r"\d{8}_\d{6}_seed42", h.run_id), h.run_id
    assert h.logfile == str(Path("logs") / f"{h.run_id}.txt")
    assert h.artifact_path == str(Path("runs") / h.run_id / "final_model.int6.ptz")
    assert h.model_path == str(Path("runs") / h.run_id / "final_model.pt")
    assert settings(EVAL_ONLY="1").artifact_path == "final_model.int6.ptz"  # what EVAL_ONLY scores by default
    given = settings(RUN_ID="r", ARTIFACT_PATH="/x/a.ptz", MODEL_PATH="m.pt")
    assert (given.artifact_path, given.model_path) == ("/x/a.ptz", "m.pt")


def test_claimed_run_ids_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = settings(RUN_ID="mine")
    tg.claim_run_id(h)
    assert (tmp_path / "logs" / "mine.txt").is_file() and (tmp_path / "runs" / "mine").is_dir()
    with pytest.raises(tg.ConfigError, match=r"RUN_ID=mine is already used: logs/mine.txt and runs/mine"):
        tg.claim_run_id(settings(RUN_ID="mine"))
    (tmp_path / "logs" / "mine.txt").unlink()
    with pytest.raises(tg.ConfigError, match=r"runs/mine exist"):  # a run folder alone also counts
        tg.claim_run_id(settings(RUN_ID="mine"))
    first, second = settings(SEED="3"), settings(SEED="3")
    second.set_run_id(first.run_id)  # two default ids from the same second
    tg.claim_run_id(first)
    tg.claim_run_id(second)
    assert second.run_id == first.run_id + "_2"
    assert second.artifact_path == str(Path("runs") / second.run_id / "final_model.int6.ptz")


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_a_used_run_id_is_refused_before_anything_is_written(tiny_env, tmp_path):
    log = tmp_path / "logs" / "test.txt"
    log.parent.mkdir()
    log.write_text("an earlier run\n")
    proc, _ = run_script(tiny_env(), tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "RUN_ID=test is already used" in errors[0] and "logs/test.txt" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert log.read_text() == "an earlier run\n"
    assert not (tmp_path / "runs").exists()


def test_run_seeds_moves_a_leftover_run_folder_aside(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text("import os, pathlib\n"
                    "log = pathlib.Path('logs') / (os.environ['RUN_ID'] + '.txt')\n"
                    "assert not log.exists() and not (pathlib.Path('runs') / os.environ['RUN_ID']).exists()\n"
                    "log.parent.mkdir(exist_ok=True)\n"
                    "log.write_text('run_complete\\n')\n")
    (tmp_path / "runs" / "train_seed42").mkdir(parents=True)
    (tmp_path / "runs" / "train_seed42" / "final_model.int6.ptz").write_bytes(b"earlier")
    cmd = [sys.executable, str(REPO / "tools" / "run_seeds.py"), "--launcher", "python", "--nproc", "1",
           "--script", str(fake), "--seeds", "42"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "runs" / "train_seed42.1.old" / "final_model.int6.ptz").read_bytes() == b"earlier"


# ------------------------------------------------------------------------------------------------
# evaluation settings carried by the artifact
# ------------------------------------------------------------------------------------------------


def tiny_artifact(h, eval_settings: dict | None) -> bytes:
    torch.manual_seed(0)
    model = tg.GPT(h)
    hessians = tg.collect_hessians(model, RandomTokens(h.vocab_size, 2, h.train_seq_len), h, torch.device("cpu"))
    tensors, _ = tg.quantize_model(model, hessians, h)
    return tg.serialize_artifact(tensors, h.model_config(), "brotli", eval_settings)


def test_eval_settings_come_from_the_artifact_unless_set(tiny_data, tmp_path, captured_log):
    made = tg.Hyperparameters(tiny_settings(tiny_data, EVAL_SEQ_LEN="48", EVAL_STRIDE="16", TTT_ENABLED="1",
                                            TTT_LR="0.123"), cuda_available=False)
    path = tmp_path / "a.ptz"
    path.write_bytes(tiny_artifact(made, made.eval_config()))
    assert tg.parse_artifact(path.read_bytes())[0]["eval"] == made.eval_config()

    scorer = tg.Hyperparameters({"PRESET": "small", "EVAL_ONLY": "1", "EVAL_STRIDE": "8"}, cuda_available=False)
    _, hh = tg.load_eval_model(path, scorer, torch.device("cpu"))
    assert (hh.eval_seq_len, hh.eval_stride, hh.ttt_enabled, hh.ttt_lr) == (48, 8, True, 0.123)
    line = next(l for l in captured_log if l.startswith("eval_settings:"))
    for part in ("EVAL_SEQ_LEN=48(artifact)", "EVAL_STRIDE=8(env)", "TTT_ENABLED=True(artifact)", "TTT_LR=0.123(artifact)",
                 "TTT_CHUNK_TOKENS=2048(artifact)", "SLIDING_WINDOW_ENABLED=True(artifact)"):
        assert f" {part}" in line, (part, line)
    assert set(re.findall(r" (\w+)=", line)) == set(made.eval_config())

    # an artifact made before the settings were stored still loads; its values are this run's defaults
    captured_log.clear()
    path.write_bytes(tiny_artifact(made, None))
    _, hh = tg.load_eval_model(path, scorer, torch.device("cpu"))
    assert hh.eval_seq_len == scorer.eval_seq_len
    line = next(l for l in captured_log if l.startswith("eval_settings:"))
    assert f" EVAL_SEQ_LEN={scorer.eval_seq_len}(default)" in line and " EVAL_STRIDE=8(env)" in line


def test_eval_only_does_not_switch_preset_or_fall_back_to_the_sample(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here, and no training shards anywhere
    h = tg.Hyperparameters({"EVAL_ONLY": "1"}, cuda_available=True)
    assert h.preset == "record" and "EVAL_ONLY" in h.preset_reason and not h.sample_data
    assert h.data_dir == "./data/"
    assert tg.Hyperparameters({"EVAL_ONLY": "1"}, cuda_available=False).preset == "small"


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_eval_only_without_data_names_where_it_looked(tmp_path):
    proc, log = run_script({"EVAL_ONLY": "1", "RUN_ID": "nodata"}, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = next(l for l in log.splitlines() if l.startswith("error:"))
    assert str(tmp_path / "data") in error and "DATA_DIR" in error and "unset" not in error, error


def test_sample_is_found_beside_the_script_or_under_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "SAMPLE_DATA_DIR", tmp_path / "nowhere")  # a packed copy, away from the repository
    monkeypatch.chdir(tmp_path)
    h = tg.Hyperparameters({}, cuda_available=False)
    assert not h.sample_data and h.sample_searched == [tmp_path / "nowhere", tmp_path / "data" / "sample"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(REPO / "data" / "sample")
    h = tg.Hyperparameters({}, cuda_available=False)
    assert h.sample_data and Path(h.data_dir) == tmp_path / "data" / "sample"


# ------------------------------------------------------------------------------------------------
# the packed copy, run from another folder
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_packed_copy_runs_from_anywhere(tiny_data, tmp_path):
    packed = tmp_path / "submission" / "train_gpt.py"
    proc, _ = run_script({}, tmp_path, args=["--pack", str(packed)])
    assert proc.returncode == 0, proc.stderr
    env = tiny_settings(tiny_data, EVAL_ONLY="1", RUN_ID="packed_eval", SLIDING_WINDOW_ENABLED="0")
    h = tg.Hyperparameters(env, cuda_available=False)
    artifact = tmp_path / "final_model.int6.ptz"
    artifact.write_bytes(tiny_artifact(h, h.eval_config()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc, log = run_script(dict(env, ARTIFACT_PATH=str(artifact)), elsewhere, script=packed, timeout=180)
    assert proc.returncode == 0, (proc.stderr + log)[-3000:]
    assert "quantized val_loss:" in log and log.rstrip().endswith("run_complete")
    assert re.search(r"^code: commit:\S+ dirty:\S+ git_blob:[0-9a-f]{40}$", log, re.M)
    # with no data at all, the error names what was looked for, and no variable the user never set
    proc, log = run_script({"RUN_ID": "nodata"}, elsewhere, script=packed, timeout=120)
    assert proc.returncode == 2
    error = next(l for l in log.splitlines() if l.startswith("error:"))
    for looked in (elsewhere / "data", packed.parent / "data" / "sample", elsewhere / "data" / "sample"):
        assert str(looked) in error, (looked, error)
    assert "unset" not in error
