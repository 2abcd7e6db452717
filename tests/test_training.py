"""Whole tiny runs of train_gpt.py on CPU: distributed equivalence, every stage, warm-up without trace,
wallclock cap, looping switch."""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_script, run_two_ranks, tiny_settings  # noqa: E402

TRAIN_LINE = re.compile(r"^(\d+)/(\d+) train_loss: ([\d.]+) train_time: (\d+)ms", re.M)


def train_losses(log: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(3))) for m in TRAIN_LINE.finditer(log)]


def stage(log: str, name: str) -> tuple[float, float]:
    m = re.search(rf"^{re.escape(name)} val_loss:([\d.]+) val_bpb:([\d.]+) eval_time:\d+ms$", log, re.M)
    assert m, f"no '{name}' line in the log:\n{log[-3000:]}"
    return float(m.group(1)), float(m.group(2))


def run_ok(env, cwd: Path, **kw):
    cwd.mkdir(parents=True, exist_ok=True)
    proc, log = run_script(env, cwd, **kw)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}\nlog:\n{log[-3000:]}"
    return proc, log


def weights(cwd: Path) -> dict[str, torch.Tensor]:
    return torch.load(cwd / "final_model.pt", map_location="cpu")


# Two micro-steps of 8 sequences: the same split of the 16-sequence batch as 2 ranks x 8 sequences, so a
# 2-process run must reproduce this one exactly (halving a loss and summing two halves is exact in floating
# point). With one micro-step of 16 the sums run in another order; Muon's bf16 Newton-Schulz then turns
# those last-bit differences into visible ones wherever a gradient has tiny singular values (the
# zero-initialized output projections after the first step: up to ~4 % of an element).
BASE = dict(TTT_ENABLED="1", WARMUP_STEPS="3", GRAD_ACCUM_STEPS="2")


