"""The challenge's rules: one test per rule function, and tests that fail when the pipeline breaks a rule
that no single function holds (each written against a deliberate code change that must make it fail):
  - GPTQ calibration reads only training tokens,
  - the periodic validation loss changes neither the LR schedule nor the weights,
  - the weights that reach quantization are the EMA weights,
  - the TTT compile warm-up neither reads validation tokens nor changes the weights.
CPU only, in-process, tiny sizes."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_VOCAB, tiny_settings

import train_gpt as tg

CPU = torch.device("cpu")
TRAIN_IDS = 400  # in the split-vocabulary data, training shards use ids < 400 and validation ids >= 400


# ------------------------------------------------------------------------------------------------
# one test per rule function
# ------------------------------------------------------------------------------------------------


def test_wallclock_stop_is_the_training_loops_decision(tiny_data, monkeypatch):
    assert not tg.wallclock_stop(1999.9, 2000.0)
    assert tg.wallclock_stop(2000.0, 2000.0) and tg.wallclock_stop(2500.0, 2000.0)
    assert not tg.wallclock_stop(1e12, None)  # no cap
    # the loop asks this function and nothing else: a stop at once ends training after the first checked step
    monkeypatch.setattr(tg, "wallclock_stop", lambda end_ms, cap_ms: True)
    h = tg.Hyperparameters(tiny_settings(tiny_data, ITERATIONS="8", WARMUP_STEPS="0"), cuda_available=False)
    torch.manual_seed(h.seed)
    trainer = tg.Trainer(h, tg.GPT(h), CPU)
    result, _ = trainer.train(None)
    trainer.loader.close()
    assert result.stopped_by_cap and result.steps < 8


def test_calibration_reserve_is_the_probe_scaled_with_a_margin():
    # 16 batches on one rank at 250 ms each: 4 s, x1.25 = 5 s, + 1 s
    assert tg.calibration_reserve_seconds(250.0, 16) == pytest.approx(6.0)
    assert tg.calibration_reserve_seconds(250.0, 2) < tg.calibration_reserve_seconds(250.0, 16)
    assert tg.calibration_reserve_seconds(0.0, 16) == tg.CALIBRATION_RESERVE_MARGIN_S


def test_reserve_probe_reads_no_training_data_and_leaves_the_weights(tiny_data, monkeypatch):
    h = tg.Hyperparameters(tiny_settings(tiny_data, MAX_WALLCLOCK_SECONDS="30"), cuda_available=False)
    torch.manual_seed(h.seed)
    trainer = tg.Trainer(h, tg.GPT(h), CPU)
    assert trainer.auto_reserve()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    reads = []
    monkeypatch.setattr(tg.TrainLoader, "next", lambda self: reads.append(1) or pytest.fail("probe read training data"))
    ms = tg.probe_calibration_ms(trainer.model, h, CPU)
    trainer.loader.close()
    assert ms > 0 and not reads
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    # a reserve set by hand, or GPTQ_RESERVE_AUTO=0, is used as given; no cap, no reserve at all
    for extra in (dict(GPTQ_RESERVE_SECONDS="5"), dict(GPTQ_RESERVE_AUTO="0"), dict(MAX_WALLCLOCK_SECONDS="0")):
        hx = tg.Hyperparameters(tiny_settings(tiny_data, **{"MAX_WALLCLOCK_SECONDS": "30", **extra}), cuda_available=False)
        t = tg.Trainer(hx, tg.GPT(hx), CPU)
        t.loader.close()
        assert not t.auto_reserve()


def test_train_within_budget():
    assert tg.train_within_budget(590_000, 10_000, 600)
    assert not tg.train_within_budget(590_000, 10_001, 600)
    assert not tg.train_within_budget(170_000, 11_000, 180)  # the run's own cap
    assert not tg.train_within_budget(700_000, 0, 1200)  # a cap above 600 s does not raise the challenge's limit
    assert tg.train_within_budget(599_000, 1_000, 0) and not tg.train_within_budget(599_000, 1_001, 0)  # no cap


def test_within_byte_limit_decides_where_the_artifact_goes(tmp_path, monkeypatch):
    assert tg.within_byte_limit(30_000, 15_970_000) and not tg.within_byte_limit(30_001, 15_970_000)
    h = tg.Hyperparameters({"PRESET": "small", "ARTIFACT_PATH": str(tmp_path / "a.ptz")}, cuda_available=False)
    monkeypatch.setattr(tg, "log", lambda msg="", console=True: None)
    assert tg.write_artifact(b"x" * 10, h, 10, 10) == tmp_path / "a.ptz"
    monkeypatch.setattr(tg, "within_byte_limit", lambda code, model: False)
    assert "OVER_LIMIT" in tg.write_artifact(b"x" * 10, h, 10, 10).name


def test_within_eval_limit():
    assert tg.within_eval_limit(600_000) and not tg.within_eval_limit(600_000.5)


def test_check_score_first():
    trained = np.zeros(100, dtype=bool)
    tg.check_score_first(trained, 1, 100)
    trained[40:60] = True
    tg.check_score_first(trained, 1, 40)
    tg.check_score_first(trained, 60, 100)
    with pytest.raises(tg.ScoreFirstViolation, match=r"targets 30\.\.44 .* target 40") as e:
        tg.check_score_first(trained, 30, 45)
    assert isinstance(e.value, tg.UserError)  # main() stops the run with its message


def test_each_token_once():
    ok = np.ones(10, dtype=np.uint8)
    ok[0] = 0
    assert tg.each_token_once(ok)
    for t, count in ((5, 0), (5, 2), (0, 1)):
        bad = ok.copy()
        bad[t] = count
        assert not tg.each_token_once(bad), (t, count)
    assert not tg.each_token_once(np.zeros(1, dtype=np.uint8))


def eval_setup(tiny_data, tmp_path, n: int, **overrides):
    src = tg.read_shard(tiny_data / "datasets" / f"fineweb10B_sp{TINY_VOCAB}" / "fineweb_val_000000.bin")
    tg.write_shard(tmp_path / "val" / "fineweb_val_000000.bin", src[:n])
    h = tg.Hyperparameters(tiny_settings(tiny_data, VAL_FILES=str(tmp_path / "val" / "fineweb_val_*.bin"), **overrides),
                           cuda_available=False)
    torch.manual_seed(0)
    model = tg.GPT(h)
    model.looping = h.num_loops > 0
    return h, tg.ValidationData(h, CPU), model


def test_ttt_that_trains_ahead_of_scoring_stops_the_run(tiny_data, tmp_path, monkeypatch):
    """A TTT that also trains on the next chunk (not yet scored) must be stopped when that chunk is scored."""
    C = 256
    h, val, model = eval_setup(tiny_data, tmp_path, 1200, TTT_CHUNK_TOKENS=C)
    cfg = tg.TTTConfig.from_settings(h, lr=0.01, epochs=1, momentum=0.9, grad_clip=1.0, batch_seqs=4)
    _, legal = tg.evaluate_sliding(copy.deepcopy(model), val, h, CPU, ttt=cfg)
    assert legal["score_first"] == 1 and legal["updates_before_score"] == 0 and legal["each_token_once"] == 1
    real = tg.ttt_train_chunk
    monkeypatch.setattr(tg, "ttt_train_chunk", lambda m, v, lo, hi, *a: real(m, v, lo, min(hi + C, v.n), *a))
    with pytest.raises(tg.ScoreFirstViolation, match="score-first rule broken"):
        tg.evaluate_sliding(model, val, h, CPU, ttt=cfg)


def test_ledger_counts_what_was_scored_and_trained():
    ledger = tg.ScoreLedger(20, 2)
    ledger.score(0, 1, 10)
    ledger.train(0, 1, 10, 3)
    ledger.score(1, 10, 20)
    assert ledger.summary(CPU) == dict(score_first=1, chunks=2, trained_chunks=1, updates_before_score=0,
                                       tokens_scored=19, each_token_once=1)
    twice = tg.ScoreLedger(20, 1)
    twice.score(0, 1, 20)
    twice.score(0, 5, 6)
    assert twice.summary(CPU)["each_token_once"] == 0
    early = tg.ScoreLedger(20, 2)  # trained on 10..19 in chunk 0, which scored only 1..9
    early.score(0, 1, 10)
    early.train(0, 1, 20, 2)
    with pytest.raises(tg.ScoreFirstViolation, match="2 TTT updates"):
        early.summary(CPU)


# ------------------------------------------------------------------------------------------------
# a whole run in-process, on data whose validation ids never occur in training
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_vocab_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's tokenizer; training shards hold only ids < 400, the validation shard only ids >= 400."""
    root = tmp_path_factory.mktemp("split_vocab")
    ds_in = tiny_data / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    ds_out = root / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    for f in sorted(ds_in.glob("fineweb_train_*.bin")):
        tg.write_shard(ds_out / f.name, tg.read_shard(f) % TRAIN_IDS)
    val = tg.read_shard(ds_in / "fineweb_val_000000.bin").astype(np.int64)
    tg.write_shard(ds_out / "fineweb_val_000000.bin", TRAIN_IDS + val % (TINY_VOCAB - TRAIN_IDS))
    (root / "tokenizers").mkdir()
    name = f"fineweb_{TINY_VOCAB}_bpe.model"
    (root / "tokenizers" / name).write_bytes((tiny_data / "tokenizers" / name).read_bytes())
    return root


