"""Settings: record defaults, preset choice, parsing errors, typo warnings, batch splitting over ranks."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

RECORD_BATCH = 786432
RECORD_SEQ = 2048


def record(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters(environ={"PRESET": "record", **{k: str(v) for k, v in env.items()}}, cuda_available=True)


# SPEC section 10: name -> the record's value
SPEC_DEFAULTS = {
    "SEED": 1337, "ITERATIONS": 20000, "MAX_WALLCLOCK_SECONDS": 600.0, "WARMUP_STEPS": 20, "WARMDOWN_FRAC": 0.72,
    "MIN_LR": 0.0, "TRAIN_BATCH_TOKENS": 786432, "TRAIN_SEQ_LEN": 2048, "VAL_LOSS_EVERY": 4000,
    "EVAL_SEQ_LEN": 2048, "EVAL_STRIDE": 64, "VOCAB_SIZE": 8192, "NUM_LAYERS": 11, "MODEL_DIM": 512,
    "NUM_HEADS": 8, "NUM_KV_HEADS": 4, "MLP_MULT": 4.0, "XSA_LAST_N": 11, "TIED_EMBED_INIT_STD": 0.005,
    "LOGIT_SOFTCAP": 30.0, "ROPE_BASE": 10000.0, "ROPE_DIMS": 16, "QK_GAIN_INIT": 5.25, "NUM_LOOPS": 2,
    "LOOP_START": 3, "LOOP_END": 5, "ENABLE_LOOPING_AT": 0.35, "PARALLEL_RESIDUAL_START": 7, "TIED_EMBED_LR": 0.03,
    "MATRIX_LR": 0.022, "SCALAR_LR": 0.02, "MUON_MOMENTUM": 0.99, "MUON_MOMENTUM_WARMUP_START": 0.92,
    "MUON_MOMENTUM_WARMUP_STEPS": 1500, "MUON_BACKEND_STEPS": 5, "MUON_ROW_NORMALIZE": True, "MUON_WD": 0.095,
    "EMBED_WD": 0.085, "ADAM_WD": 0.02, "BETA1": 0.9, "BETA2": 0.95, "ADAM_EPS": 1e-8, "GRAD_CLIP_NORM": 0.3,
    "EMA_DECAY": 0.9965, "GPTQ_CALIBRATION_BATCHES": 64, "GPTQ_RESERVE_SECONDS": 12.0, "MATRIX_BITS": 6,
    "EMBED_BITS": 8, "MATRIX_CLIP_SIGMAS": 12.85, "EMBED_CLIP_SIGMAS": 20.0, "COMPRESSOR": "brotli",
    "TTT_ENABLED": False, "TTT_LR": 0.005, "TTT_EPOCHS": 3, "TTT_MOMENTUM": 0.9, "TTT_CHUNK_TOKENS": 32768,
    "SKIP_GATES_ENABLED": True, "TIE_EMBEDDINGS": True, "LN_SCALE": True, "SLIDING_WINDOW_ENABLED": True,
}
# Record values this script changed on purpose, each measured on the proxy (notes/quality.md, issue 16)
KEPT_CHANGES = {"MIN_LR": 0.1}


def test_record_preset_has_the_records_values():
    h = record()
    assert h.preset == "record"
    wrong = {name: getattr(h, name.lower()) for name, want in {**SPEC_DEFAULTS, **KEPT_CHANGES}.items()
             if getattr(h, name.lower()) != want or type(getattr(h, name.lower())) is not type(want)}
    assert not wrong, f"settings differ from the record: {wrong}"
    # the record's derived batch: 384 sequences; one process does 8 micro-steps of 48
    assert (h.grad_accum_steps, h.micro_batch_seqs) == (8, 48)
    assert (h.rank, h.world_size, h.distributed) == (0, 1, False)


def test_record_values_survive_explicit_env_and_small_preset_overrides_only_its_own_keys():
    h = tg.Hyperparameters(environ={"PRESET": "small", "MATRIX_LR": "0.022"}, cuda_available=False)
    assert h.preset == "small"
    assert h.matrix_lr == 0.022  # an explicit value wins over the preset
    assert h.num_layers == tg.SMALL_PRESET["NUM_LAYERS"]
    assert h.qk_gain_init == 5.25  # not in the small preset: record default
    assert "MATRIX_LR" in h.explicit and "NUM_LAYERS" not in h.explicit


def test_auto_preset_picks_small_without_cuda_and_record_with_cuda_and_shards(tiny_data, tmp_path):
    env = {"DATA_DIR": str(tiny_data), "VOCAB_SIZE": "512"}
    h = tg.Hyperparameters(environ=env, cuda_available=False)
    assert h.preset == "small" and "CUDA" in h.preset_reason
    assert not h.sample_data  # DATA_DIR was given: it is kept
    h = tg.Hyperparameters(environ=env, cuda_available=True)
    assert h.preset == "record" and h.num_layers == 11
    assert h.data_dir == str(tiny_data)
    # CUDA but no shards: small, and the reason says so
    h = tg.Hyperparameters(environ={"DATA_DIR": str(tmp_path), "VOCAB_SIZE": "512"}, cuda_available=True)
    assert h.preset == "small" and "shards" in h.preset_reason


def test_auto_preset_without_any_data_falls_back_to_the_bundled_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./data/ holds nothing here
    h = tg.Hyperparameters(environ={}, cuda_available=False)
    assert h.preset == "small" and h.sample_data
    assert Path(h.data_dir) == tg.SAMPLE_DATA_DIR
    assert h.train_files.startswith(str(tg.SAMPLE_DATA_DIR))


@pytest.mark.parametrize("name,raw", [("MATRIX_LR", "fast"), ("ITERATIONS", "12.5"), ("NUM_LAYERS", "eleven"),
                                      ("EMA_DECAY", "nan"), ("SEED", "")])
def test_non_numeric_value_names_the_variable(name, raw):
    with pytest.raises(tg.ConfigError) as e:
        record(**{name: raw})
    assert name in str(e.value)
    assert repr(raw) in str(e.value)  # the offending text is quoted


@pytest.mark.parametrize("name,raw", [("ITERATIONS", "-1"), ("MATRIX_LR", "-0.01"), ("WARMDOWN_FRAC", "1.5"),
                                      ("TRAIN_SEQ_LEN", "1"), ("MUON_MOMENTUM", "-0.5")])
def test_out_of_range_value_names_the_variable(name, raw):
    with pytest.raises(tg.ConfigError) as e:
        record(**{name: raw})
    assert name in str(e.value)


def test_choice_setting_rejects_unknown_value():
    with pytest.raises(tg.ConfigError) as e:
        record(COMPRESSOR="zstd")
    assert "COMPRESSOR" in str(e.value) and "brotli" in str(e.value)


@pytest.mark.parametrize("raw,want", [("1", True), ("0", False), ("true", True), ("false", False),
                                      ("True", True), ("FALSE", False), (" yes ", True), ("off", False)])
def test_bool_parsing(raw, want):
    assert record(TTT_ENABLED=raw).ttt_enabled is want
    assert record(SKIP_GATES_ENABLED=raw).skip_gates_enabled is want


@pytest.mark.parametrize("raw", ["2", "maybe", ""])
def test_bad_bool_raises(raw):
    with pytest.raises(tg.ConfigError, match="TTT_ENABLED"):
        record(TTT_ENABLED=raw)


def test_numbers_parse_leniently_but_exactly():
    h = record(ITERATIONS="1e3", MATRIX_LR=" 0.05 ", TRAIN_BATCH_TOKENS="393216")
    assert h.iterations == 1000 and isinstance(h.iterations, int)
    assert h.matrix_lr == 0.05
    assert h.train_batch_tokens == 393216


def test_typo_in_an_env_var_warns_with_the_close_name():
    h = record(MATRIX_LRR="0.03")
    assert h.matrix_lr == 0.022  # the typo has no effect
    assert len(h.typo_warnings) == 1
    assert "MATRIX_LRR" in h.typo_warnings[0] and "MATRIX_LR?" in h.typo_warnings[0]
    h = record(TTT_EPOHCS="2", MUON_MOMENTUN="0.9")
    text = " ".join(h.typo_warnings)
    assert "TTT_EPOCHS" in text and "MUON_MOMENTUM" in text


def test_unrelated_env_vars_do_not_warn():
    h = record(PATH="/usr/bin", HOME="/root", CUDA_VISIBLE_DEVICES="0", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE="1", PYTHONPATH="x")
    assert h.typo_warnings == []


# ---------------------------------------------------------------------------------------- split_batch


def test_split_batch_record_on_8_and_1_ranks():
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 8, 0, 98304) == (1, 48)
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 1, 0, 98304) == (8, 48)
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 2, 0, 98304) == (4, 48)
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 4, 0, 98304) == (2, 48)


def test_split_batch_record_on_8_and_1_ranks_through_env():
    h = record(RANK="5", WORLD_SIZE="8", LOCAL_RANK="5")
    assert h.distributed and (h.rank, h.world_size, h.local_rank, h.is_main) == (5, 8, 5, False)
    assert (h.grad_accum_steps, h.micro_batch_seqs) == (1, 48)
    h = record()
    assert (h.grad_accum_steps, h.micro_batch_seqs) == (8, 48)


def test_split_batch_on_3_ranks():
    # 786,432 tokens = 384 sequences of 2048 = 3 x 128: it divides, so it must work (4 micro-steps of 32);
    # every rank processes the same number of tokens and the total is unchanged.
    accum, seqs = tg.split_batch(RECORD_BATCH, RECORD_SEQ, 3, 0, 98304)
    assert accum * seqs * 3 * RECORD_SEQ == RECORD_BATCH
    assert seqs * RECORD_SEQ <= 98304
    assert (accum, seqs) == (4, 32)


@pytest.mark.parametrize("world", [5, 7])
def test_split_batch_refuses_a_batch_ranks_cannot_share_and_names_the_numbers(world):
    with pytest.raises(tg.ConfigError) as e:
        tg.split_batch(RECORD_BATCH, RECORD_SEQ, world, 0, 98304)
    msg = str(e.value)
    assert "786432" in msg and f"WORLD_SIZE={world}" in msg and "384" in msg
    assert str(RECORD_SEQ * world) in msg  # tells the multiple that would work
    with pytest.raises(tg.ConfigError, match="786432"):
        record(RANK="0", WORLD_SIZE=str(world))


@pytest.mark.parametrize("world", [5, 6, 7])
def test_odd_world_sizes_work_with_a_batch_they_divide(world):
    batch = RECORD_SEQ * world * 16  # 16 sequences per rank
    accum, seqs = tg.split_batch(batch, RECORD_SEQ, world, 0, 98304)
    assert accum * seqs == 16 and seqs <= 48 and accum == 1
    accum, seqs = tg.split_batch(batch, RECORD_SEQ, world, 0, 8 * RECORD_SEQ)
    assert (accum, seqs) == (2, 8)
    h = record(RANK=str(world - 1), WORLD_SIZE=str(world), TRAIN_BATCH_TOKENS=str(batch))
    assert h.grad_accum_steps * h.micro_batch_seqs * world * RECORD_SEQ == batch


def test_batch_not_a_whole_number_of_sequences():
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_LEN=2048"):
        tg.split_batch(RECORD_BATCH + 1, RECORD_SEQ, 1, 0, 98304)


def test_micro_batch_picks_fewest_steps_that_fit():
    # 384 seqs per rank, at most 100 per micro-batch -> the smallest divisor a with 384/a <= 100 is 4 (96)
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 1, 0, 100 * RECORD_SEQ) == (4, 96)
    # micro-batch smaller than one sequence still gives one sequence per micro-step
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 8, 0, 1) == (48, 1)


def test_grad_accum_override():
    assert tg.split_batch(RECORD_BATCH, RECORD_SEQ, 8, 2, 98304) == (2, 24)
    h = record(RANK="0", WORLD_SIZE="8", GRAD_ACCUM_STEPS="3")
    assert (h.grad_accum_steps, h.micro_batch_seqs) == (3, 16)


def test_grad_accum_that_does_not_divide_raises():
    with pytest.raises(tg.ConfigError) as e:
        tg.split_batch(RECORD_BATCH, RECORD_SEQ, 8, 5, 98304)
    msg = str(e.value)
    assert "GRAD_ACCUM_STEPS=5" in msg and "48" in msg
    with pytest.raises(tg.ConfigError, match="GRAD_ACCUM_STEPS=7"):
        record(GRAD_ACCUM_STEPS="7")


def test_inconsistent_shapes_raise():
    with pytest.raises(tg.ConfigError, match="NUM_HEADS"):
        record(MODEL_DIM="500")
    with pytest.raises(tg.ConfigError, match="NUM_KV_HEADS"):
        record(NUM_KV_HEADS="3")
    with pytest.raises(tg.ConfigError, match="LOOP_END"):
        record(LOOP_END="11")
    with pytest.raises(tg.ConfigError, match="ROPE_DIMS"):
        record(ROPE_DIMS="80")
    with pytest.raises(tg.ConfigError, match="RANK"):
        record(RANK="8", WORLD_SIZE="8")


def test_help_lists_every_setting_with_default_and_meaning(capsys):
    assert tg.main(["--help"]) == 0
    out = capsys.readouterr().out
    for s in tg.SETTINGS:
        line = next((l for l in out.splitlines() if l.split()[:1] == [s.name]), None)
        assert line is not None, f"--help lacks {s.name}"
        assert repr(s.default) in line and s.help[:30] in line
    assert "ITERATIONS" in out and "40" in next(l for l in out.splitlines() if l.split()[:1] == ["ITERATIONS"])


def test_small_preset_is_defined_by_steps_not_seconds():
    h = tg.Hyperparameters(environ={"PRESET": "small"}, cuda_available=False)
    assert h.max_wallclock_seconds == 0 and h.iterations == tg.SMALL_PRESET["ITERATIONS"]


def test_too_long_train_seq_len_is_named_as_the_problem():
    with pytest.raises(tg.ConfigError, match=r"TRAIN_SEQ_LEN=100000 is longer than one rank's share"):
        tg.Hyperparameters(environ={"PRESET": "small", "TRAIN_SEQ_LEN": "100000"}, cuda_available=False)
    with pytest.raises(tg.ConfigError, match=r"Pick a TRAIN_SEQ_LEN that divides the batch"):
        tg.Hyperparameters(environ={"PRESET": "record", "TRAIN_SEQ_LEN": "100000"}, cuda_available=False)


def test_error_lines_also_go_to_stderr(tmp_path, capsys):
    logger = tg.Logger(str(tmp_path / "run.txt"), True)
    logger("step line")
    logger("error: something to fix\ndetail")
    logger.close()
    captured = capsys.readouterr()
    assert captured.out == "step line\nerror: something to fix\ndetail\n"
    assert captured.err == "error: something to fix\n"
    assert (tmp_path / "run.txt").read_text() == captured.out