@pytest.fixture(scope="module")
def baseline(tiny_data, tmp_path_factory):
    """One process, every stage on (TTT too), with a mistyped setting in the environment."""
    cwd = tmp_path_factory.mktemp("baseline")
    env = tiny_settings(tiny_data, **BASE)
    env["MATRIX_LRR"] = "0.5"
    _, log = run_ok(env, cwd)
    return cwd, log


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_end_to_end_run_logs_every_stage_and_learns(baseline):
    cwd, log = baseline
    losses = train_losses(log)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    for name in ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt"):
        loss, bpb = stage(log, name)
        assert 0 < loss < 7 and 0 < bpb
    assert re.search(r"^ttt:legality score_first:1 .*each_token_once:1", log, re.M)
    assert abs(stage(log, "quantized_ttt")[0] - stage(log, "quantized_sliding_window")[0]) > 1e-5  # TTT trained
    assert "warmup_step: 3/3" in log and "loop_warmup_step: 3/3" in log
    assert "layer_loop:enabled step:3 " in log  # ENABLE_LOOPING_AT=0.35 of 8 steps
    assert "warning: environment variable MATRIX_LRR is not a setting of this script; did you mean MATRIX_LR?" in log
    assert log.rstrip().endswith("run_complete")
    assert (cwd / "final_model.pt").is_file() and (cwd / "final_model.int6.ptz").is_file()
    assert "stopping_early" not in log


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_two_gloo_ranks_give_the_single_process_weights(tiny_data, tmp_path):
    # Both runs with the fixed quintic and without the attention gate: Polar Express (a first step that multiplies
    # by ~8) and the gate each amplify the last-bit differences below ~8x over 8 steps (measured: 1e-5 -> 8e-5 and
    # 1.5e-4), which would bury the bound that tells a correct split from a wrong one. Neither touches the
    # distributed code: the gate is one more DDP parameter, Polar Express only other coefficients.
    exact = dict(BASE, MUON_NS_COEFFS="quintic", ATTN_GATE="0")
    base_cwd = tmp_path / "one"
    _, base_log = run_ok(tiny_settings(tiny_data, **exact), base_cwd)
    cwd = tmp_path / "ddp"
    env = tiny_settings(tiny_data, **dict(exact, GRAD_ACCUM_STEPS="0"))
    _, log = run_ok(env, cwd, torchrun_procs=2, timeout=400)
    assert "world_size:2" in log
    assert "derived: grad_accum_steps:1 micro_batch_seqs:8 " in log  # 16 sequences split over 2 ranks
    assert "derived: grad_accum_steps:2 micro_batch_seqs:8 " in base_log
    one, two = weights(base_cwd), weights(cwd)
    assert one.keys() == two.keys()
    for name in one:
        a, b = one[name], two[name]
        # Same math, different summation order (micro-batch accumulation against an all-reduce), and Muon's
        # Newton-Schulz runs in bf16, where a last-bit difference can flip a rounding: on some CPUs (an AMD EPYC
        # with torch 2.13) the weights then differ by up to ~6e-6 after 8 steps. One step moves a weight by
        # ~1e-3, and a wrong split of the batch or a missed all-reduce moves it by far more than this bound.
        scale = a.abs().max()
        assert (a - b).abs().max() <= 2e-5 * (1 + scale), (name, (a - b).abs().max().item())
    assert [s for s, _ in train_losses(log)] == list(range(1, 9))
    assert "layer_loop:enabled step:3 " in log
    pre_one, pre_two = stage(base_log, "pre-quantization post-ema"), stage(log, "pre-quantization post-ema")
    assert pre_two == pytest.approx(pre_one, abs=2e-6)
    # every later stage runs distributed too (GPTQ calibration split over ranks, TTT gradients all-reduced)
    # (same windows, same sums up to their order: equal to the printed digits in practice)
    for name in ("quantized", "quantized_sliding_window", "quantized_ttt"):
        loss, bpb = stage(log, name)
        assert (loss, bpb) == pytest.approx(stage(base_log, name), abs=2e-5), name
    assert re.search(r"^ttt:legality score_first:1 .*each_token_once:1", log, re.M)
    assert log.rstrip().endswith("run_complete")


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_warm_up_leaves_no_trace(baseline, tiny_data, tmp_path):
    base_cwd, base_log = baseline  # WARMUP_STEPS=3
    cwd = tmp_path / "nowarm"
    env = tiny_settings(tiny_data, **dict(BASE, WARMUP_STEPS="0", SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0"))
    _, log = run_ok(env, cwd)
    assert "warmup_step" not in log
    assert train_losses(log) == train_losses(base_log)
    a, b = weights(base_cwd), weights(cwd)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_measured_calibration_reserve_keeps_training_plus_calibration_within_the_cap(tiny_data, tmp_path):
    env = tiny_settings(tiny_data, ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="4", TRAIN_LOG_EVERY="1000",
                        SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", WARMUP_STEPS="1", GPTQ_CALIBRATION_BATCHES="6")
    _, log = run_ok(env, tmp_path / "auto")
    m = re.search(r"^wallclock: cap 4s, ([\d.]+)s reserved for GPTQ calibration \(measured: 6 batches/rank x (\d+)ms "
                  r"probe x 1.25 \+ 1s\), training stops at (\d+)ms$", log, re.M)
    assert m, log[:3000]
    reserve_s, probe_ms, stop_ms = float(m.group(1)), int(m.group(2)), int(m.group(3))
    assert reserve_s == pytest.approx(6 * probe_ms / 1000 * 1.25 + 1, abs=0.06)
    assert stop_ms == pytest.approx(4000 - 1000 * reserve_s, abs=50)  # the log rounds the reserve to 0.1 s
    calib_ms = int(re.search(r"^gptq:calibration batches:6 time:(\d+)ms$", log, re.M).group(1))
    assert calib_ms < 1000 * reserve_s  # the estimate covered what calibration took
    assert "train_within_budget:1" in next(l for l in log.splitlines() if l.startswith("compliance:"))


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_wallclock_cap_stops_early(tiny_data, tmp_path):
    env = tiny_settings(tiny_data, ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="3", GPTQ_RESERVE_SECONDS="1",
                        TRAIN_LOG_EVERY="1000", SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", WARMUP_STEPS="1")
    _, log = run_ok(env, tmp_path / "cap")
    m = re.search(r"^stopping_early: wallclock_cap train_time: (\d+)ms step: (\d+)/100000$", log, re.M)
    assert m, log[-3000:]
    train_ms, steps = int(m.group(1)), int(m.group(2))
    assert 0 < steps < 100000
    # the 3 s - 1 s budget is used up: the last step is the one predicted (from the previous step's length)
    # to end past 2000 ms, so training ends at most about one step before it
    assert train_ms + 1.5 * train_ms / steps >= 2000
    assert "wallclock: cap 3s, 1.0s reserved for GPTQ calibration (GPTQ_RESERVE_SECONDS set), training stops at 2000ms" in log
    # the last step is logged even off the TRAIN_LOG_EVERY grid
    assert train_losses(log)[-1][0] == steps
    # looping switches on by time fraction, before the end
    m = re.search(r"^layer_loop:enabled step:(\d+) frac:([\d.]+)", log, re.M)
    if steps >= 3:  # (a machine so loaded that a step takes 0.7 s could stop before the switch)
        assert m and 0 < int(m.group(1)) < steps and 0.35 <= float(m.group(2)) < 1
    assert re.search(r"^train_budget: train_time:\d+ms calibration:\d+ms total:\d+ms limit:3000ms$", log, re.M)
    stage(log, "quantized")
    assert log.rstrip().endswith("run_complete")


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_looping_switches_on_at_the_configured_fraction(tiny_data, tmp_path):
    env = tiny_settings(tiny_data, ENABLE_LOOPING_AT="0.75", NUM_LAYERS="4", XSA_LAST_N="4", LOOP_START="1",
                        LOOP_END="2", NUM_LOOPS="1", PARALLEL_RESIDUAL_START="3", SLIDING_WINDOW_ENABLED="0",
                        TTT_ENABLED="0", WARMUP_STEPS="0")
    _, log = run_ok(env, tmp_path / "loop")
    lines = re.findall(r"^layer_loop:enabled .*$", log, re.M)
    assert lines == ["layer_loop:enabled step:6 frac:0.750 encoder:[0, 1, 2] decoder:[1, 2, 3]"]
    # the switch happens once, before the 7th step is queued; steps are logged once they have finished,
    # while the next one runs, so step 6's line follows the switch and step 5's precedes it
    assert log.index("5/8 train_loss") < log.index(lines[0]) < log.index("6/8 train_loss") < log.index("7/8 train_loss")
    assert log.rstrip().endswith("run_complete")


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_document_mask_and_span_schedule_run_every_stage(tiny_data, tmp_path):
    """Issue 16 item 3: DOC_MASK=1 with a growing attention span trains, switches the span at the fractions
    asked, and scores every stage from the artifact (which carries DOC_MASK), with two lanes in the last block
    as the record preset has them."""
    env = tiny_settings(tiny_data, DOC_MASK="1", TRAIN_SPAN_SCHEDULE="16@0.25,32@0.5", TTT_ENABLED="1",
                        TWO_LANE_START="2")
    _, log = run_ok(env, tmp_path / "docmask")
    spans = re.findall(r"^attention_span: step:(\d+) frac:[\d.]+ span:(\d+)$", log, re.M)
    assert spans == [("0", "16"), ("2", "32"), ("4", "64")]  # 8 steps: the span grows at steps 2 and 4
    assert "  DOC_MASK=True" in log and "  TWO_LANE_START=2" in log
    for name in ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt"):
        loss, bpb = stage(log, name)
        assert 0 < loss < 7 and 0 < bpb
    assert log.rstrip().endswith("run_complete")


CHANNEL_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    import train_gpt as tg
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    for own in (False, True):  # the default group, and a gloo group of its own (what NCCL runs use)
        channel = tg.HostChannel(True, own_group=own)
        out[str(own)] = {"max": channel.max([rank, 10 - rank, float(rank == 1)]), "mean": channel.mean([rank + 1.0])}
    print(json.dumps(out))
    dist.destroy_process_group()
    # Leave without interpreter finalization, as train_gpt.py does for gloo (SKIP_FINALIZATION): gloo's threads
    # can abort it ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_host_channel_agrees_across_two_gloo_ranks(tmp_path):
    """Both ranks get the same elapsed time (the max), the same divergence flag, the mean logged loss."""
    for text in run_two_ranks(["-c", CHANNEL_WORKER, str(REPO)]):
        got = json.loads(text.strip().splitlines()[-1])
        for own in ("False", "True"):
            assert got[own] == {"max": [1.0, 10.0, 1.0], "mean": [1.5]}