def forward_ids(monkeypatch, record):
    """Every GPT.forward_hidden call hands its input ids to record(ids)."""
    real = tg.GPT.forward_hidden

    def spy(self, ids):
        record(ids.detach().clone())
        return real(self, ids)
    monkeypatch.setattr(tg.GPT, "forward_hidden", spy)


@pytest.fixture(scope="module")
def observed_run(split_vocab_data, tmp_path_factory):
    """tg.run() of a tiny training run, watched: the inputs of every forward pass between the end of
    training and quantization that is not an evaluation (that is, calibration), the EMA shadow and raw
    weights at the end of training, and the weights handed to quantization."""
    cwd = tmp_path_factory.mktemp("observed_run")
    seen = dict(phase="training", in_eval=0, calibration_ids=[], lines=[])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(tg, "log", lambda msg="", console=True: seen["lines"].append(msg))
        forward_ids(mp, lambda ids: seen["calibration_ids"].append(ids)
                    if seen["phase"] == "after_training" and not seen["in_eval"] else None)
        real_train = tg.Trainer.train

        def train(self, val):
            result, ema = real_train(self, val)
            seen["raw"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            seen["ema"] = dict(zip([n for n, _ in self.model.named_parameters()], [s.clone() for s in ema.shadow]))
            seen["phase"] = "after_training"
            return result, ema
        mp.setattr(tg.Trainer, "train", train)
        for name in ("evaluate_plain", "evaluate_sliding"):
            def evaluation(*args, _real=getattr(tg, name), **kwargs):
                seen["in_eval"] += 1
                try:
                    return _real(*args, **kwargs)
                finally:
                    seen["in_eval"] -= 1
            mp.setattr(tg, name, evaluation)
        real_quantize = tg.quantize_model

        def quantize(model, hessians, h, *args, **kwargs):
            seen.setdefault("quantized", {n: p.detach().clone() for n, p in model.named_parameters()})
            seen["phase"] = "quantizing"
            return real_quantize(model, hessians, h, *args, **kwargs)
        mp.setattr(tg, "quantize_model", quantize)
        h = tg.Hyperparameters(tiny_settings(split_vocab_data, RUN_ID="observed", EMA_DECAY="0.8", MATRIX_LR="0.08",
                                             SLIDING_WINDOW_ENABLED="1", TTT_ENABLED="0"), cuda_available=False)
        tg.run(h, CPU)
    return cwd, h, seen


def test_gptq_calibration_reads_only_training_tokens(observed_run):
    _, h, seen = observed_run
    ids = torch.cat([x.reshape(-1) for x in seen["calibration_ids"]])
    assert ids.numel() >= h.gptq_calibration_batches * h.train_seq_len, "no calibration forward was seen"
    assert int(ids.max()) < TRAIN_IDS, "GPTQ calibration read validation tokens"
    assert "calibration_data:train" in next(l for l in seen["lines"] if l.startswith("compliance:"))


def test_quantized_weights_are_the_ema_weights(observed_run):
    _, _, seen = observed_run
    ema, raw, quantized = seen["ema"], seen["raw"], seen["quantized"]
    assert quantized.keys() == ema.keys()
    for name in ema:
        assert torch.equal(quantized[name], ema[name]), f"{name} reached quantization without being the EMA weight"
    moved = max(float((raw[n] - ema[n]).abs().max()) for n in ema)
    assert moved > 1e-3, "raw and EMA weights hardly differ: the test would not tell them apart"


def test_compliance_line_is_measured(observed_run):
    cwd, h, seen = observed_run
    lines = seen["lines"]
    assert lines[-1] == "run_complete"
    compliance = [l for l in lines if l.startswith("compliance:")]
    assert compliance == ["compliance: score_first:na each_token_once:1 train_within_budget:1 calibration_data:train "
                          "val_training_before_quant:0 artifact_within_limit:1 eval_within_limit:1"]
    assert lines.index(compliance[0]) == next(i for i, l in enumerate(lines) if l.startswith("eval_total:")) + 1
    # the run's files are under runs/<RUN_ID>/, published under the challenge's names once it completed
    artifact = cwd / "runs" / "observed" / "final_model.int6.ptz"
    assert (cwd / "final_model.int6.ptz").read_bytes() == artifact.read_bytes()
    assert (cwd / "final_model.pt").read_bytes() == (cwd / "runs" / "observed" / "final_model.pt").read_bytes()


# ------------------------------------------------------------------------------------------------
# periodic validation
# ------------------------------------------------------------------------------------------------


def train_watched(data_dir: Path, val_every: int, schedule: list):
    """A tiny in-process training run; returns (lr and momentum of every step, final weights, EMA shadow)."""
    schedule.clear()
    h = tg.Hyperparameters(tiny_settings(data_dir, ITERATIONS="9", WARMUP_STEPS="0", VAL_LOSS_EVERY=str(val_every)),
                           cuda_available=False)
    torch.manual_seed(h.seed)
    trainer = tg.Trainer(h, tg.GPT(h), CPU)
    result, ema = trainer.train(tg.ValidationData(h, CPU))
    trainer.loader.close()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return list(schedule), weights, [s.clone() for s in ema.shadow]


def test_periodic_validation_changes_neither_schedule_nor_training(tiny_data, monkeypatch):
    monkeypatch.setattr(tg, "log", lambda msg="", console=True: None)
    schedule = []
    real = tg.Optimizers.set_schedule
    monkeypatch.setattr(tg.Optimizers, "set_schedule",
                        lambda self, lr, mom: (schedule.append((lr, mom)), real(self, lr, mom))[1])
    reference = train_watched(tiny_data, 0, schedule)
    calls = []

    def rising_loss(*args, **kwargs):  # a validation loss that is huge and gets worse every time
        calls.append(1)
        return 1e3 * len(calls), 2e3 * len(calls), 1, 1
    monkeypatch.setattr(tg, "evaluate_plain", rising_loss)
    watched = train_watched(tiny_data, 2, schedule)
    assert len(calls) == 4, "the periodic validation did not run at steps 2, 4, 6, 8"
    assert len(reference[0]) == 9 and watched[0] == reference[0], "the validation loss changed the LR schedule"
    for name, w in reference[1].items():
        assert torch.equal(watched[1][name], w), f"the validation loss changed the training of {name}"
    assert all(torch.equal(a, b) for a, b in zip(watched[2], reference[2]))


# ------------------------------------------------------------------------------------------------
# TTT compile warm-up
# ------------------------------------------------------------------------------------------------


def ngrams(tokens: np.ndarray, k: int = 4) -> set[tuple]:
    return {tuple(tokens[i:i + k]) for i in range(tokens.size - k + 1)}


def test_ttt_compile_warm_up_reads_no_validation_token_and_leaves_no_trace(observed_run, split_vocab_data, monkeypatch):
    cwd, _, _ = observed_run
    artifact = cwd / "runs" / "observed" / "final_model.int6.ptz"
    # COMPILE=1 on CPU: the warm-up runs, but nothing is compiled (that is not what is tested here)
    monkeypatch.setattr(tg, "build_runtime", lambda h, device: tg.EAGER)
    lines = []
    monkeypatch.setattr(tg, "log", lambda msg="", console=True: lines.append(msg))
    warm = dict(active=False, ids=[], before=None, after=None)
    forward_ids(monkeypatch, lambda ids: warm["ids"].append(ids) if warm["active"] else None)
    real_warmup = tg.ttt_compile_warmup

    def watched_warmup(model, *args, **kwargs):
        warm["before"] = copy.deepcopy(model.state_dict())
        warm["active"] = True
        try:
            return real_warmup(model, *args, **kwargs)
        finally:
            warm["active"] = False
            warm["after"] = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(tg, "ttt_compile_warmup", watched_warmup)

    def ttt_result(compile_flag: str) -> str:
        lines.clear()
        env = tiny_settings(split_vocab_data, EVAL_ONLY="1", TTT_ENABLED="1", COMPILE=compile_flag,
                            ARTIFACT_PATH=str(artifact), SLIDING_WINDOW_ENABLED="0")
        h = tg.Hyperparameters(env, cuda_available=False)
        tg.evaluate_artifact(artifact, h, CPU, tg.ValidationData(h, CPU))
        return next(re.sub(r" eval_time:\d+ms", "", l) for l in lines if l.startswith("quantized_ttt val_loss:"))

    without = ttt_result("0")
    assert warm["before"] is None
    with_warmup = ttt_result("1")
    assert warm["ids"], "the compile warm-up did not run"
    assert any("compile_warmup" in l for l in lines)
    val = tg.read_shard(split_vocab_data / "datasets" / f"fineweb10B_sp{TINY_VOCAB}" / "fineweb_val_000000.bin")
    val_grams = ngrams(val)
    for ids in warm["ids"]:
        for row in ids.numpy():
            assert not ngrams(row) & val_grams, "the TTT compile warm-up ran on validation tokens"
    assert warm["before"].keys() == warm["after"].keys()
    assert all(torch.equal(warm["before"][k], warm["after"][k]) for k in warm["before"]), "the warm-up changed the weights"
    assert with_warmup == without, "the warm-up changed the TTT result"


def test_ledger_records_batches_of_windows_exactly():
    plan = tg.plan_windows(300, 64, 16)
    whole = tg.ScoreLedger(300, 1)
    whole.score_windows(0, plan)
    one_by_one = tg.ScoreLedger(300, 1)
    for row in plan:
        one_by_one.score_windows(0, row[None])
    assert whole.summary(CPU) == one_by_one.summary(CPU)
    assert whole.summary(CPU)["each_token_once"] == 1 and whole.windows[0] == len(plan)
    repeated = tg.ScoreLedger(300, 1)  # a window twice in one batch: not one range, counted window by window
    repeated.score_windows(0, np.concatenate([plan[:3], plan[2:3], plan[3:]]))
    assert repeated.summary(CPU)["each_token_once"] == 0
