"""Tests for tools/: synthetic seed logs in the format train_gpt.py writes, CPU only, a few seconds."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools import ab_table, compare_curves, logparse, pack_record, plot_loss, provenance, run_seeds, significance, summarize, trace_gaps  # noqa: E402

SOURCE = "print('readable training script')\n" * 50
PACKED = "#packed\n" + "x" * 123 + "\n"
SOURCE_SHA = hashlib.sha256(SOURCE.encode()).hexdigest()
COMMIT = "c0ffee" * 6 + "c0ff"  # a commit named by the synthetic logs' code: line (not in any history)
PACKED_SHA = hashlib.sha256(PACKED.encode()).hexdigest()
CODE = len(PACKED.encode())
VAL_TOKENS, VAL_BYTES = 62021845, 231136500  # ~3.727 bytes per token, like FineWeb SP8192

# seed -> (pre-quant, quantized, sliding, ttt) val_bpb
SCORES = {
    42: (1.08730, 1.09936, 1.08261, 1.08078),
    314: (1.08750, 1.09950, 1.08280, 1.08100),
    999: (1.08770, 1.09970, 1.08300, 1.08118),
}


def loss(bpb):
    return bpb * math.log(2) * VAL_BYTES / VAL_TOKENS


def make_log(seed=42, ttt=True, complete=True, matrix_lr="0.022", model_bytes=15975300, stop_early=True,
             train_ms=588012, calib_ms=8123, eval_ms=434253, source=SOURCE, packed=PACKED) -> str:
    pre, quant, slide, ttt_bpb = SCORES[seed]
    source_sha, packed_sha = hashlib.sha256(source.encode()).hexdigest(), hashlib.sha256(packed.encode()).hexdigest()
    code = len(packed.encode())
    total = model_bytes + code
    lines = [
        f"script: train_gpt.py sha256:{source_sha} bytes:{len(source.encode())} packed_sha256:{packed_sha} packed_bytes:{code}",
        f"code: commit:{COMMIT} dirty:0 git_blob:{provenance.git_blob_id(source.encode())}",
        "env: python:3.12.3 torch:2.11.0+cu130 cuda:13.0 device:NVIDIA H100 80GB HBM3 gpus:8 world_size:8 host:abc "
        "launcher:torchrun backend:nccl",
        f"run: id:train_seed{seed} log:logs/train_seed{seed}.txt artifact:final_model.int6.ptz model:final_model.pt",
        "preset: record (CUDA and challenge shards found)",
        "settings:",
        "  PRESET='record'",
        "  DATA_DIR='./data/'",
        f"  SEED={seed}",
        f"  RUN_ID='train_seed{seed}'",
        f"  MATRIX_LR={matrix_lr}",
        "  SLIDING_WINDOW_ENABLED=True",
        f"  TTT_ENABLED={ttt}",
        f"env_set: MATRIX_LR={matrix_lr} RUN_ID=train_seed{seed} SEED={seed} TTT_ENABLED={int(ttt)}",
        f"data: train_shards:80 train_tokens:8000000000 val_tokens:{VAL_TOKENS + 1} tokenizer_sha256:ab12",
        "model_params:35944536",
        "warmup_step: 20/20",
        "1/20000 train_loss: 9.0123 train_time: 412ms step_avg: 412.00ms tok/s: 1908000",
        "500/20000 train_loss: 3.2101 train_time: 65011ms step_avg: 130.02ms tok/s: 6049000",
        "layer_loop:enabled step:1590 frac:0.350",
        "4000/20000 train_loss: 2.9500 train_time: 520000ms step_avg: 130.00ms tok/s: 6049000",
        "4000/20000 val_loss: 2.9012 val_bpb: 1.1234",
    ]
    if stop_early:
        lines.append(f"stopping_early: wallclock_cap train_time: {train_ms}ms step: 4550/20000")
    lines += [
        "peak memory allocated: 39011 MiB reserved: 40122 MiB",
        f"gptq:calibration batches:64 time:{calib_ms}ms",
        f"train_budget: train_time:{train_ms}ms calibration:{calib_ms}ms total:{train_ms + calib_ms}ms limit:600000ms",
        "compliance: pre_quant_val_training:none train_data_closed_before_eval:1",
        f"pre-quantization post-ema val_loss:{loss(pre):.8f} val_bpb:{pre:.8f} eval_time:9011ms",
        f"pre-quantization post-ema val_tokens:{VAL_TOKENS + 1} val_bytes:{VAL_BYTES}",
        "gptq:quantized 67 tensors in 3.1s",
        f"Serialized model quantized+brotli: {model_bytes} bytes",
        f"Code size: {code} bytes (readable: {len(source.encode())} bytes)",
        f"Total submission size quantized+brotli: {total} bytes",
        f"artifact: path=final_model.int6.ptz fits:{int(total <= 16_000_000)} limit:16000000 margin:{16_000_000 - total}",
        f"quantized val_loss:{loss(quant):.8f} val_bpb:{quant:.8f} eval_time:9661ms",
        f"quantized val_tokens:{VAL_TOKENS + 1} val_bytes:{VAL_BYTES}",
        f"quantized_sliding_window val_loss:{loss(slide):.8f} val_bpb:{slide:.8f} eval_time:91365ms",
        f"quantized_sliding_window val_tokens:{VAL_TOKENS} val_bytes:{VAL_BYTES}",
    ]
    if ttt:
        lines += [
            "ttt:legality score_first:1 chunks:1893 trained_chunks:1892 tokens_scored:62021845 each_token_once:1 updates_before_score:0",
            f"quantized_ttt val_loss:{loss(ttt_bpb):.8f} val_bpb:{ttt_bpb:.8f} eval_time:324216ms",
            f"quantized_ttt val_tokens:{VAL_TOKENS} val_bytes:{VAL_BYTES}",
        ]
    lines.append(f"eval_total: time:{eval_ms}ms limit:600000ms")
    if complete:
        lines.append("run_complete")
    else:
        lines.append("error: CUDA out of memory in sliding-window eval")
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def no_git_history(monkeypatch):
    """The synthetic logs name a commit that no history holds: take it as logged, unchecked (as on a
    machine without git). tests/test_provenance.py covers the history search."""
    monkeypatch.setattr(provenance, "history_problem", lambda repo=None: "synthetic test logs")


def write_logs(tmp_path, per_seed=None, **common) -> list[str]:
    """One log per seed of SCORES; per_seed = {seed: make_log overrides}, common applies to all."""
    paths = []
    for seed in SCORES:
        path = tmp_path / f"train_seed{seed}.log"
        path.write_text(make_log(seed, **{**common, **(per_seed or {}).get(seed, {})}))
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------ logparse

def test_parse_log_reads_every_line_kind(tmp_path):
    path = tmp_path / "a.log"
    path.write_text(make_log(42))
    run = logparse.parse_log(path)
    assert run.missing() == []
    assert run.seed == 42 and run.run_id == "train_seed42" and run.setting("TTT_ENABLED") is True
    assert run.script["sha256"] == SOURCE_SHA and run.script["packed_bytes"] == CODE
    assert run.env["device"] == "NVIDIA H100 80GB HBM3" and run.env["torch"] == "2.11.0+cu130"
    assert run.steps == 4550 and run.train_time_ms == 588012 and run.train_total_ms == 596135
    assert run.train[1] == (500, 3.2101, 65011.0) and run.val == [(4000, 2.9012, 1.1234)]
    assert run.final_stage == "ttt" and run.final.val_bpb == pytest.approx(1.08078)
    assert run.stages["sliding"].val_tokens == VAL_TOKENS
    assert run.model_bytes == 15975300 and run.code_bytes == CODE and run.compressor == "brotli"
    assert run.total_bytes == 15975300 + CODE and run.artifact["fits"]
    assert run.ttt_legality["updates_before_score"] == "0" and run.eval_total["time_ms"] == 434253
    assert run.bytes_per_token() == pytest.approx(VAL_BYTES / VAL_TOKENS)


def test_parse_log_without_ttt_or_stopping_early(tmp_path):
    text = make_log(42, ttt=False, stop_early=False).replace("quantized+brotli", "quantized+lzma")
    run = logparse.parse_text(text)
    assert run.missing() == []
    assert run.final_stage == "sliding" and run.compressor == "lzma"
    assert run.steps == 4000  # last logged step when the run ends at ITERATIONS
    assert run.train_time_ms == 588012  # from train_budget


def test_missing_names_absent_stage():
    text = make_log(42).replace("quantized_ttt val_loss", "something_else val_loss")
    assert "quantized_ttt result" in logparse.parse_text(text).missing()


def test_reused_run_id_is_not_a_single_run():
    assert any("RUN_ID reused" in m for m in logparse.parse_text(make_log(42) + make_log(42)).missing())


# ------------------------------------------------------------------------------------------------ summarize

def test_summarize_mean_std_compliance(tmp_path, capsys):
    logs = write_logs(tmp_path)
    out = tmp_path / "submission.json"
    rc = summarize.main(logs + ["--name", "test run", "--author", "A", "--github-id", "a", "--technique", "t",
                                "--date", "2026-05-01", "--out", str(out)])
    assert rc == 0
    sub = json.loads(out.read_text())
    finals = [s[3] for s in SCORES.values()]
    assert sub["val_bpb"] == round(statistics.mean(finals), 5)
    assert sub["val_bpb_std"] == round(statistics.stdev(finals), 5)
    assert sub["seeds"] == [42, 314, 999] and sub["track"] == "10min_16mb" and sub["date"] == "2026-05-01"
    r = sub["seed_results"]["314"]
    assert r["val_bpb"] == pytest.approx(1.081) and r["sliding_val_bpb"] == pytest.approx(1.0828)
    assert r["artifact_bytes"] == 15975300 + CODE and r["steps"] == 4550 and r["train_time_s"] == 588.012
    assert r["eval_time_s"] == 434.253 and r["pre_quant_val_bpb"] == pytest.approx(1.0875)
    assert sub["compliance"] == {
        "train_under_600s": True, "eval_under_600s": True, "artifact_under_16mb": True,
        "score_first_ttt": True, "no_pre_quant_ttt": True, "train_data_closed_before_eval": True,
        "three_seeds": True,
    }
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.11.0+cu130"
    assert sub["script_sha256"] == PACKED_SHA and sub["source_sha256"] == SOURCE_SHA
    table = capsys.readouterr().out
    assert "| seed | steps | pre-quant | quantized | sliding | TTT | artifact bytes |" in table
    assert "| 42 | 4550 | 1.08730 | 1.09936 | 1.08261 | 1.08078 |" in table


def test_summarize_computes_track_data_and_commands_from_the_logs(tmp_path):
    sub = summarize.build_submission(summarize.load_runs(write_logs(tmp_path)), "n", "a", "g", "t", "2026-05-01")
    assert sub["track"] == "10min_16mb" and sub["non_record_reasons"] == []
    assert sub["world_size"] == 8 and sub["launcher"] == "torchrun" and sub["data"]["fineweb"] is True
    assert sub["train_seconds"] == 596.135 and sub["eval_seconds"] == 434.253
    assert sub["source_commit"] == COMMIT and sub["source_commit_checked"] is False
    assert sub["reproduce"]["314"] == ("MATRIX_LR=0.022 RUN_ID=train_seed314 SEED=314 TTT_ENABLED=1 "
                                       "torchrun --standalone --nproc_per_node=8 train_gpt.py")
    assert sub["compliance_logged"]["42"]["ttt_legality"]["each_token_once"] == "1"
    proxy = [Path(p) for p in write_logs(tmp_path, eval_ms=612000)]
    for path in proxy:
        path.write_text(path.read_text().replace("world_size:8", "world_size:1").replace(f"val_tokens:{VAL_TOKENS + 1}", "val_tokens:49229"))
    sub = summarize.build_submission(summarize.load_runs([str(p) for p in proxy]), "n", "a", "g", "t", "2026-05-01")
    assert sub["track"] == "non_record_16mb" and sub["hardware"] == "1xNVIDIA H100 80GB HBM3"
    reasons = " | ".join(sub["non_record_reasons"])
    assert "world size 1, not 8" in reasons and "val_tokens 49,229" in reasons and "evaluation took 612.0 s" in reasons
    assert "torchrun --standalone --nproc_per_node=1" in sub["reproduce"]["42"]  # the logged launcher


def test_fineweb_scored_on_case_operator_shards_is_still_fineweb(tmp_path):
    """The same val documents as case-op shards take ~6.5 % more tokens (66 M for FineWeb's 62 M): still FineWeb."""
    logs = [Path(p) for p in write_logs(tmp_path)]
    for path in logs:
        path.write_text(path.read_text().replace(f"val_tokens:{VAL_TOKENS + 1}", "val_tokens:66053765"))
    sub = summarize.build_submission(summarize.load_runs([str(p) for p in logs]), "n", "a", "g", "t", "2026-05-01")
    assert sub["data"]["fineweb"] is True and sub["track"] == "10min_16mb"


def test_summarize_prints_json_or_writes_only_with_force(tmp_path, capsys):
    logs = write_logs(tmp_path)
    assert summarize.main(logs + ["--date", "2026-05-01"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["seeds"] == [42, 314, 999] and "| seed |" in captured.err
    out = tmp_path / "submission.json"
    out.write_text("{}\n")
    assert summarize.main(logs + ["--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "{}\n"
    assert summarize.main(logs + ["--out", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["track"] == "10min_16mb"


def test_summarize_compliance_failures_and_no_ttt(tmp_path):
    logs = write_logs(tmp_path, {999: {"calib_ms": 20000, "model_bytes": 16_000_000}}, ttt=False)
    runs = summarize.load_runs(logs)
    c = summarize.compliance(runs)
    assert c["score_first_ttt"] == "not used"
    assert c["train_under_600s"] is False and c["artifact_under_16mb"] is False and c["eval_under_600s"] is True
    assert summarize.compliance(runs[:2])["three_seeds"] is False
    assert summarize.seed_result(runs[0])["val_bpb"] == pytest.approx(SCORES[42][2])  # sliding when no TTT


def test_summarize_refuses_incomplete_log(tmp_path, capsys):
    logs = write_logs(tmp_path, {314: {"complete": False}})
    assert summarize.main(logs + ["--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "train_seed314.log" in err and "run_complete" in err and "CUDA out of memory" in err
    assert not (tmp_path / "s.json").exists()


def test_summarize_refuses_different_setting(tmp_path, capsys):
    logs = write_logs(tmp_path, {999: {"matrix_lr": "0.03"}})
    assert summarize.main(logs + ["--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "train_seed999.log" in err and "MATRIX_LR=0.03" in err and "MATRIX_LR=0.022" in err


def test_summarize_refuses_different_script(tmp_path):
    logs = write_logs(tmp_path)
    Path(logs[1]).write_text(Path(logs[1]).read_text().replace(SOURCE_SHA, "0" * 64))
    with pytest.raises(summarize.Refused, match="script sha256"):
        summarize.load_runs(logs)


# ------------------------------------------------------------------------------------------------ significance

@pytest.mark.parametrize("t,df,expected", [
    (2.0, 10, 0.03669),  # one-sided table value
    (0.0, 3, 0.5),
    (1.3, 1, 0.5 - math.atan(1.3) / math.pi),  # Cauchy
    (-0.7, 2, 0.5 + 0.7 / (2 * math.sqrt(2 + 0.49))),  # closed form for 2 df
    (1.96, 1e7, 0.0249979),  # normal limit
    (31.821, 1, 0.01),
])
def test_t_sf_known_values(t, df, expected):
    assert significance.t_sf(t, df) == pytest.approx(expected, abs=5e-6)


def _t4_sf(t):  # closed form of Student t with 4 degrees of freedom
    x = t * t / (4 + t * t)
    return 0.5 - 0.375 * (t / math.sqrt(1 + t * t / 4)) * (1 - x / 3)


def test_significance_hand_example():
    ours, base = [1.0780, 1.0790, 1.0800], [1.0810, 1.0820, 1.0830]
    res = significance.compare(ours, base, bytes_per_token=3.73)
    # variances 1e-6 on both sides: se = sqrt(2e-6/3), Welch df = 4 exactly
    se = math.sqrt(2e-6 / 3)
    assert res["improvement_bpb"] == pytest.approx(0.003)
    assert res["improvement_nats"] == pytest.approx(0.003 * math.log(2) * 3.73)
    assert res["frontier"]["df"] == pytest.approx(4.0)
    assert res["frontier"]["t"] == pytest.approx(0.003 / se)
    assert res["frontier"]["p"] == pytest.approx(_t4_sf(0.003 / se), rel=1e-9)
    assert res["frontier"]["met"] is True
    margin = 0.005 / (math.log(2) * 3.73)
    assert res["record"]["t"] == pytest.approx((0.003 - margin) / se)
    assert res["record"]["p"] == pytest.approx(_t4_sf((0.003 - margin) / se), rel=1e-9)
    assert res["record"]["met"] is False


def test_significance_cli_reads_logs_and_bytes_per_token(tmp_path, capsys):
    logs = write_logs(tmp_path)
    assert significance.main(logs + ["--baseline", "1.0830,1.0835,1.0840"]) == 0
    out = capsys.readouterr().out
    assert f"bytes per token: {VAL_BYTES / VAL_TOKENS:.4f} (from val_bytes/val_tokens)" in out
    assert "record rule:" in out and "frontier rule:" in out and "-> MET" in out


def test_significance_from_submission_json(tmp_path, capsys):
    ours = tmp_path / "ours.json"
    base = tmp_path / "base.json"
    ours.write_text(json.dumps({"seed_results": {"1": {"val_bpb": 1.07}, "2": {"val_bpb": 1.071}, "3": {"val_bpb": 1.072}}}))
    base.write_text(json.dumps({"seed_results": {"1": {"val_bpb": 1.08079}, "2": {"val_bpb": 1.08103}, "3": {"val_bpb": 1.08118}}}))
    assert significance.main([str(ours), "--baseline", str(base), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bytes_per_token"] == 3.73 and res["record"]["met"] is True


# ------------------------------------------------------------------------------------------------ pack_record

@pytest.fixture
def packable(tmp_path, monkeypatch):
    script = tmp_path / "train_gpt.py"
    script.write_text(SOURCE)
    req = tmp_path / "requirements.txt"
    req.write_text("brotli\nsentencepiece\n")
    monkeypatch.setattr(pack_record, "load_pack_source", lambda path: (lambda text: PACKED))
    return script, req


def test_pack_record_builds_complete_folder(tmp_path, packable):
    script, req = packable
    logs = write_logs(tmp_path)
    out = tmp_path / "records" / "rec"
    rc = pack_record.main(logs + ["--name", "My run", "--author", "A", "--technique", "tricks",
                                  "--out", str(out), "--script", str(script), "--requirements", str(req)])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_seed314.log", "train_seed42.log", "train_seed999.log"]
    assert (out / "train_gpt.py").read_text() == PACKED
    readme = (out / "README.md").read_text()
    assert "tricks" in readme and "| 999 | 4550 |" in readme
    assert f"Produced by commit `{COMMIT}`" in readme and "Track 10min_16mb." in readme
    assert "MATRIX_LR=0.022 RUN_ID=train_seed999 SEED=999 TTT_ENABLED=1 torchrun" in readme
    assert json.loads((out / "submission.json").read_text())["name"] == "My run"
    assert not list(out.parent.glob(".*partial"))


def test_pack_record_ships_the_runs_tokenizer_and_refuses_another(tmp_path, packable, capsys):
    script, req = packable
    model = tmp_path / "fineweb_8192_bpe.model"
    model.write_bytes(b"a case-op tokenizer")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    logs = [Path(p) for p in write_logs(tmp_path)]
    for path in logs:
        path.write_text(path.read_text().replace("tokenizer_sha256:ab12", f"tokenizer_sha256:{digest}"))
    args = [str(p) for p in logs] + ["--name", "x", "--script", str(script), "--requirements", str(req)]
    out = tmp_path / "rec"
    assert pack_record.main(args + ["--out", str(out), "--tokenizer", str(model)]) == 0
    assert (out / "tokenizer" / model.name).read_bytes() == model.read_bytes()
    assert f"`tokenizer/{model.name}` (sha256 `{digest}`" in (out / "README.md").read_text()
    other = tmp_path / "other.model"
    other.write_bytes(b"the plain tokenizer")
    assert pack_record.main(args + ["--out", str(tmp_path / "rec2"), "--tokenizer", str(other)]) == 2
    assert "the logs name tokenizer_sha256 " + digest in capsys.readouterr().err
    assert not (tmp_path / "rec2").exists()


def test_load_pack_source_from_a_script_file(tmp_path):
    good = tmp_path / "good_script.py"
    good.write_text("from __future__ import annotations\nimport dataclasses\n@dataclasses.dataclass\nclass C:\n    x: int = 1\n"
                    "def pack_source(text):\n    return 'packed:' + text\n")
    assert pack_record.load_pack_source(good)("abc") == "packed:abc"
    bad = tmp_path / "bad_script.py"
    bad.write_text("x = 1\n")
    with pytest.raises(summarize.Refused, match="no pack_source"):
        pack_record.load_pack_source(bad)


def test_pack_record_uses_a_given_packed_copy(tmp_path, packable, monkeypatch):
    script, req = packable
    monkeypatch.setattr(pack_record, "load_pack_source", None)  # must not be called
    copy = tmp_path / "packed_elsewhere.py"
    copy.write_text(PACKED)
    out = pack_record.build(write_logs(tmp_path), "x", out=tmp_path / "r", script=script, requirements=req,
                            packed=copy)
    assert (out / "train_gpt.py").read_bytes() == copy.read_bytes()


def test_pack_record_with_the_real_pack_source(tmp_path):
    """End to end against train_gpt.pack_source itself (imports torch: about 2 s)."""
    pytest.importorskip("torch")
    train_gpt = pytest.importorskip("train_gpt")
    if not hasattr(train_gpt, "pack_source"):
        pytest.skip("train_gpt.pack_source not written yet")
    script = REPO / "train_gpt.py"
    source = script.read_text(encoding="utf-8")
    logs = write_logs(tmp_path, source=source, packed=train_gpt.pack_source(source))
    req = tmp_path / "requirements.txt"
    req.write_text("brotli\n")
    out = pack_record.build(logs, "real", out=tmp_path / "r", script=script, requirements=req)
    assert (out / "train_gpt.py").read_text(encoding="utf-8") == train_gpt.pack_source(source)
    assert "it compiles on Python" in (out / "README.md").read_text()


def test_pack_record_default_folder_name():
    assert pack_record.folder_name("2026-05-01", "SP8192 + TTT!") == "2026-05-01_SP8192_TTT"


def test_pack_record_refuses_size_mismatch(tmp_path, packable, monkeypatch, capsys):
    script, req = packable
    logs = write_logs(tmp_path)
    monkeypatch.setattr(pack_record, "load_pack_source", lambda path: (lambda text: PACKED + "#"))
    out = tmp_path / "rec"
    rc = pack_record.main(logs + ["--name", "x", "--out", str(out), "--script", str(script), "--requirements", str(req)])
    assert rc == 2
    assert f"packed_bytes:{CODE}" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_pack_record_refuses_artifact_sum_and_changed_script(tmp_path, packable):
    script, req = packable
    logs = write_logs(tmp_path)
    text = Path(logs[0]).read_text().replace("Serialized model quantized+brotli: 15975300", "Serialized model quantized+brotli: 15975000")
    Path(logs[0]).write_text(text)
    with pytest.raises(summarize.Refused, match="artifact .* != code"):
        pack_record.build(logs, "x", out=tmp_path / "r", script=script, requirements=req)
    write_logs(tmp_path)
    script.write_text(SOURCE + "# edited\n")
    with pytest.raises(summarize.Refused, match="changed after the runs"):
        pack_record.build(logs, "x", out=tmp_path / "r", script=script, requirements=req)


# ------------------------------------------------------------------------------------------------ run_seeds

def test_run_seeds_dry_run_prints_three_commands(capsys):
    assert run_seeds.main(["--dry-run", "--env", "TTT_ENABLED=1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, seed in zip(lines, (42, 314, 999)):
        assert line == (f"TTT_ENABLED=1 SEED={seed} RUN_ID=train_seed{seed} "
                        "torchrun --standalone --nproc_per_node=8 train_gpt.py")
    assert run_seeds.main(["--dry-run", "--nproc", "1", "--seeds", "7"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"RUN_ID=train_seed7 {sys.executable} train_gpt.py")


FAKE_TRAINER = """
import os, sys
from pathlib import Path
seed = int(os.environ["SEED"])
log = Path(os.environ.get("LOGS_DIR", "logs")) / (os.environ["RUN_ID"] + ".txt")
log.parent.mkdir(parents=True, exist_ok=True)
with open(log, "a") as f:
    f.write(f"settings:\\n  SEED={seed}\\n")
    if seed == int(os.environ["FAIL_SEED"]):
        f.write("error: shard fineweb_train_000003.bin is truncated\\n")
        sys.exit(1)
    f.write("run_complete\\n")
"""


def test_run_seeds_stops_at_first_failure(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_seed42.txt").write_text("old run\n")
    cmd = [sys.executable, str(REPO / "tools" / "run_seeds.py"), "--launcher", "python", "--nproc", "1",
           "--script", str(fake), "--env", "FAIL_SEED=314"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "seed 314 failed with exit code 1" in proc.stderr
    assert "error: shard fineweb_train_000003.bin is truncated" in proc.stderr
    assert "not run: seeds 999" in proc.stderr
    logs = tmp_path / "logs"
    assert (logs / "train_seed42.log").read_text() == "settings:\n  SEED=42\nrun_complete\n"
    assert (logs / "train_seed42.txt.1.old").read_text() == "old run\n"
    assert (logs / "train_seed314.log").exists() and not (logs / "train_seed999.txt").exists()


# ------------------------------------------------------------------------------------------------ plot_loss

def test_plot_loss_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    logs = write_logs(tmp_path)
    out = tmp_path / "loss.png"
    assert plot_loss.main(logs + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_loss_labels_tell_runs_of_one_seed_apart_and_skip_the_spike(tmp_path):
    runs = [logparse.parse_text(make_log(42).replace("RUN_ID='train_seed42'", f"RUN_ID='{name}'"), name)
            for name in ("cpu_a", "cpu_b")]
    assert plot_loss.labels(runs) == ["seed 42 (cpu_a)", "seed 42 (cpu_b)"]
    runs[0].train[:0] = [(1, 50.0, 1.0)]  # a huge first-step loss must not set the y range
    lo, hi = plot_loss.loss_range(runs)
    assert hi < 50.0 and lo <= min(st.val_loss for st in runs[0].stages.values())


def test_plot_loss_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    logs = write_logs(tmp_path)
    assert plot_loss.main(logs[:1] + ["--out", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ all tools

@pytest.mark.parametrize("tool", ["run_seeds", "summarize", "significance", "plot_loss", "pack_record", "logparse", "compare_curves", "provenance", "ab_table"])
def test_help(tool):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def _curve_log(tmp_path, name, losses: dict[int, float]) -> str:
    lines = [f"{s}/200 train_loss: {v:.4f} train_time: {100 * s}ms step_avg: 100.00ms" for s, v in losses.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_compare_curves_within_and_outside_noise(tmp_path, capsys):
    steps = range(10, 210, 10)
    ref = _curve_log(tmp_path, "ref.txt", {s: 9.0 - s / 100 for s in steps})
    close = _curve_log(tmp_path, "close.txt", {s: 9.0 - s / 100 + 0.002 for s in steps})
    far = _curve_log(tmp_path, "far.txt", {s: 9.0 - s / 100 + (0.2 if s == 120 else 0.0) for s in steps})
    noise = _curve_log(tmp_path, "noise.txt", {s: 9.0 - s / 100 - 0.005 for s in range(10, 310, 10)})
    assert compare_curves.main([ref, close, "--noise", noise]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tested"]["steps"] == 20 and out["tested"]["mean_abs"] == pytest.approx(0.002, abs=1e-6)
    assert out["noise"]["last"] == 200 and out["within_noise"] is True  # steps past --steps are ignored
    assert compare_curves.main([ref, far, "--noise", noise]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["tested"]["max_at"] == 120 and out["tested"]["max_abs"] == pytest.approx(0.2, abs=1e-6)
    assert compare_curves.main([ref, str(tmp_path / "missing.txt")]) == 2


def test_ab_table_pairs_seeds_and_reads_stages_and_throughput_from_real_logs(capsys):
    """The committed runs: the night session's three seeds of 195bf2d (A) against the late evening's of
    44eb3b2 (B), the same computation on two machines."""
    a = sorted(str(p) for p in (REPO / "records/2026-12-03_OneFile_v3_1xH200_ProxyCorpusCaseOps").glob("train_seed*.log"))
    b = sorted(str(p) for p in (REPO / "logs").glob("train_seed*.log"))
    assert ab_table.main(["--a", *a, "--b", *b]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    deltas = {r[0].strip("| "): r for r in rows if len(r) > 1 and r[1] == "B − A" and r[0] != "| mean"}
    assert sorted(deltas) == ["314", "42", "999"]
    la, lb = logparse.parse_log(a[1]), logparse.parse_log(b[1])  # sorted names: seed314, seed42, seed999
    assert la.seed == lb.seed == 42
    assert deltas["42"][2] == f"{lb.steps - la.steps:,}"
    assert deltas["42"][6] == f"{lb.stages['ttt'].val_bpb - la.stages['ttt'].val_bpb:+.5f}"
    # tokens/s before recurrence: from the step-50 line to the last one logged before `layer_loop:enabled`
    text = Path(b[1]).read_text()
    ms = {int(m[0]): int(m[1]) for m in re.findall(r"^(\d+)/20000 train_loss: \S+ train_time: (\d+)ms", text, re.M)}
    switch = int(re.search(r"layer_loop:enabled step:(\d+)", text)[1])
    last = max(step for step in ms if step < switch)
    pre, loop = ab_table.throughput(lb, text)
    assert pre == pytest.approx(196608 * (last - 50) / ((ms[last] - ms[50]) / 1000))
    assert 700e3 < loop < pre


def test_ab_table_refuses_unpaired_seeds_and_incomplete_logs(capsys):
    logs = sorted(str(p) for p in (REPO / "logs").glob("train_seed*.log"))
    assert ab_table.main(["--a", logs[0], "--b", logs[1]]) == 2
    assert "do not pair" in capsys.readouterr().err
    diverged = str(REPO / "notes/screening/2026-12-03_52ecd23_seed42_docmask_nan_train.log")  # NaN at step 3
    assert ab_table.main(["--a", logs[1], "--b", diverged]) == 2
    assert "not a complete seed log" in capsys.readouterr().err


def test_trace_gaps_finds_idle_time_and_the_host_operation_it_waited_for(tmp_path):
    """Three kernels: a 20 us gap before the second (launched inside Muon's step), the third overlapping the
    second by 2 us (two streams): busy time counts the overlap once."""
    def kernel(name, ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,
                "args": {"correlation": corr}}

    events = [kernel("k1", 0, 10, 1), kernel("k2", 30, 10, 2), kernel("k3", 38, 20, 3),
              launch(1, 1), launch(25, 2), launch(26, 3),
              {"ph": "X", "cat": "user_annotation", "name": "Optimizer.step#Muon.step", "ts": 20, "dur": 10, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 24, "dur": 2, "tid": 1}]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = trace_gaps.analyse(trace_gaps.load_events(str(path)))
    assert (r["span_ms"], r["busy_ms"], r["idle_ms"]) == pytest.approx((0.058, 0.038, 0.020))
    assert r["idle_by_host_op_ms"] == {"Optimizer.step#Muon.step": 0.02}
    assert r["largest_gaps"] == [(20, "Optimizer.step#Muon.step", "k2")]


@pytest.mark.slow  # a tiny training run, then the sweep process
def test_quant_sweep_scores_variants_from_their_packed_bytes(tiny_data, tmp_path):
    from conftest import run_script, tiny_settings
    env = tiny_settings(tiny_data, RUN_ID="qs", MODEL_PATH=str(tmp_path / "w.pt"), GPTQ_CALIBRATION_BATCHES="2")
    proc, log = run_script(env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = subprocess.run([sys.executable, str(REPO / "bench" / "quant_sweep.py"), str(tmp_path / "w.pt"), "",
                          "EMBED_BITS=5 MLP_CLIP_SIGMAS=30"], env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    rows = rows[:1] + rows[3:]  # the float line, then the variants' lines with their shipped bytes
    assert [r["variant"] for r in rows] == ["float weights", "", "EMBED_BITS=5 MLP_CLIP_SIGMAS=30"]
    float_bpb = float(next(l for l in log.splitlines() if l.startswith("pre-quant")).split("val_bpb:")[1].split()[0])
    assert rows[0]["val_bpb"] == pytest.approx(float_bpb, abs=1e-5)  # the same weights, the same plain pass
    run_bytes = int(next(l for l in log.splitlines() if l.startswith("Serialized model")).split(": ")[1].split()[0])
    assert abs(rows[1]["model_bytes"] - run_bytes) < 0.05 * run_bytes  # other calibration batches, same settings
    assert rows[2]["model_bytes"] < rows[1]["model_bytes"] and rows[2]["gap"] > rows[1]["gap"]
    # the eval sweep shares the sweeps' command line and setup: one sliding and one TTT variant on the artifact
    out = subprocess.run([sys.executable, str(REPO / "bench" / "eval_sweep.py"), str(tmp_path / "final_model.int6.ptz"),
                          "EVAL_STRIDE=16", "TTT_LR=0.01"], env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    assert [(r["variant"], r["ttt"]) for r in rows] == [("EVAL_STRIDE=16", False), ("TTT_LR=0.01", True)]
    assert all(r["legality"]["each_token_once"] == 1 for r in rows)
