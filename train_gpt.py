"""Parameter Golf training script: train, quantize, pack and score a small GPT in one file.

What it does, in the order the code runs:
  1. reads SP8192 token shards (challenge layout) and validates every shard header;
  2. trains an 11-layer, 512-wide GPT (GQA, partial RoPE, XSA, LeakyReLU(0.5)^2 MLP, U-Net skips,
     parallel residuals, depth recurrence) with Muon + AdamW + EMA under a wallclock cap;
  3. collects GPTQ Hessians on training data (inside the training budget), quantizes with
     GPTQ + SDClip (int6 matrices, int8 embedding) and packs the result (byte shuffle + Brotli-11);
  4. reloads the artifact into a fresh model and scores val_bpb: plain, sliding window, and
     optionally score-first test-time training (TTT).

Run:
  python train_gpt.py                                          # one GPU or CPU
  torchrun --standalone --nproc_per_node=8 train_gpt.py        # one node, 8 GPUs
  EVAL_ONLY=1 ARTIFACT_PATH=final_model.int6.ptz python train_gpt.py   # score a shipped artifact
  python train_gpt.py --pack submission/train_gpt.py          # write the compressed submission copy

Sections, each under a banner, in the order the data flows:
  Errors the user can fix      UserError and its kinds: one `error:` line and exit status 2
  Configuration                SETTINGS (every environment variable), presets, Hyperparameters
  Challenge rules              one function per rule (byte counting, score-first, sizes, time limits)
  Logging                      the log file and the console
  Data                         shards, training windows, the validation stream
  Model                        attention, MLP, blocks, the GPT with depth recurrence and U-Net skips
  Fused cross entropy          the Triton kernel of the training loss on GPU, and its self-check
  Optimizer                    Muon, AdamW, the LR and momentum schedules, EMA
  Runtime                      attention backend and compiled functions, held by the model
  Training                     the step loop under the wallclock cap
  Quantization                 GPTQ Hessians, GPTQ + SDClip
  Artifact                     the binary layout, compression, size accounting
  Source packing               the compressed, self-extracting submission copy (--pack)
  Evaluation                   byte accounting, plain / sliding-window val_bpb, score-first TTT
  Main                         setup, train, quantize, write, reload, evaluate; --help, --pack

Every hyperparameter is an environment variable (see SETTINGS below, or the README). Without CUDA, or
without the challenge shards in DATA_DIR, the script falls back to a small preset and the bundled
sample in data/sample so that it runs end to end anywhere; the log says which preset it chose. EVAL_ONLY
never falls back: it scores DATA_DIR's validation shards with the evaluation settings stored in the artifact.
A run's files go to runs/<RUN_ID>/ and are copied to ./final_model.int6.ptz and ./final_model.pt once it
has completed.
"""
from __future__ import annotations

import ast
import base64
import collections
import contextlib
import copy
import dataclasses
import difflib
import glob
import hashlib
import inspect
import io
import json
import lzma
import math
import os
import platform
import queue
import signal
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ================================================================================================
# Errors the user can fix
# ================================================================================================


class UserError(Exception):
    """A problem with the input or the setup. main() prints it without a traceback and exits 2."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class ArtifactError(UserError):
    pass


class TrainingDiverged(UserError):
    pass


class Interrupted(UserError):
    pass


class ScoreFirstViolation(UserError):
    """Evaluation was about to score a target with weights that had already trained on it (or trained on
    a target before scoring it): no result of that pass would be legal, so the run stops."""


# ================================================================================================
# Configuration
# ================================================================================================

SCRIPT_PATH = Path(__file__).resolve()
REPO_DIR = SCRIPT_PATH.parent
SAMPLE_DATA_DIR = REPO_DIR / "data" / "sample"
ARTIFACT_LIMIT_BYTES = 16_000_000
# The challenge's file names, in the current folder: copies of a run's files, made once it has completed.
PUBLISHED_ARTIFACT = "final_model.int6.ptz"
PUBLISHED_MODEL = "final_model.pt"


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # environment variable
    kind: type  # int, float, str or bool
    default: object
    help: str
    min: float | None = None  # inclusive lower bound for numbers
    max: float | None = None  # inclusive upper bound for numbers
    choices: tuple = ()


def _s(name, kind, default, help, min=None, max=None, choices=()):
    return Setting(name, kind, default, help, min, max, tuple(choices))


# Names and defaults follow the record (#1493) so that competitors' launch scripts keep working;
# entries marked "ours" are new knobs.
SETTINGS: list[Setting] = [
    # --- run and data
    _s("PRESET", str, "auto", "ours: auto | record | small. auto = record with CUDA and challenge data (EVAL_ONLY: with CUDA), else small", choices=("auto", "record", "small")),
    _s("DATA_DIR", str, "./data/", "folder with datasets/fineweb10B_sp{VOCAB_SIZE}/ and tokenizers/"),
    _s("TRAIN_FILES", str, "", "ours: glob of train shards (default: DATA_DIR/datasets/fineweb10B_spV/fineweb_train_*.bin)"),
    _s("VAL_FILES", str, "", "ours: glob of val shards (default: DATA_DIR/datasets/fineweb10B_spV/fineweb_val_*.bin)"),
    _s("TOKENIZER_PATH", str, "", "ours: SentencePiece model (default: DATA_DIR/tokenizers/fineweb_V_bpe.model)"),
    _s("SEED", int, 1337, "random seed (weights, data order)", min=0),
    _s("RUN_ID", str, "", "names the log LOGS_DIR/<RUN_ID>.txt and the run folder runs/<RUN_ID>/ (default: UTC date_time_seed<SEED>, e.g. 20261203_104512_seed42, suffixed _2.. if taken); a RUN_ID set by hand whose log or folder exists is refused"),
    _s("LOGS_DIR", str, "logs", "ours: where the run log goes"),
    _s("MODEL_PATH", str, "", "ours: EMA weights (float) written after training (default runs/<RUN_ID>/final_model.pt, copied to ./final_model.pt once the run completes)"),
    _s("ARTIFACT_PATH", str, "", "ours: the quantized, compressed artifact (default runs/<RUN_ID>/final_model.int6.ptz, copied to ./final_model.int6.ptz once the run completes; EVAL_ONLY reads ./final_model.int6.ptz)"),
    _s("EVAL_ONLY", bool, False, "ours: skip training; load ARTIFACT_PATH and run the evaluations, with the EVAL_*/TTT_* values stored in it unless set here"),
    _s("COMPILE", str, "auto", "ours: torch.compile: auto (on with CUDA) | 1 | 0", choices=("auto", "0", "1")),
    _s("ATTENTION_BACKEND", str, "auto", "ours: auto (FA3 if importable, else SDPA) | fa3 | sdpa (PyTorch picks) | sdpa_flash | sdpa_cudnn", choices=("auto", "fa3", "sdpa", "sdpa_flash", "sdpa_cudnn")),
    _s("FUSED_CE", bool, True, "ours: training loss through the fused Triton soft-capped cross entropy on GPU (0 = the compiled plain path)"),
    _s("SDPA_GQA", str, "native", "ours: GQA in SDPA: native (enable_gqa) | repeat (copy K/V per head)", choices=("native", "repeat")),
    # --- schedule and batch
    _s("ITERATIONS", int, 20000, "max training steps", min=0),
    _s("MAX_WALLCLOCK_SECONDS", float, 600.0, "training wallclock cap incl. GPTQ calibration; 0 = no cap", min=0),
    _s("WARMUP_STEPS", int, 20, "compile warm-up steps per graph (one micro-batch each), undone before the clock starts", min=0),
    _s("WARMDOWN_FRAC", float, 0.72, "fraction of training time spent decaying the LR to MIN_LR", min=0, max=1),
    _s("MIN_LR", float, 0.1, "LR floor as a fraction of the base LR during warmdown (the record #1493: 0; later records: 0.1)", min=0, max=1),
    _s("TRAIN_BATCH_TOKENS", int, 786432, "tokens per optimizer step, all ranks together", min=1),
    _s("TRAIN_SEQ_LEN", int, 2048, "training sequence length", min=2),
    _s("TRAIN_SPAN_SCHEDULE", str, "", "ours: attention span grown during training, as SPAN@FRACTION items: 1024@0.1,2048@0.7 = spans of 1024 tokens until 10 % of training, 2048 until 70 %, then TRAIN_SEQ_LEN; empty = TRAIN_SEQ_LEN throughout"),
    _s("GRAD_ACCUM_STEPS", int, 0, "ours: micro-steps per step; 0 = the fewest that keep MICRO_BATCH_TOKENS per GPU", min=0),
    _s("MICRO_BATCH_TOKENS", int, 98304, "ours: largest micro-batch per GPU when GRAD_ACCUM_STEPS=0", min=1),
    _s("TRAIN_LOG_EVERY", int, 500, "log a train line every N steps (and the first 5)", min=0),
    _s("VAL_LOSS_EVERY", int, 4000, "plain validation every N steps (0 = only at the end)", min=0),
    _s("VAL_BATCH_TOKENS", int, 524288, "tokens per plain-validation batch, all ranks together", min=1),
    # --- model
    _s("VOCAB_SIZE", int, 8192, "tokenizer vocabulary size", min=2, max=65536),
    _s("NUM_LAYERS", int, 11, "physical transformer blocks", min=1),
    _s("MODEL_DIM", int, 512, "residual width", min=8),
    _s("EMBEDDING_DIM", int, 512, "embedding width (projected to MODEL_DIM if different)", min=8),
    _s("NUM_HEADS", int, 8, "query heads", min=1),
    _s("NUM_KV_HEADS", int, 4, "key/value heads (GQA)", min=1),
    _s("MLP_MULT", float, 4.0, "MLP hidden = MLP_MULT * MODEL_DIM", min=0.25),
    _s("XSA_LAST_N", int, 11, "XSA on the last N physical layers", min=0),
    _s("SKIP_GATES_ENABLED", bool, True, "sigmoid gates on the U-Net skips"),
    _s("TIE_EMBEDDINGS", bool, True, "tie input embedding and output head"),
    _s("TIED_EMBED_INIT_STD", float, 0.005, "init std of the (tied) embedding", min=0),
    _s("LOGIT_SOFTCAP", float, 30.0, "logits = cap * tanh(z / cap)", min=1e-3),
    _s("ROPE_BASE", float, 10000.0, "RoPE base", min=1),
    _s("ROPE_DIMS", int, 16, "RoPE on the first N dims of each head (0 = all)", min=0),
    _s("LN_SCALE", bool, True, "scale block norms by 1/sqrt(layer+1)"),
    _s("QK_GAIN_INIT", float, 5.25, "initial per-head query gain"),
    _s("NUM_LOOPS", int, 2, "extra passes over blocks LOOP_START..LOOP_END (0 = no recurrence)", min=0),
    _s("LOOP_START", int, 3, "first looped block", min=0),
    _s("LOOP_END", int, 5, "last looped block (inclusive)", min=0),
    _s("ENABLE_LOOPING_AT", float, 0.35, "training fraction at which recurrence switches on", min=0, max=1),
    _s("PARALLEL_RESIDUAL_START", int, 7, "blocks from this index on are parallel (GPT-J); -1 = none", min=-1),
    _s("TWO_LANE_START", int, -1, "ours: blocks from this index on carry two residual lanes (attention reads one, the MLP the other); -1 = none; must come after every looped block and in the decoder", min=-1),
    _s("ATTN_GATE", bool, True, "ours: sparse attention output gate, one sigmoid per head read from ATTN_GATE_DIMS input channels"),
    _s("ATTN_GATE_DIMS", int, 12, "ours: input channels the attention output gate reads", min=1),
    _s("SMEAR_GATE", bool, True, "ours: BOS-safe previous-token mixing at the input, gated from SMEAR_GATE_DIMS channels"),
    _s("SMEAR_GATE_DIMS", int, 12, "ours: input channels the smear gate reads", min=1),
    _s("DOC_MASK", bool, True, "ours: attention stays inside each document (a BOS_ID token starts one), in training and evaluation; flex attention when compiled, SDPA with a mask otherwise"),
    # --- optimizer
    _s("TIED_EMBED_LR", float, 0.03, "AdamW LR of the tied embedding", min=0),
    _s("EMBED_LR", float, 0.6, "AdamW LR of the embedding when untied", min=0),
    _s("HEAD_LR", float, 0.008, "Adam LR of the output head when untied", min=0),
    _s("MATRIX_LR", float, 0.022, "Muon LR", min=0),
    _s("SCALAR_LR", float, 0.02, "AdamW LR of gains, scales, mixes, skip weights", min=0),
    _s("MUON_MOMENTUM", float, 0.99, "Muon momentum after warm-up", min=0, max=1),
    _s("MUON_MOMENTUM_WARMUP_START", float, 0.92, "Muon momentum at step 0", min=0, max=1),
    _s("MUON_MOMENTUM_WARMUP_STEPS", int, 1500, "steps to reach MUON_MOMENTUM", min=0),
    _s("MUON_BACKEND_STEPS", int, 5, "Newton-Schulz iterations", min=1),
    _s("MUON_NS_COEFFS", str, "polar", "ours: Newton-Schulz coefficients: polar (Polar Express, one quintic per step, as the later records) | quintic (the record #1493's, the same every step)", choices=("quintic", "polar")),
    _s("MUON_ROW_NORMALIZE", bool, True, "normalize each row of the update before Newton-Schulz"),
    _s("MUON_WD", float, 0.095, "decoupled weight decay of Muon matrices", min=0),
    _s("EMBED_WD", float, 0.085, "AdamW weight decay of the embedding", min=0),
    _s("ADAM_WD", float, 0.02, "AdamW weight decay of scalars", min=0),
    _s("BETA1", float, 0.9, "Adam beta1", min=0, max=1),
    _s("BETA2", float, 0.95, "Adam beta2", min=0, max=1),
    _s("ADAM_EPS", float, 1e-8, "Adam epsilon", min=0),
    _s("GRAD_CLIP_NORM", float, 0.3, "global gradient-norm clip (0 = off)", min=0),
    _s("EMA_DECAY", float, 0.9965, "EMA decay per step; the EMA weights are what gets quantized", min=0, max=1),
    # --- quantization and artifact
    _s("GPTQ_CALIBRATION_BATCHES", int, 64, "micro-batches of training data for GPTQ Hessians, all ranks together", min=1),
    _s("GPTQ_RESERVE_SECONDS", float, 12.0, "seconds of the wallclock cap kept for Hessian collection (when set, or with GPTQ_RESERVE_AUTO=0)", min=0),
    _s("GPTQ_RESERVE_AUTO", bool, True, "ours: unless GPTQ_RESERVE_SECONDS is set, reserve what calibration will take, timed in the warm-up on random tokens: batches per rank x probe x 1.25 + 1 s"),
    _s("MATRIX_BITS", int, 6, "bits of GPTQ block matrices", min=2, max=8),
    _s("EMBED_BITS", int, 8, "bits of the embedding", min=2, max=8),
    _s("MATRIX_CLIP_SIGMAS", float, 12.85, "SDClip k for matrices: scale = k*std(row)/qmax", min=0.1),
    _s("MLP_CLIP_SIGMAS", float, 0.0, "ours: SDClip k of the MLP matrices (0 = MATRIX_CLIP_SIGMAS)", min=0),
    _s("EMBED_CLIP_SIGMAS", float, 20.0, "SDClip k for the embedding", min=0.1),
    _s("MATRIX_EXTRA_BIT_TOP_K", int, 0, "ours: this many GPTQ weight groups (q|k|v of a block are one) get MATRIX_BITS+1 bits: those with the largest Hessian-weighted error per weight (0 = off)", min=0),
    _s("LQER_RANK", int, 0, "ours: rank of the low-rank correction of the quantization error, stored for the LQER_TOP_K matrices it helps most (0 = off)", min=0),
    _s("LQER_TOP_K", int, 3, "ours: how many GPTQ matrices get the low-rank correction", min=1),
    _s("LQER_BITS", int, 8, "ours: bits of the correction's two factors (one scale per factor row)", min=2, max=8),
    _s("AWQ_ALPHA", float, 0.0, "ours: activation-aware scaling before GPTQ: each matrix's input columns are multiplied by (input RMS / mean RMS)^AWQ_ALPHA, snapped to 2^(k/16), before quantization, and the loader divides them back out (one fp16 scale per input column of each matrix; 0 = off)", min=0, max=1),
    _s("QUANT_MIN_NUMEL", int, 65536, "ours: 2-D weights with more values than this are GPTQ-quantized, smaller ones kept as fp16", min=0),
    _s("COMPRESSOR", str, "brotli", "brotli | lzma", choices=("brotli", "lzma")),
    _s("ARTIFACT_FIT", bool, False, "ours: if over 16,000,000 bytes, tighten MATRIX_CLIP_SIGMAS until it fits (logged)"),
    # --- evaluation
    _s("EVAL_SEQ_LEN", int, 2048, "evaluation window length", min=2),
    _s("EVAL_STRIDE", int, 64, "sliding-window stride (tokens scored per window)", min=1),
    _s("EVAL_BATCH_SEQS", int, 64, "ours: windows per sliding-eval batch per GPU", min=1),
    _s("SLIDING_WINDOW_ENABLED", bool, True, "run the sliding-window evaluation"),
    _s("TTT_ENABLED", bool, False, "run score-first test-time training (the record's runs set 1)"),
    _s("TTT_LR", float, 0.005, "TTT SGD LR (cosine-decayed across chunks)", min=0),
    _s("TTT_EPOCHS", int, 3, "TTT passes over each scored chunk", min=0),
    _s("TTT_MOMENTUM", float, 0.9, "TTT SGD momentum", min=0, max=1),
    _s("TTT_CHUNK_TOKENS", int, 32768, "TTT chunk size in target tokens", min=1),
    _s("TTT_BATCH_SEQS", int, 32, "ours: sequences per TTT micro-batch per GPU", min=1),
    _s("TTT_GRAD_CLIP", float, 1.0, "ours: TTT gradient-norm clip", min=0),
    _s("TTT_MODE", str, "global", "ours: global = SGD of all weights over chunks of the stream (the record's) | lora = per-document LoRA adapters, reset at each document, trained score-first chunk by chunk | both = lora inside each global chunk, then that chunk's global SGD step", choices=("global", "lora", "both")),
    _s("TTT_LORA_RANK", int, 8, "ours: rank of the per-document adapters (TTT_MODE=lora)", min=1),
    _s("TTT_LORA_LR", float, 0.001, "ours: Adam LR of the per-document adapters", min=0),
    _s("TTT_LORA_CHUNK", int, 256, "ours: targets per document chunk: scored, then trained on, before the next chunk", min=1),
    _s("TTT_LORA_DOCS", int, 64, "ours: documents adapted side by side per GPU (one adapter set each)", min=1),
    _s("TTT_LORA_CONTEXT", int, 0, "ours: tokens of the stream before a document that its chunks also read as context (0 = each document alone)", min=0),
    _s("TTT_LORA_TARGETS", str, "attn_k,attn_out,mlp_in,mlp_out,head", "ours: where adapters go: comma list of attn_q attn_k attn_v attn_out mlp_in mlp_out head"),
    # --- testing aid
    _s("DEBUG_NAN_AT_STEP", int, -1, "ours, for tests: make the loss NaN at this step (numbered from 1, as in the train log)", min=-1),
]
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}

# The small preset: what runs when there is no GPU or no challenge data. Finishes in minutes on 2
# CPU cores and still exercises every stage (recurrence, parallel blocks, GPTQ, sliding, TTT).
SMALL_PRESET = {
    "NUM_LAYERS": 4, "MODEL_DIM": 128, "EMBEDDING_DIM": 128, "NUM_HEADS": 4, "NUM_KV_HEADS": 2,
    "XSA_LAST_N": 4, "LOOP_START": 1, "LOOP_END": 2, "NUM_LOOPS": 1, "PARALLEL_RESIDUAL_START": 3,
    "TRAIN_SEQ_LEN": 256, "EVAL_SEQ_LEN": 256, "EVAL_STRIDE": 64, "TRAIN_BATCH_TOKENS": 8192,
    # By steps, not seconds, so that every machine trains the same model and gets the same score: 40 steps is
    # what an idle 2-core machine did in the old 90 s budget (about 3 minutes for the whole command).
    "MICRO_BATCH_TOKENS": 8192, "ITERATIONS": 40, "MAX_WALLCLOCK_SECONDS": 0.0,
    "GPTQ_RESERVE_SECONDS": 3.0, "WARMUP_STEPS": 2, "TRAIN_LOG_EVERY": 10, "VAL_LOSS_EVERY": 20,
    "VAL_BATCH_TOKENS": 16384, "MUON_MOMENTUM_WARMUP_STEPS": 50, "EMA_DECAY": 0.97,
    "GPTQ_CALIBRATION_BATCHES": 8, "MATRIX_LR": 0.04, "TTT_ENABLED": True,
    "TTT_CHUNK_TOKENS": 8192, "EVAL_BATCH_SEQS": 32, "TTT_BATCH_SEQS": 8, "QUANT_MIN_NUMEL": 4096,
    # SDPA with a dense mask per call on CPU is slow, and the CPU runs gain nothing from it
    "DOC_MASK": False,
}


def _parse_value(setting: Setting, raw: str, default=None):
    text = raw.strip()
    try:
        if setting.kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if setting.kind is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            value = int(value)
        elif setting.kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
        else:
            value = text
    except ValueError:
        raise ConfigError(
            f"{setting.name}={raw!r} is not a valid {setting.kind.__name__} "
            f"({setting.help}; default {setting.default if default is None else default!r}). Fix or unset {setting.name}."
        ) from None
    return value


def _check_value(setting: Setting, value):
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{setting.name}={value!r} must be one of {', '.join(setting.choices)}.")
    if setting.kind in (int, float):
        if setting.min is not None and value < setting.min:
            raise ConfigError(f"{setting.name}={value} must be >= {setting.min} ({setting.help}).")
        if setting.max is not None and value > setting.max:
            raise ConfigError(f"{setting.name}={value} must be <= {setting.max} ({setting.help}).")


def sample_data_candidates() -> list[Path]:
    """Where the bundled sample may be: beside the script (the repository), else under the current folder
    (a packed copy in submission/ run from the repository's root)."""
    return list(dict.fromkeys([SAMPLE_DATA_DIR, Path.cwd().resolve() / "data" / "sample"]))


def challenge_data_present(environ) -> bool:
    data_dir = Path(environ.get("DATA_DIR", "./data/"))
    vocab = environ.get("VOCAB_SIZE", "8192").strip()
    train = environ.get("TRAIN_FILES") or str(data_dir / "datasets" / f"fineweb10B_sp{vocab}" / "fineweb_train_*.bin")
    return bool(glob.glob(train))


class Hyperparameters:
    """All settings, read once from the environment; attribute names are the lower-case env names."""

    def __init__(self, environ=None, cuda_available=None):
        environ = dict(os.environ if environ is None else environ)
        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        self.explicit_values = {s.name: environ[s.name] for s in SETTINGS if s.name in environ}
        preset = _parse_value(SETTINGS_BY_NAME["PRESET"], environ.get("PRESET", "auto"))
        _check_value(SETTINGS_BY_NAME["PRESET"], preset)
        self.sample_data = False
        self.sample_searched: list[Path] = []  # where the bundled sample was looked for (for "no data" errors)
        eval_only = _parse_value(SETTINGS_BY_NAME["EVAL_ONLY"], environ.get("EVAL_ONLY", "0"))
        if preset == "auto" and eval_only:
            # Scoring an artifact reads no training data, so their absence says nothing: the evaluation
            # settings come from the artifact (see resolve_eval_settings), and there is no sample fallback.
            preset = "record" if cuda_available else "small"
            self.preset_reason = "EVAL_ONLY, " + ("CUDA found" if cuda_available else "no CUDA device")
        elif preset == "auto":
            has_data = challenge_data_present(environ)
            preset = "record" if (cuda_available and has_data) else "small"
            self.preset_reason = (
                "CUDA and challenge shards found" if preset == "record"
                else ("no challenge shards in DATA_DIR" if cuda_available else "no CUDA device")
            )
            if not has_data and "DATA_DIR" not in environ and not environ.get("TRAIN_FILES"):
                # Nothing downloaded: run on the bundled public-domain sample.
                self.sample_searched = sample_data_candidates()
                found = [d for d in self.sample_searched if d.is_dir()]
                if found:
                    environ["DATA_DIR"] = str(found[0])
                    self.sample_data = True
        else:
            self.preset_reason = "PRESET set"
        defaults = dict(SMALL_PRESET) if preset == "small" else {}
        for s in SETTINGS:
            if s.name in environ and s.name != "PRESET":
                value = _parse_value(s, environ[s.name], defaults.get(s.name, s.default))
            else:
                value = defaults.get(s.name, s.default)
            _check_value(s, value)
            setattr(self, s.name.lower(), value)
        self.preset = preset  # the resolved one, not PRESET's own "auto"
        self.typo_warnings = self._find_typos(environ)
        self._derive(environ)
        self._validate()

    @property
    def explicit(self) -> set[str]:
        """Names of the settings given in the environment (the rest are defaults)."""
        return set(self.explicit_values)

    @staticmethod
    def _find_typos(environ) -> list[str]:
        known = set(SETTINGS_BY_NAME)
        prefixes = {n.split("_")[0] for n in known}
        warnings = []
        for key in sorted(environ):
            if key in known or not key.isupper() or key.split("_")[0] not in prefixes | {"MUON", "TTT", "GPTQ"}:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if close:
                warnings.append(f"environment variable {key} is not a setting of this script; did you mean {close[0]}?")
        return warnings

    def _derive(self, environ):
        self.distributed = "RANK" in environ and "WORLD_SIZE" in environ
        self.rank = int(environ.get("RANK", 0))
        self.world_size = int(environ.get("WORLD_SIZE", 1))
        self.local_rank = int(environ.get("LOCAL_RANK", 0))
        self.is_main = self.rank == 0
        self.run_id_given = bool(self.run_id)
        self.default_paths = {n for n in ("MODEL_PATH", "ARTIFACT_PATH") if not getattr(self, n.lower())}
        # rank 0's clock decides the default id for every rank (claim_run_id)
        self.set_run_id(self.run_id or time.strftime("%Y%m%d_%H%M%S", time.gmtime()) + f"_seed{self.seed}")
        data_dir = Path(self.data_dir)
        dataset_dir = data_dir / "datasets" / f"fineweb10B_sp{self.vocab_size}"
        self.train_files = self.train_files or str(dataset_dir / "fineweb_train_*.bin")
        self.val_files = self.val_files or str(dataset_dir / "fineweb_val_*.bin")
        self.tokenizer_path = self.tokenizer_path or str(data_dir / "tokenizers" / f"fineweb_{self.vocab_size}_bpe.model")

    def set_run_id(self, run_id: str):
        """The run's id and the paths named after it: the log, the run folder and the default file paths."""
        self.run_id = run_id
        self.logfile = str(Path(self.logs_dir) / f"{run_id}.txt")
        self.run_dir = str(Path("runs") / run_id)
        if "MODEL_PATH" in self.default_paths:
            self.model_path = str(Path(self.run_dir) / "final_model.pt")
        if "ARTIFACT_PATH" in self.default_paths:
            self.artifact_path = PUBLISHED_ARTIFACT if self.eval_only else str(Path(self.run_dir) / "final_model.int6.ptz")

    def _validate(self):
        if self.model_dim % self.num_heads:
            raise ConfigError(f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}.")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2 or self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {head_dim} (which must be even).")
        if self.num_loops > 0 and not (0 <= self.loop_start <= self.loop_end < self.num_layers):
            raise ConfigError(
                f"LOOP_START={self.loop_start} and LOOP_END={self.loop_end} must satisfy "
                f"0 <= LOOP_START <= LOOP_END < NUM_LAYERS={self.num_layers} (or set NUM_LOOPS=0)."
            )
        if self.two_lane_start >= 0:
            for looping in (False, True):
                enc, dec = layer_order(self.num_layers, self.num_loops, self.loop_start, self.loop_end, looping)
                lanes = [i for i in enc + dec if i >= self.two_lane_start]
                if lanes != list(range(self.two_lane_start, self.num_layers)) or (enc + dec)[-len(lanes):] != lanes or not set(lanes) <= set(dec):
                    raise ConfigError(f"TWO_LANE_START={self.two_lane_start} must name a block that runs once, at the end of the "
                                      f"decoder, after every looped block (order {enc} + {dec}); -1 turns two lanes off.")
        self.train_spans = parse_span_schedule(self.train_span_schedule, self.train_seq_len)
        if self.eval_stride > self.eval_seq_len:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride} must not exceed EVAL_SEQ_LEN={self.eval_seq_len}.")
        if self.world_size < 1 or not (0 <= self.rank < self.world_size):
            raise ConfigError(f"RANK={self.rank} / WORLD_SIZE={self.world_size} are inconsistent.")
        self.grad_accum_steps, self.micro_batch_seqs = split_batch(
            self.train_batch_tokens, self.train_seq_len, self.world_size, self.grad_accum_steps, self.micro_batch_tokens
        )

    def as_lines(self) -> list[str]:
        return [f"  {s.name}={getattr(self, s.name.lower())!r}" for s in SETTINGS]

    def model_config(self) -> dict:
        """The settings that define the network's shape: stored in the artifact so it is self-describing."""
        names = ["VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "EMBEDDING_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT",
                 "XSA_LAST_N", "SKIP_GATES_ENABLED", "TIE_EMBEDDINGS", "LOGIT_SOFTCAP", "ROPE_BASE", "ROPE_DIMS",
                 "LN_SCALE", "NUM_LOOPS", "LOOP_START", "LOOP_END", "PARALLEL_RESIDUAL_START",
                 "ATTN_GATE", "ATTN_GATE_DIMS", "SMEAR_GATE", "SMEAR_GATE_DIMS", "TWO_LANE_START", "DOC_MASK"]
        return {n: getattr(self, n.lower()) for n in names}

    def eval_config(self) -> dict:
        """The settings that decide how the artifact is scored (windows, stride, TTT): stored in it, so that
        EVAL_ONLY scores it the way the training run did."""
        names = ["EVAL_SEQ_LEN", "EVAL_STRIDE", "EVAL_BATCH_SEQS", "SLIDING_WINDOW_ENABLED"]
        return {n: getattr(self, n.lower()) for n in names + [s.name for s in SETTINGS if s.name.startswith("TTT_")]}

    def replace(self, **overrides) -> "Hyperparameters":
        clone = copy.copy(self)
        for key, value in overrides.items():
            setattr(clone, key.lower(), value)
        return clone


def parse_span_schedule(text: str, seq_len: int) -> list[tuple[int, float]]:
    """TRAIN_SPAN_SCHEDULE "1024@0.1,2048@0.7" -> [(1024, 0.1), (2048, 0.7)]: each span holds until its
    fraction of training; spans grow, fractions rise, and every span is shorter than TRAIN_SEQ_LEN."""
    items = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            span, frac = item.split("@")
            items.append((int(span), float(frac)))
        except ValueError:
            raise ConfigError(f"TRAIN_SPAN_SCHEDULE item {item!r} is not SPAN@FRACTION (e.g. 1024@0.1,2048@0.7).") from None
    spans, fracs = [s for s, _ in items], [f for _, f in items]
    if items and not (spans == sorted(set(spans)) and fracs == sorted(set(fracs)) and 0 < spans[0] and spans[-1] < seq_len
                      and 0 < fracs[0] and fracs[-1] <= 1):
        raise ConfigError(f"TRAIN_SPAN_SCHEDULE={text!r} must list growing spans below TRAIN_SEQ_LEN={seq_len} with rising "
                          f"fractions in (0, 1], e.g. 1024@0.1,2048@0.7.")
    return items


def span_at(frac: float, spans: list[tuple[int, float]], seq_len: int) -> int:
    """The attention span at this fraction of training: the first item whose fraction is not reached yet."""
    return next((span for span, until in spans if frac < until), seq_len)


def split_batch(batch_tokens: int, seq_len: int, world_size: int, accum: int, micro_tokens: int) -> tuple[int, int]:
    """Return (micro-steps per step, sequences per micro-batch per rank), or explain why it can't split."""
    if seq_len * world_size > batch_tokens:
        raise ConfigError(
            f"TRAIN_SEQ_LEN={seq_len} is longer than one rank's share of the batch (TRAIN_BATCH_TOKENS={batch_tokens} "
            f"over WORLD_SIZE={world_size}): every rank needs at least one whole sequence per step. Lower TRAIN_SEQ_LEN "
            f"(the record uses 2048) or raise TRAIN_BATCH_TOKENS to a multiple of {seq_len * world_size}."
        )
    if batch_tokens % seq_len:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={batch_tokens} is not a whole number of TRAIN_SEQ_LEN={seq_len} sequences. Pick a "
            f"TRAIN_SEQ_LEN that divides the batch (the record uses 2048), or a TRAIN_BATCH_TOKENS that is a multiple of {seq_len}."
        )
    seqs = batch_tokens // seq_len
    if seqs % world_size:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={batch_tokens} = {seqs} sequences of {seq_len} cannot be split evenly over "
            f"WORLD_SIZE={world_size} ranks. Use a batch that is a multiple of {seq_len * world_size} tokens."
        )
    per_rank = seqs // world_size
    if accum == 0:
        max_seqs = max(1, micro_tokens // seq_len)
        accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= max_seqs)
    if per_rank % accum:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={batch_tokens} gives {per_rank} sequences per rank on WORLD_SIZE={world_size}, "
            f"which GRAD_ACCUM_STEPS={accum} does not divide. Pick a divisor of {per_rank} or set GRAD_ACCUM_STEPS=0."
        )
    return accum, per_rank // accum


# ================================================================================================
# Challenge rules: one function each, called where the run applies the rule (tests/test_rules.py)
# ================================================================================================

TRAIN_LIMIT_MS = 600_000  # training wallclock, GPTQ calibration included
EVAL_LIMIT_MS = 600_000  # evaluation: dequantize, every scoring pass, TTT


def wallclock_stop(step_end_ms: float, cap_ms: float | None) -> bool:
    """Training time rule, as the training loop applies it: the step predicted to end at or past the cap
    (MAX_WALLCLOCK_SECONDS minus the GPTQ_RESERVE_SECONDS kept for calibration) is the last one."""
    return cap_ms is not None and step_end_ms >= cap_ms


CALIBRATION_RESERVE_FACTOR = 1.25  # the timed probe x this, per calibration batch of a rank ...
CALIBRATION_RESERVE_MARGIN_S = 1.0  # ... plus this: the all-reduce of the Hessians, a shard read, jitter


def calibration_reserve_seconds(probe_ms: float, batches_per_rank: int) -> float:
    """Seconds of the wallclock cap to keep for GPTQ calibration, from the time of one calibration
    micro-batch measured before the clock starts. A fixed 12 s reserve idles 2% of a 600 s run (7% of a
    180 s proxy run) on a calibration that takes 2-5 s; underestimating would break the training-time
    rule, hence the factor and the margin (train_budget logs the measured total)."""
    return batches_per_rank * probe_ms / 1000 * CALIBRATION_RESERVE_FACTOR + CALIBRATION_RESERVE_MARGIN_S


def train_within_budget(train_ms: float, calibration_ms: float, max_wallclock_seconds: float) -> bool:
    """Training time rule, as measured: training plus GPTQ calibration (which reads training data) took no
    longer than MAX_WALLCLOCK_SECONDS, and no longer than the challenge's 600 s."""
    limit_ms = TRAIN_LIMIT_MS if max_wallclock_seconds <= 0 else min(1000 * max_wallclock_seconds, TRAIN_LIMIT_MS)
    return train_ms + calibration_ms <= limit_ms


def within_byte_limit(code_bytes: int, model_bytes: int) -> bool:
    """Size rule: the submitted code's bytes plus the compressed model's bytes are at most 16,000,000."""
    return code_bytes + model_bytes <= ARTIFACT_LIMIT_BYTES


def within_eval_limit(eval_ms: float) -> bool:
    """Evaluation time rule: loading the artifact and every scoring pass, TTT included, within 600 s."""
    return eval_ms <= EVAL_LIMIT_MS


def check_score_first(trained: np.ndarray, a: int, b: int) -> None:
    """Score before update (Issue #1017, condition 3): targets a..b-1 may only be scored by weights that no
    update has trained on any of them. `trained[t]` says whether an update has used target t."""
    if trained[a:b].any():
        t = a + int(np.argmax(trained[a:b]))
        raise ScoreFirstViolation(
            f"score-first rule broken: the window scoring targets {a}..{b - 1} was about to be scored after an "
            f"update had trained on target {t}. A score from these weights has seen its own answers; the run "
            "stops without a result. This is a fault in the evaluation code, not in the settings.")


def each_token_once(scored: np.ndarray) -> bool:
    """Single pass (Issue #1017, condition 4): every target 1..n-1 was scored exactly once. `scored[t]`
    counts the scorings of target t; target 0 has no context and is never scored."""
    return scored.size >= 2 and int(scored[0]) == 0 and bool((scored[1:] == 1).all())


# ================================================================================================
# Logging
# ================================================================================================


class Logger:
    """Writes to the console and logs/<RUN_ID>.txt (rank 0 only), flushing every line so that a crash
    or a kill never loses what was already said."""

    def __init__(self, path: str | None = None, enabled: bool = True):
        self.enabled, self.file = True, None
        self.open(path, enabled)

    def open(self, path: str | None, enabled: bool):
        """Write from now on to `path` (None: console only), or nowhere when not enabled (ranks > 0)."""
        self.close()
        self.enabled = enabled
        if enabled and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, msg: str = "", console: bool = True):
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
            if msg.startswith("error"):  # errors also where a shell or a scheduler looks for them (first line)
                print(msg.splitlines()[0], file=sys.stderr, flush=True)
        if self.file is not None:
            self.file.write(msg + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


log = Logger()  # the console until main() opens the run's log file (log.open); one object for the whole process


def script_identity(path: Path = SCRIPT_PATH) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for a file of these bytes: finds the file in any history, also when
    the run had no git at hand."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def code_identity(path: Path = SCRIPT_PATH) -> str:
    """The `code:` log line: commit of the checkout holding the script, whether the script differs from
    that commit's copy, and its git blob id. git gets a few seconds and may be missing: never fatal."""
    import subprocess
    blob = git_blob_id(path.read_bytes())

    def git(*args) -> list[str] | None:
        try:
            out = subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.split("\n") if out.returncode == 0 else None

    commit, dirty = "unknown", "unknown"
    head = git("rev-parse", "--show-prefix", "HEAD")  # the script's folder inside the checkout, then HEAD
    if head is not None and len(head) >= 2:
        prefix, commit = head[0], head[1]
        in_commit = git("rev-parse", f"HEAD:{prefix}{path.name}")  # None: the commit has no such file
        dirty = str(int(in_commit is None or in_commit[0] != blob))
    return f"code: commit:{commit} dirty:{dirty} git_blob:{blob}"


# ================================================================================================
# Data: shards, training windows, validation stream
# ================================================================================================

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1  # every document starts with it (the challenge's shards: [BOS] + the document's pieces)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: a reader (or a kill) never sees a
    half-written file, and an older file of that name stays intact until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def shard_bytes(tokens: np.ndarray) -> bytes:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise DataError("token ids must fit in uint16 (0..65535) to be written to a shard")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    return header.tobytes() + tokens.astype("<u2").tobytes()


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write one challenge-format shard atomically."""
    atomic_write_bytes(path, shard_bytes(tokens))


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e}") from None
    if header.size < SHARD_HEADER_INTS:
        raise DataError(f"shard {path} is truncated: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header. "
                        "Re-download or regenerate it (data/prepare.py).")
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}: not a challenge token shard. "
                        "Regenerate it with data/prepare.py or remove it from the folder.")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"shard {path} has version {int(header[1])}, this script reads version {SHARD_VERSION}. "
                        "Regenerate it with data/prepare.py.")
    n_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise DataError(f"shard {path} is {size} bytes but its header promises {n_tokens} tokens ({expected} bytes): "
                        "the file is truncated or corrupt. Re-download or regenerate it.")
    return n_tokens


def read_shard(path: str | Path) -> np.ndarray:
    n = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)


def find_shards(pattern: str, what: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        folder = Path(pattern).parent
        hint = (f"the folder {folder} does not exist" if not folder.exists() else f"{folder} has no file matching {Path(pattern).name}")
        raise DataError(
            f"no {what} shards found: {hint}. Download the challenge data with "
            f"`python data/prepare.py download` or make shards from your own text with `python data/prepare.py text ...`, "
            f"then point DATA_DIR (or {'TRAIN_FILES' if what == 'train' else 'VAL_FILES'}) at them."
        )
    return files


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str, offset: int = 0) -> None:
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{where} holds token id {int(tokens[bad])} at position {offset + bad}, outside VOCAB_SIZE={vocab_size}: "
                        "the shards were made with another tokenizer. Set VOCAB_SIZE to match, or regenerate the shards.")


class TrainWindows:
    """Random training windows, as in the record but independent of the number of ranks.

    Every shard gets a random phase in [0, seq_len) and is cut into windows of seq_len+1 tokens at
    phase + k*seq_len. All windows of all shards are shuffled together (one uniform permutation is the
    same as drawing shards in proportion to the windows they have left, then a random window of it).
    Step s takes the next `global_batch` windows of that order; rank r uses rows [r*B, (r+1)*B) of each
    micro-batch. So the global batch depends only on the seed, ranks never share a window, any world size
    works (also with fewer shards than ranks), and 1 process sees what N processes see together.
    """

    def __init__(self, files: list[Path], seq_len: int, seed: int, vocab_size: int | None = None):
        self.files = files
        self.seq_len = seq_len
        self.counts = np.array([read_shard_header(f) for f in files], dtype=np.int64)
        if (self.counts < seq_len + 1).all():
            raise DataError(f"every train shard is shorter than TRAIN_SEQ_LEN+1={seq_len + 1} tokens; lower TRAIN_SEQ_LEN.")
        self.vocab_size = vocab_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.mmaps = [None] * len(files)
        self.epoch = -1
        self._new_epoch()

    def _new_epoch(self):
        self.epoch += 1
        phases = np.array([self.rng.integers(0, self.seq_len) if c > 2 * self.seq_len else 0 for c in self.counts])
        n_windows = np.maximum(0, (self.counts - 1 - phases) // self.seq_len)
        shard_of = np.repeat(np.arange(len(self.files), dtype=np.int32), n_windows)
        first = np.concatenate([[0], np.cumsum(n_windows)[:-1]])
        index_in_shard = np.arange(shard_of.size, dtype=np.int64) - first[shard_of]
        offsets = phases[shard_of] + index_in_shard * self.seq_len
        order = self.rng.permutation(shard_of.size)
        self.order_shard = shard_of[order]
        self.order_offset = offsets[order]
        self.cursor = 0

    def _mmap(self, i):
        if self.mmaps[i] is None:
            self.mmaps[i] = np.memmap(self.files[i], dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(int(self.counts[i]),))
        return self.mmaps[i]

    def next_windows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n windows of the global order as (shard index, offset) arrays."""
        shards, offsets = [], []
        while n > 0:
            if self.cursor >= self.order_shard.size:
                self._new_epoch()
            take = min(n, self.order_shard.size - self.cursor)
            shards.append(self.order_shard[self.cursor:self.cursor + take])
            offsets.append(self.order_offset[self.cursor:self.cursor + take])
            self.cursor += take
            n -= take
        return np.concatenate(shards), np.concatenate(offsets)

    def read(self, shards: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
        """Fill out[i] (seq_len+1 tokens) with window i."""
        for i, (s, o) in enumerate(zip(shards.tolist(), offsets.tolist())):
            out[i] = self._mmap(s)[o:o + self.seq_len + 1]
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            row = int(np.argmax((out >= self.vocab_size).any(axis=1)))
            check_token_range(out[row], self.vocab_size, f"train shard {self.files[int(shards[row])]}", offset=int(offsets[row]))


class TrainLoader:
    """Yields this rank's (inputs, targets) micro-batches on the device.

    A background thread reads the windows into pinned memory while the GPU works on the previous
    micro-batch; the copy to the device is non-blocking.
    """

    def __init__(self, h: Hyperparameters, device: torch.device, files: list[Path] | None = None, prefetch: int = 4):
        self.h = h
        self.device = device
        self.windows = TrainWindows(files if files is not None else find_shards(h.train_files, "train"),
                                    h.train_seq_len, h.seed, h.vocab_size)
        self.rows = h.micro_batch_seqs
        self.pin = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        h = self.h
        rows_global = self.rows * h.world_size
        try:
            while not self.stop.is_set():
                shards, offsets = self.windows.next_windows(rows_global)
                mine = slice(h.rank * self.rows, (h.rank + 1) * self.rows)
                buf = np.empty((self.rows, h.train_seq_len + 1), dtype=np.uint16)
                self.windows.read(shards[mine], offsets[mine], buf)
                batch = torch.from_numpy(buf.astype(np.int64))
                if self.pin:
                    batch = batch.pin_memory()
                self._put(batch)
        except BaseException as e:  # hand the error to the consumer
            self._put(e)

    def _put(self, item):
        """Queue an item, giving up once close() was called (so a full queue never blocks shutdown)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[Tensor, Tensor]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        batch = item.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def close(self):
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join(timeout=5)


def load_validation_tokens(h: Hyperparameters) -> np.ndarray:
    files = find_shards(h.val_files, "val")
    tokens = np.concatenate([read_shard(f) for f in files])
    check_token_range(tokens, h.vocab_size, f"the validation shards ({h.val_files})")
    if tokens.size < 2:
        raise DataError(f"the validation shards ({h.val_files}) hold fewer than 2 tokens; nothing to score.")
    return tokens


# ================================================================================================
# Model
# ================================================================================================

try:  # FlashAttention 3 (Hopper); PyTorch's scaled_dot_product_attention is the fallback everywhere else.
    from flash_attn_interface import flash_attn_func as _flash_attn_3
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_3 = None
from torch.nn.attention.flex_attention import BlockMask, flex_attention  # DOC_MASK's kernel (PyTorch >= 2.5)

FLEX_BLOCK = 128  # flex attention's tile: document masks are described per FLEX_BLOCK x FLEX_BLOCK tile

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def document_ids(ids: Tensor, documents: bool = True, span: int | None = None) -> Tensor:
    """(B, T) tokens -> (B, T) int32 segment index within each row, +1 at every BOS_ID (documents) and at
    every multiple of span (TRAIN_SPAN_SCHEDULE). Tokens before a row's first BOS belong to the document that
    started before the window (index 0)."""
    starts = ids == BOS_ID if documents else torch.zeros_like(ids, dtype=torch.bool)
    if span is not None and span < ids.size(1):
        position = torch.arange(ids.size(1), device=ids.device)
        starts = starts | ((position % span == 0) & (position > 0))
    return starts.cumsum(dim=1, dtype=torch.int32)


def document_block_mask(doc: Tensor) -> BlockMask:
    """Flex attention's mask for causal attention inside documents, built from tile summaries, not from the
    T x T grid. doc (B, T) is nondecreasing along T, so a query tile and an earlier key tile share a document
    only if the key tile's last document is the query tile's first; the pair needs no per-element mask if
    both tiles lie wholly inside that one document (and the key tile is strictly earlier)."""
    B, T = doc.shape
    n = T // FLEX_BLOCK
    tiles = doc.view(B, n, FLEX_BLOCK)
    first, last = tiles[:, :, 0], tiles[:, :, -1]
    q_first, q_last = first[:, :, None], last[:, :, None]  # (B, n, 1): query tiles
    k_first, k_last = first[:, None, :], last[:, None, :]  # (B, 1, n): key tiles
    earlier = torch.ones(n, n, dtype=torch.bool, device=doc.device).tril(-1)
    diagonal = torch.eye(n, dtype=torch.bool, device=doc.device)
    touching = (earlier & (k_last == q_first)) | diagonal  # some (query, key) pair may be allowed
    whole = earlier & (k_first == q_last) & (k_last == q_first)  # every pair allowed: one document, strictly earlier
    partial = touching & ~whole

    def as_indices(selected: Tensor) -> tuple[Tensor, Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)[:, None]  # (B, 1, n)
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        return counts, order.to(torch.int32)[:, None]  # (B, 1, n, n): the selected key tiles first

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    # T is a multiple of FLEX_BLOCK here, so the tile counts give the lengths (no seq_lengths: PyTorch 2.9 safe)
    return BlockMask.from_kv_blocks(*as_indices(partial), *as_indices(whole), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_document_causal)


class Documents(NamedTuple):
    """DOC_MASK's view of a batch: ids (B, T) document index of every token (document_ids), and tiles, flex
    attention's tile mask (document_block_mask) when the compiled blocks will use flex, else None."""
    ids: Tensor
    tiles: BlockMask | None


def documents(ids: Tensor, doc_mask: bool, span: int | None, flex: bool) -> Documents:
    """The batch's Documents. The tile mask is built here, eagerly, once per forward, and enters the compiled
    blocks as an input (a new layout does not recompile them). Built inside the compiled graph it was wrong on
    the H200 (PyTorch 2.11; most likely the sorts that order the tile lists, which inductor turns into Triton
    sort kernels) and the loss became NaN at step 3; bench/flex_check.py shows the in-graph mask's errors and
    the eager mask's agreement with masked SDPA. flex: the runtime compiles the blocks; no tile mask for
    lengths that are not a multiple of FLEX_BLOCK, or for CPU training (flex has no CPU backward)."""
    doc = document_ids(ids, doc_mask, span)
    usable = flex and ids.size(1) % FLEX_BLOCK == 0 and (ids.is_cuda or not torch.is_grad_enabled())
    return Documents(doc, document_block_mask(doc) if usable else None)


def document_attention(q: Tensor, k: Tensor, v: Tensor, doc: Documents, flex: bool) -> Tensor:
    """Causal attention that does not cross documents (DOC_MASK). q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D).
    flex (inside a compiled graph) with a tile mask: the flex-attention kernel, which skips the tiles no
    document spans; otherwise SDPA with an explicit (B, 1, T, T) mask, the same result at dense cost."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    T = q.size(2)
    if flex and doc.tiles is not None and (q.is_cuda or not q.requires_grad):  # no flex backward on CPU
        out = flex_attention(q, k, v, block_mask=doc.tiles, enable_gqa=k.size(1) != q.size(1))
        return out.transpose(1, 2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = (causal & (doc.ids[:, :, None] == doc.ids[:, None, :]))[:, None]
    if k.size(1) != q.size(1):
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa", native_gqa: bool = True) -> Tensor:
    """q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D); causal, GQA, default 1/sqrt(D) scale. backend: fa3 or an
    SDPA variant (Runtime.attention); native_gqa: SDPA's own GQA (PyTorch >= 2.5) instead of repeating K/V."""
    if backend == "fa3" and q.is_cuda:
        out = _flash_attn_3(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if k.size(1) != q.size(1):
        if native_gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def rope_tables(seq_len: int, rope_dims: int, base: float, device) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()  # (T, rope_dims/2)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2*cos.size(-1) dims of each head; the rest pass through (partial RoPE)."""
    rot = 2 * cos.size(-1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c, x_pass), dim=-1)


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output its component along that head's own (normalized) value vector.
    y (B,T,H,D), v (B,T,Hkv,D); query heads of one GQA group share a value head."""
    B, T, H, D = y.shape
    groups = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)  # (B, T, Hkv, 1, D)
    return (groups - (groups * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


class CastedLinear(nn.Linear):
    """Float32 master weight, matmul in the input's dtype (bf16 on GPU).

    out_scale (one value per output channel) multiplies the weight's rows before the cast, which equals
    scaling the output. It is there for the blocks' attn_scale and mlp_scale: folded into the weight, the
    backward needs neither the scaled output gradient as a tensor of activations' size nor the output
    itself for the scale's gradient (that becomes a sum over the weight's rows)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.lora: tuple[Tensor, Tensor] | None = None  # per-sequence adapters (A, B) of document TTT only

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        weight = self.weight if out_scale is None else self.weight * out_scale[:, None]
        out = F.linear(x, weight.to(x.dtype))
        return out if self.lora is None else out + lora_delta(x, *self.lora)


def lora_delta(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-sequence low-rank update of a linear layer's output: row i of the batch gets x_i A_i^T B_i^T."""
    return torch.bmm(torch.bmm(x, a.to(x.dtype).transpose(1, 2)), b.to(x.dtype).transpose(1, 2))


class Attention(nn.Module):
    """Causal GQA attention with RMS-normed q/k, partial RoPE, a learned per-head query gain and XSA.

    gate_dims > 0 adds the sparse output gate (ATTN_GATE): each head's output is multiplied by
    sigmoid(w_h . x[:gate_dims]), read from the first gate_dims channels of the attention's own input, so a
    head can switch itself off for a token (no attention sink needed) at 8 x 12 parameters per layer. The
    weights start at zero (every gate 0.5, which attn_scale absorbs) and train with the scalars (AdamW)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, use_xsa: bool,
                 gate_dims: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.use_xsa = use_xsa
        self.gate = nn.Parameter(torch.zeros(num_heads, gate_dims)) if gate_dims > 0 else None
        self.runtime = EAGER  # the model's Runtime (GPT.use_runtime): which attention kernel

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, out_scale: Tensor | None = None,
                doc: Documents | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_partial_rope(rms_norm(q), cos, sin), apply_partial_rope(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if doc is None:
            y = causal_attention(q, k, v, self.runtime.attention, self.runtime.native_gqa)
        else:  # DOC_MASK: the batch's document indices and (compiled runtimes) flex's tile mask
            # flex only inside a compiled graph: eager flex is a slow reference (GPTQ's hooks and document TTT
            # run these blocks eagerly even in a compiled runtime)
            y = document_attention(q, k, v, doc, flex=torch.compiler.is_compiling())
        if self.use_xsa:
            y = remove_self_value(y, v)
        if self.gate is not None:
            y = y * torch.sigmoid(F.linear(x[..., :self.gate.size(1)], self.gate.to(x.dtype)))[..., None]
        return self.proj(y.reshape(B, T, -1), out_scale)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=0.5).square(), out_scale)


class Block(nn.Module):
    """Pre-norm block. resid_mix blends the stream with the embedding x0 first; parallel blocks feed
    attention and MLP the same normalized input (GPT-J), sequential ones feed the MLP the post-attention
    stream. Norms have no weights, so the parallel block normalizes once.

    Two-lane blocks (TWO_LANE_START) carry two residual streams, stacked as x (2, B, T, D): attention reads
    lane 0 (blended with x0), the MLP reads lane 1, and each lane keeps lane_keep[k] of itself and adds
    lane_mix[0, k] x attention + lane_mix[1, k] x MLP. All start at 1, so with equal lanes the block starts as
    a parallel one; the model averages the lanes before the final norm."""

    def __init__(self, h, layer_idx: int):
        super().__init__()
        dim = h.model_dim
        use_xsa = layer_idx >= h.num_layers - h.xsa_last_n
        self.attn = Attention(dim, h.num_heads, h.num_kv_heads, h.qk_gain_init, use_xsa, h.attn_gate_dims if h.attn_gate else 0)
        self.mlp = MLP(dim, int(h.mlp_mult * dim))
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # A buffer, not a Python float: one compiled graph then serves every layer.
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(layer_idx + 1) if h.ln_scale else 1.0), persistent=False)
        self.parallel = 0 <= h.parallel_residual_start <= layer_idx
        self.two_lane = 0 <= h.two_lane_start <= layer_idx
        if self.two_lane:
            self.lane_keep = nn.Parameter(torch.ones(2))
            self.lane_mix = nn.Parameter(torch.ones(2, 2))  # [attention | MLP, lane]

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, doc: Documents | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        s = self.ln_scale.to(x.dtype)
        if self.two_lane:
            lane0, lane1 = mix[0] * x[0] + mix[1] * x0, x[1]
            attn = self.attn(rms_norm(lane0) * s, cos, sin, self.attn_scale, doc)
            mlp = self.mlp(rms_norm(lane1) * s, self.mlp_scale)
            keep, w = self.lane_keep.to(x.dtype), self.lane_mix.to(x.dtype)
            return torch.stack((keep[0] * lane0 + w[0, 0] * attn + w[1, 0] * mlp,
                                keep[1] * lane1 + w[0, 1] * attn + w[1, 1] * mlp))
        x = mix[0] * x + mix[1] * x0
        # x + attn_scale * attn(.) with the scale folded into attn's output projection (see CastedLinear)
        if self.parallel:
            n = rms_norm(x) * s
            return x + self.attn(n, cos, sin, self.attn_scale, doc) + self.mlp(n, self.mlp_scale)
        x = x + self.attn(rms_norm(x) * s, cos, sin, self.attn_scale, doc)
        return x + self.mlp(rms_norm(x) * s, self.mlp_scale)


def run_block(block: Block, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, doc: Documents | None = None) -> Tensor:
    return block(x, x0, cos, sin, doc)


def merge_skip(x: Tensor, skip: Tensor, weight: Tensor, gate: Tensor | None) -> Tensor:
    """U-Net skip: scale the pushed activation per channel, then blend (sigmoid gate) or add it. Compiled
    on GPU as its own small graph, so it costs one fused kernel each way instead of several eager ones
    (inside the block graph it would double the block variants to compile)."""
    scaled = weight.to(x.dtype) * skip
    return torch.lerp(scaled, x, torch.sigmoid(gate).to(x.dtype)) if gate is not None else x + scaled


def sum_tensors(tensors: list[Tensor]) -> Tensor:
    """Sum in float32, rounded once (compiled on GPU: one kernel reading every input once)."""
    total = tensors[0].float()
    for t in tensors[1:]:
        total = total + t.float()
    return total.to(tensors[0].dtype)


class FanOut(torch.autograd.Function):
    """n uses of one tensor (x0, read by every block). Autograd would add the n gradients pairwise, each
    add reading two full tensors and writing one (3(n-1) passes); here they are summed in one pass
    (n + 1). The n gradients are held until the last one arrives, at the end of backward."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int, sum_fn):
        ctx.sum_fn = sum_fn  # sum_tensors, compiled on GPU (Runtime.sum_tensors)
        return tuple(x.detach() for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        return (ctx.sum_fn(present) if present else None), None, None


def layer_order(num_layers: int, num_loops: int, loop_start: int, loop_end: int, looping: bool) -> tuple[list[int], list[int]]:
    """Virtual layer order as (encoder, decoder) block indices. With looping, blocks loop_start..loop_end
    run 1+num_loops times: 11 blocks, loops 3-5 twice more -> [0,1,2,3,4,5,3,4] + [5,3,4,5,6,7,8,9,10]."""
    if looping and num_loops > 0:
        order = list(range(loop_start)) + list(range(loop_start, loop_end + 1)) * (num_loops + 1) + list(range(loop_end + 1, num_layers))
    else:
        order = list(range(num_layers))
    half = len(order) // 2
    return order[:half], order[half:]


class SmearGate(nn.Module):
    """Previous-token mixing at the input (SMEAR_GATE): x_t += scale * sigmoid(w . x_t[:dims]) * x_{t-1}, a
    cheap bigram path before the first block. BOS-safe: a document's first token (its BOS) takes nothing from
    the token before it, which ends another document. scale starts at 0, so the model starts unchanged; both
    train with the scalars (AdamW) and are stored as fp16."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dims))
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        gate = torch.sigmoid(F.linear(x[:, 1:, :self.weight.size(1)], self.weight.to(x.dtype)))  # (B, T-1, 1)
        keep = (ids[:, 1:, None] != BOS_ID).to(x.dtype)
        return torch.cat((x[:, :1], x[:, 1:] + self.scale.to(x.dtype) * gate * keep * x[:, :-1]), dim=1)


class FinalNorm(nn.Module):
    """The norm before the output head; a module so GPTQ can hook the head's input."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


class GPT(nn.Module):
    def __init__(self, h, runtime: "Runtime | None" = None):
        super().__init__()
        self.h = h
        self.tie_embeddings, self.logit_softcap = h.tie_embeddings, h.logit_softcap
        self.tok_emb = nn.Embedding(h.vocab_size, h.embedding_dim)
        project = h.embedding_dim != h.model_dim
        self.embed_proj = CastedLinear(h.embedding_dim, h.model_dim) if project else None
        self.head_proj = CastedLinear(h.model_dim, h.embedding_dim) if project else None
        self.smear = SmearGate(h.smear_gate_dims) if h.smear_gate else None
        self.blocks = nn.ModuleList([Block(h, i) for i in range(h.num_layers)])
        self.final_norm = FinalNorm()
        self.lm_head = None if h.tie_embeddings else CastedLinear(h.embedding_dim, h.vocab_size, zero_init=True)
        # Skip weights are sized for the looped order (the longer one), so switching looping on keeps them.
        enc, dec = layer_order(h.num_layers, h.num_loops, h.loop_start, h.loop_end, looping=h.num_loops > 0)
        n_skips = min(len(enc), len(dec))
        self.skip_weights = nn.Parameter(torch.ones(n_skips, h.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(n_skips, h.model_dim)) if h.skip_gates_enabled else None
        self.looping = False
        self.attention_span: int | None = None  # TRAIN_SPAN_SCHEDULE's current span (the trainer sets it)
        self.head_dim, self.rope_dims = h.model_dim // h.num_heads, h.rope_dims or h.model_dim // h.num_heads
        self._rope_cache: dict = {}
        self._init_weights(h.tied_embed_init_std if h.tie_embeddings else 1.0)
        self.use_runtime(runtime or EAGER)

    def use_runtime(self, runtime: "Runtime"):
        """How this model computes (attention kernel, compiled block and head): see Runtime."""
        self.runtime = runtime
        for block in self.blocks:
            block.attn.runtime = runtime

    def _init_weights(self, embed_std: float):
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                if m.zero_init:
                    nn.init.zeros_(m.weight)
                elif min(m.weight.shape) >= 64:
                    nn.init.orthogonal_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=m.weight.size(1) ** -0.5)

    def layer_order(self) -> tuple[list[int], list[int]]:
        h = self.h
        return layer_order(h.num_layers, h.num_loops, h.loop_start, h.loop_end, self.looping)

    def _rope(self, T: int, device) -> tuple[Tensor, Tensor]:
        key = (T, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(T, self.rope_dims, self.h.rope_base, device)
        return self._rope_cache[key]

    def forward_hidden(self, ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, EMBEDDING_DIM) final hidden states, in the compute dtype."""
        dtype = torch.bfloat16 if ids.is_cuda else torch.float32
        x = rms_norm(self.tok_emb(ids).float()).to(dtype)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        if self.smear is not None:
            x = self.smear(x, ids)
        cos, sin = self._rope(ids.size(1), ids.device)
        # DOC_MASK: attention stays in its document; attention_span (training only): and in its span of tokens
        masked = self.h.doc_mask or self.attention_span is not None
        doc = documents(ids, self.h.doc_mask, self.attention_span, self.runtime.compiled) if masked else None
        # x0 must be a distinct tensor: torch.compile guards on aliasing (x is x0), and passing one tensor
        # twice to the first block would compile a graph just for it.
        x0, x, skips = x, x.clone(), []
        enc, dec = self.layer_order()
        n_uses = len(enc) + len(dec)
        rt = self.runtime
        uses = FanOut.apply(x0, n_uses, rt.sum_tensors) if x0.requires_grad else [x0] * n_uses
        for k, i in enumerate(enc):
            x = rt.block(self.blocks[i], x, uses[k], cos, sin, doc)
            skips.append(x)
        if skips:  # the first decoder merge would get x twice (x is skip): keep graphs free of aliasing
            skips[-1] = skips[-1].clone()
        for j, i in enumerate(dec):
            lanes = self.blocks[i].two_lane
            if lanes and x.dim() == 3:  # the first two-lane block: both lanes start as the stream
                x = torch.stack((x, x))
            if j < self.skip_weights.size(0) and skips:
                # clone(): a row view has a storage offset, which a compiled graph would specialize on
                gate = self.skip_gates[j].clone() if self.skip_gates is not None else None
                merged = rt.merge_skip(x[0] if lanes else x, skips.pop(), self.skip_weights[j].clone(), gate)
                x = torch.stack((merged, x[1])) if lanes else merged  # a skip feeds lane 0, the attention's
            x = rt.block(self.blocks[i], x, uses[len(enc) + j], cos, sin, doc)
        if x.dim() == 4:
            x = 0.5 * (x[0] + x[1])
        x = self.final_norm(x)
        if self.head_proj is not None:
            x = self.head_proj(x)
        return x

    def head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Mean cross entropy (the training loss)."""
        return head_loss(self.forward_hidden(ids), self.head_weight(), targets, self.logit_softcap)


def softcapped_logits(hidden: Tensor, weight: Tensor, cap: float, delta: Tensor | None = None) -> Tensor:
    """cap * tanh(z / cap) of the raw logits z = hidden W^T (+ delta: document TTT's head adapters)."""
    z = F.linear(hidden, weight.to(hidden.dtype))
    z = (z if delta is None else z + delta).float()
    return cap * torch.tanh(z / cap)


def head_loss(hidden: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    logits = softcapped_logits(hidden, weight, cap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def head_nll(hidden: Tensor, weight: Tensor, targets: Tensor, cap: float, delta: Tensor | None = None) -> Tensor:
    """Per-token negative log-likelihood in float32, same shape as targets."""
    logits = softcapped_logits(hidden, weight, cap, delta)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)


# ================================================================================================
# Fused cross entropy: a Triton kernel for the training loss on GPU
# ================================================================================================

# Fused soft-capped cross entropy (training loss on GPU). The plain path materializes the logits, then
# Inductor reads them several times and writes fp32 intermediates. Here one Triton program per row computes
# the loss and the gradient with respect to the raw logits and overwrites the logits with that gradient;
# backward is then just the two matmuls. The row is walked in BLOCK-wide chunks twice: online max and sum
# of exponentials first, then the gradient (the second read mostly hits L2). Holding a whole row in
# registers instead was slower at vocab 8192 (notes/speed.md). Math as in head_loss:
# s = cap*tanh(z/cap), loss = logsumexp(s) - s[target], dloss/dz = (softmax(s) - onehot(target)) * (1 - tanh(z/cap)^2).
try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton (CPU-only installs): the plain path is used
    triton = None

FUSED_CE_CONFIG = {"block": 2048, "num_warps": 8}  # fastest of those bench/bench_ce.py tried on an H100

if triton is not None:
    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # saturates cleanly to +-1 for large |x|

    @triton.jit
    def _softcapped_ce_rows(logits_ptr, targets_ptr, losses_ptr, row_stride, n_cols, cap, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.zeros((), tl.float32)
        for start in range(0, n_cols, BLOCK):  # pass 1: online log-sum-exp
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            s = cap * _tanh(tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) / cap)
            s = tl.where(inside, s, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        s_target = cap * _tanh(tl.load(base + target).to(tl.float32) / cap)
        tl.store(losses_ptr + row, lse - s_target)
        for start in range(0, n_cols, BLOCK):  # pass 2: gradient, written over the logits
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            t = _tanh(tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) / cap)
            grad = (tl.exp(cap * t - lse) - (cols == target).to(tl.float32)) * (1.0 - t * t)
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def softcapped_ce_in_place(logits: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-row losses of (N, V) logits; the logits are replaced by d loss_i / d logits."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(FUSED_CE_CONFIG["block"], triton.next_power_of_2(n_cols))
    _softcapped_ce_rows[(n_rows,)](logits, targets, losses, logits.stride(0), n_cols, float(cap), BLOCK=block,
                                   num_warps=FUSED_CE_CONFIG["num_warps"])
    return losses


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Mean soft-capped cross entropy of hidden @ weight^T, with the Triton kernel above."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
        flat = hidden.reshape(-1, hidden.size(-1))
        logits = flat @ weight.to(hidden.dtype).t()  # (N, V); becomes the gradient buffer
        losses = softcapped_ce_in_place(logits, targets.reshape(-1), cap)
        ctx.save_for_backward(flat, weight, logits)
        ctx.hidden_shape = hidden.shape
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        flat, weight, grad_logits = ctx.saved_tensors
        # d mean / d loss_i goes on the small operands, in float32 (a bf16 scale would be off by up to 0.4 %)
        scale = grad_loss.float() / grad_logits.size(0)
        grad_hidden = grad_logits @ (weight.float() * scale).to(grad_logits.dtype)
        grad_weight = (grad_logits.t() @ flat).float() * scale
        return grad_hidden.view(ctx.hidden_shape), grad_weight.to(weight.dtype), None, None


def fused_head_loss(hidden: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    return SoftcappedCrossEntropy.apply(hidden, weight, targets, cap)


def fused_ce_self_check(device: torch.device, vocab_size: int, cap: float) -> str | None:
    """Run the fused loss once on a small problem of the run's vocabulary against head_loss. None when
    they agree; otherwise why not (the caller falls back to the plain path, so a Triton version the
    kernel does not suit costs speed, not the run)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(64, 32, device=device, generator=g).to(torch.bfloat16)
        weight = torch.randn(vocab_size, 32, device=device, generator=g)
        targets = torch.randint(0, vocab_size, (64,), device=device, generator=g)
        results = []
        for fn in (fused_head_loss, head_loss):
            x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = fn(x, w, targets, cap)
            loss.backward()
            results.append((loss.float(), x.grad.float(), w.grad.float()))
        for name, a, b in zip(("loss", "hidden gradient", "weight gradient"), *results):
            if not torch.isfinite(a).all() or (a - b).abs().max() > 0.05 * b.abs().max() + 1e-6:
                return f"its {name} differs from the plain path's"
    except Exception as e:  # noqa: BLE001 - any failure (compile, launch, numerics) means "don't use it"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


# ================================================================================================
# Optimizer: Muon for block matrices, AdamW for embedding and control tensors, EMA
# ================================================================================================

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (Muon), the same every step
# Polar Express (Amsel et al. 2025, arXiv:2505.16932): a different minimax quintic for each of 5 steps, so the
# singular values land near 1 (the fixed quintic leaves them anywhere in ~0.7-1.2); steps past the fifth reuse
# the last. These are the values the later records use (#1787 on), with the same Frobenius normalization.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_schedule(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each Newton-Schulz step for MUON_NS_COEFFS=quintic | polar."""
    if kind == "polar":
        return tuple(POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps))
    return (NS_COEFFS,) * steps


def newton_schulz(G: Tensor, schedule: tuple[tuple[float, float, float], ...]) -> Tensor:
    """Approximately orthogonalize a batch of matrices (n, r, c) with r <= c, in bf16. schedule: the (a, b, c)
    of each step (ns_schedule), so its length is the number of steps."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


class Muon(torch.optim.Optimizer):
    """MuonEq-R: Nesterov momentum, each update row-normalized, orthogonalized by Newton-Schulz, scaled
    by sqrt(max(1, rows/cols)), with decoupled weight decay.

    Matrices are bucketed by shape (tall ones transposed, so 2048x512 and 512x2048 share a bucket) and
    each bucket is orthogonalized as one batched product. With several ranks, every rank takes a
    contiguous share of each bucket, and one all-reduce of the bf16 updates gives everyone everything.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_normalize: bool, rank: int = 0, world_size: int = 1, orthogonalize=newton_schulz,
                 ns_coeffs: str = "quintic"):
        params = list(params)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.row_normalize = row_normalize
        self.ns_schedule = ns_schedule(ns_coeffs, backend_steps)
        self.orthogonalize = orthogonalize  # newton_schulz, compiled on GPU (Runtime.newton_schulz)
        self.rank, self.world_size = rank, world_size
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(params):
            r, c = p.shape
            buckets.setdefault((min(r, c), max(r, c)), []).append(i)
        # The flat update buffer follows bucket order, same shapes adjacent, so each rank's share of a
        # bucket is one run of whole matrices per shape, written with a single copy.
        self.offsets: dict[int, int] = {}
        self.plan: list[list[tuple[list[int], int, int]]] = []  # per bucket: (param indices, start, end) runs this rank owns
        pos = 0
        for key in sorted(buckets):
            idx = sorted(buckets[key], key=lambda i: (tuple(params[i].shape), i))
            share = math.ceil(len(idx) / world_size)
            owned = set(idx[rank * share:(rank + 1) * share])
            runs: list[tuple[list[int], int, int]] = []
            for i in idx:
                self.offsets[i] = pos
                if i in owned:
                    if runs and params[runs[-1][0][-1]].shape == params[i].shape and runs[-1][2] == pos:
                        runs[-1] = (runs[-1][0] + [i], runs[-1][1], pos + params[i].numel())
                    else:
                        runs.append(([i], pos, pos + params[i].numel()))
                pos += params[i].numel()
            self.plan.append(runs)
        self.total = pos

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        params, lr, momentum, wd = group["params"], group["lr"], group["momentum"], group["weight_decay"]
        flat = torch.zeros(self.total, device=params[0].device, dtype=torch.bfloat16)
        owned = [i for runs in self.plan for run in runs for i in run[0]]
        if owned:
            grads = [params[i].grad if params[i].grad is not None else torch.zeros_like(params[i]) for i in owned]
            bufs = []
            for i in owned:
                state = self.state[params[i]]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(params[i])
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            nesterov = dict(zip(owned, torch._foreach_add(grads, bufs, alpha=momentum)))
        for runs in self.plan:
            if not runs:
                continue
            oriented, tall = [], []
            for idx, _, _ in runs:
                G = torch.stack([nesterov[i] for i in idx])
                if self.row_normalize:
                    G = G / G.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                tall.append(G.size(1) > G.size(2))
                oriented.append(G.mT if tall[-1] else G)
            X = self.orthogonalize(torch.cat(oriented) if len(oriented) > 1 else oriented[0], self.ns_schedule)
            for (idx, start, end), G, t in zip(runs, oriented, tall):
                U, X = X[:G.size(0)], X[G.size(0):]
                U = U.mT if t else U
                rows, cols = U.shape[-2:]
                flat[start:end].view_as(U).copy_(U * max(1.0, rows / cols) ** 0.5)
        if self.world_size > 1:
            dist.all_reduce(flat)
        updates = flat.float()
        if wd > 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, [updates[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p) for i, p in enumerate(params)], alpha=-lr)


def partition_params(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Muon: every CastedLinear weight except an untied head; AdamW: embedding, head, control tensors."""
    groups = {"matrix": [], "embed": [], "head": [], "scalar": []}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, CastedLinear)}
    for name, p in model.named_parameters():
        if name == "tok_emb.weight":
            groups["embed"].append(p)
        elif name == "lm_head.weight":
            groups["head"].append(p)
        elif id(p) in linear_weights and p.ndim == 2:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


class Optimizers:
    def __init__(self, h, model: GPT):
        groups = partition_params(model)
        fused = dict(fused=True) if next(model.parameters()).is_cuda else dict(foreach=True)
        adam = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, **fused)
        embed_lr = h.tied_embed_lr if h.tie_embeddings else h.embed_lr
        self.embed = torch.optim.AdamW([dict(params=groups["embed"], lr=embed_lr, base_lr=embed_lr)], weight_decay=h.embed_wd, **adam)
        self.scalar = torch.optim.AdamW([dict(params=groups["scalar"], lr=h.scalar_lr, base_lr=h.scalar_lr)], weight_decay=h.adam_wd, **adam)
        self.muon = Muon(groups["matrix"], h.matrix_lr, h.muon_momentum, h.muon_backend_steps, h.muon_wd,
                         h.muon_row_normalize, h.rank, h.world_size, model.runtime.newton_schulz, h.muon_ns_coeffs)
        self.muon.param_groups[0]["base_lr"] = h.matrix_lr
        self.all = [self.embed, self.muon, self.scalar]
        if groups["head"]:
            self.head = torch.optim.Adam([dict(params=groups["head"], lr=h.head_lr, base_lr=h.head_lr)], **adam)
            self.all.insert(1, self.head)

    def set_schedule(self, lr_scale: float, muon_momentum: float):
        for opt in self.all:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale
        self.muon.param_groups[0]["momentum"] = muon_momentum

    def step(self):
        for opt in self.all:
            opt.step()
        for opt in self.all:
            opt.zero_grad(set_to_none=True)


def lr_scale_at(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """Constant, then linear decay to MIN_LR over the last WARMDOWN_FRAC of training (by time fraction)."""
    if warmdown_frac <= 0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


def muon_momentum_at(step: int, h) -> float:
    f = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - f) * h.muon_momentum_warmup_start + f * h.muon_momentum


class EMA:
    """Exponential moving average of every parameter, in float32, updated after each step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s)


# ================================================================================================
# Runtime: attention backend and compiled functions
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How this process computes the model: the attention kernel, and the functions the model, Muon and
    the evaluation call -- torch.compile'd (or the fused Triton loss) on GPU, the plain ones on CPU. One
    object, built once by build_runtime and held by the model (GPT.use_runtime), which the trainer and the
    evaluation reach through the model; nothing is swapped in module globals."""
    attention: str = "sdpa"  # fa3 / sdpa (PyTorch picks) / sdpa_flash / sdpa_cudnn
    native_gqa: bool = True  # SDPA's own GQA (PyTorch >= 2.5) instead of repeating K/V; see SDPA_GQA
    compiled: bool = False
    fused_ce: bool = False
    block: Callable = run_block
    head_loss: Callable = head_loss
    head_nll: Callable = head_nll
    merge_skip: Callable = merge_skip
    sum_tensors: Callable = sum_tensors
    newton_schulz: Callable = newton_schulz

    def describe(self) -> str:
        return (f"attention:{self.attention} gqa:{'native' if self.native_gqa else 'repeat'} "
                f"compile:{int(self.compiled)} fused_ce:{int(self.fused_ce)}")


EAGER = Runtime()  # plain functions, SDPA: what a model uses until it is given another runtime


def compile_requested(h, device: torch.device) -> bool:
    """COMPILE=1, or COMPILE=auto on a GPU."""
    return h.compile == "1" or (h.compile == "auto" and device.type == "cuda")


def build_runtime(h, device: torch.device) -> Runtime:
    """Pick the attention backend and, on GPU, compile the block, the head, the skip merge, the gradient sum
    and Newton-Schulz; check the fused cross entropy before using it."""
    want = h.attention_backend
    if want == "fa3" and _flash_attn_3 is None:
        raise ConfigError("ATTENTION_BACKEND=fa3 but flash_attn_interface (FlashAttention 3) is not importable; "
                          "install it or use ATTENTION_BACKEND=sdpa.")
    attention = "fa3" if (want in ("auto", "fa3") and _flash_attn_3 is not None and device.type == "cuda") else "sdpa"
    if device.type == "cuda" and want in ("sdpa_flash", "sdpa_cudnn"):  # restrict SDPA to one kernel family
        torch.backends.cuda.enable_flash_sdp(want == "sdpa_flash")
        torch.backends.cuda.enable_cudnn_sdp(want == "sdpa_cudnn")
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        attention = want
    use_compile = compile_requested(h, device)
    functions = dict(block=run_block, head_loss=head_loss, head_nll=head_nll, merge_skip=merge_skip, sum_tensors=sum_tensors)
    if use_compile:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        functions = {name: torch.compile(fn, dynamic=False, fullgraph=True) for name, fn in functions.items()}
    if device.type == "cuda" and h.compile != "0":
        functions["newton_schulz"] = torch.compile(newton_schulz, dynamic=False)
    fused_ce = h.fused_ce and triton is not None and device.type == "cuda"
    if fused_ce:
        problem = fused_ce_self_check(device, h.vocab_size, h.logit_softcap)
        if problem is None:
            functions["head_loss"] = fused_head_loss
        else:
            fused_ce = False
            log(f"warning: fused cross entropy disabled, the plain path is used instead ({problem}); FUSED_CE=0 silences this")
    return Runtime(attention=attention, native_gqa=h.sdpa_gqa == "native", compiled=use_compile, fused_ce=fused_ce, **functions)


def model_loss(model: GPT, ids: Tensor, targets: Tensor) -> Tensor:
    """Mean training loss through the model's runtime (compiled or fused head on GPU)."""
    return model.runtime.head_loss(model.forward_hidden(ids), model.head_weight(), targets, model.logit_softcap)


class TrainingModule(nn.Module):
    """What DDP wraps: forward returns the (compiled-head) training loss."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        return model_loss(self.model, ids, targets)


# ================================================================================================
# Training
# ================================================================================================

PROCESS_START = time.time()


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostChannel:
    """Small agreements between ranks about finished steps (elapsed time, divergence, the logged loss), made
    on the host through a gloo group: a collective on the GPU stream would wait for the step in flight."""

    def __init__(self, distributed: bool, own_group: bool | None = None):
        """own_group: a gloo group of its own (automatic: unless the default group already is gloo)."""
        self.group, self.world = None, 1
        if distributed:
            if own_group is None:
                own_group = dist.get_backend() != "gloo"
            self.group = dist.new_group(backend="gloo") if own_group else dist.group.WORLD
            self.world = dist.get_world_size()

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.world for v in self._reduce(values, dist.ReduceOp.SUM)]

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()


@dataclasses.dataclass
class StepInFlight:
    """A step whose kernels are queued: its loss is copied to the host behind them, and `done` fires when
    the copy (so the whole step) has finished."""
    number: int
    loss: Tensor
    done: "torch.cuda.Event | None"

    @staticmethod
    def queue(number: int, loss: Tensor) -> "StepInFlight":
        if not loss.is_cuda:
            return StepInFlight(number, loss.detach(), None)
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepInFlight(number, host, done)

    def wait(self) -> float:
        if self.done is not None:
            self.done.synchronize()
        return self.loss.item()


@dataclasses.dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    stopped_by_cap: bool
    loader: TrainLoader


class Trainer:
    """Owns the wrapped model, optimizers, EMA and loader, and runs steps."""

    def __init__(self, h, model: GPT, device: torch.device):
        self.h, self.model, self.device = h, model, device
        module = TrainingModule(model)
        if h.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # Buffers (ln_scale) are constants: no sync per forward. PyTorch >= 2.13 renamed the switch.
            no_buffer_sync = {("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                               else "broadcast_buffers"): False}
            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                         gradient_as_bucket_view=True, **no_buffer_sync)
        self.module = module
        self.opt = Optimizers(h, model)
        self.loader = TrainLoader(h, device)
        self.calibration_probe_ms: float | None = None  # one calibration micro-batch, timed in warm_up

    def step(self, step: int, lr_scale: float, micro_steps: int, poison: bool = False) -> Tensor:
        """One optimizer step over `micro_steps` micro-batches; returns the mean loss (on device)."""
        h = self.h
        total = torch.zeros((), device=self.device)
        for micro in range(micro_steps):
            x, y = self.loader.next()
            last = micro == micro_steps - 1
            ctx = self.module.no_sync() if (h.distributed and not last) else contextlib.nullcontext()
            with ctx:
                loss = self.module(x, y)
                if poison:  # DEBUG_NAN_AT_STEP, for tests
                    loss = loss * float("nan")
                (loss / micro_steps).backward()
            total += loss.detach()
        self.opt.set_schedule(lr_scale, muon_momentum_at(step, h))
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), h.grad_clip_norm)
        self.opt.step()
        return total / micro_steps

    def warm_up(self):
        """Compile and run every graph (loop-free and looped) on WARMUP_STEPS one-micro-batch steps each,
        then put weights, optimizer state and data order back: the warm-up leaves no trace."""
        h = self.h
        if h.warmup_steps <= 0:
            return
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.attention_span = self.span_at(0.0)  # the span-masked graph, which the whole run then uses
        phases = [False, True] if h.num_loops > 0 else [False]
        for looping in phases:
            self.model.looping = looping
            for i in range(h.warmup_steps):
                self.step(0, 1.0, 1)
                if i + 1 == h.warmup_steps:
                    log(f"{'loop_' if looping else ''}warmup_step: {i + 1}/{h.warmup_steps}")
        self.model.looping = False
        self.model.attention_span = None
        with torch.no_grad():
            self.model.load_state_dict(saved)
        self.opt = Optimizers(h, self.model)
        self.loader.close()
        self.loader = TrainLoader(h, self.device)

    def span_at(self, frac: float) -> int | None:
        """TRAIN_SPAN_SCHEDULE's span at this fraction of training; None without a schedule. At the end of the
        schedule it is TRAIN_SEQ_LEN (no cut), kept so the masked graph of the earlier steps is reused."""
        h = self.h
        return span_at(frac, h.train_spans, h.train_seq_len) if h.train_spans else None

    def auto_reserve(self) -> bool:
        h = self.h
        return h.max_wallclock_seconds > 0 and h.gptq_reserve_auto and "GPTQ_RESERVE_SECONDS" not in h.explicit

    def calibration_reserve(self) -> tuple[float, str]:
        """(seconds kept for GPTQ calibration, how they were chosen), once warm_up has run."""
        h = self.h
        if self.calibration_probe_ms is None:
            why = "GPTQ_RESERVE_SECONDS set" if "GPTQ_RESERVE_SECONDS" in h.explicit else "GPTQ_RESERVE_AUTO=0"
            return h.gptq_reserve_seconds, why
        per_rank = -(-h.gptq_calibration_batches // h.world_size)
        reserve = calibration_reserve_seconds(self.calibration_probe_ms, per_rank)
        return reserve, (f"measured: {per_rank} batches/rank x {self.calibration_probe_ms:.0f}ms probe x "
                         f"{CALIBRATION_RESERVE_FACTOR} + {CALIBRATION_RESERVE_MARGIN_S:.0f}s")

    def train(self, val: "ValidationData | None") -> tuple[TrainResult, EMA]:
        h, device, model = self.h, self.device, self.model
        if h.max_wallclock_seconds > 0 and not self.auto_reserve() and h.gptq_reserve_seconds >= h.max_wallclock_seconds:
            raise ConfigError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} leaves no training time after "
                              f"GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds}.")
        t_warm = time.time()
        self.warm_up()
        if self.auto_reserve():
            model.looping = h.num_loops > 0  # calibration runs on the final model, looped if it loops
            self.calibration_probe_ms = probe_calibration_ms(model, h, device)
            model.looping = False
        cap_ms = None
        if h.max_wallclock_seconds > 0:
            reserve_s, why = self.calibration_reserve()
            cap_ms = 1000.0 * (h.max_wallclock_seconds - reserve_s)
            if cap_ms <= 0:
                raise ConfigError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} leaves no training time after the "
                                  f"{reserve_s:.1f}s reserved for GPTQ calibration ({why}); raise MAX_WALLCLOCK_SECONDS "
                                  f"or lower GPTQ_CALIBRATION_BATCHES.")
            log(f"wallclock: cap {h.max_wallclock_seconds:g}s, {reserve_s:.1f}s reserved for GPTQ calibration ({why}), "
                f"training stops at {cap_ms:.0f}ms")
        ema = EMA(model, h.ema_decay)
        sync(device)
        log(f"startup: warm-up {time.time() - t_warm:.1f}s, first timed step {time.time() - PROCESS_START:.1f}s after launch")
        # The host checks each step while the next one runs: after queueing step N it waits for step N-1's
        # loss, so the GPU never idles between steps. Stopping, the schedule and the looping switch use the
        # time at which the last checked step ended, agreed across ranks (the max), plus that step's length
        # as the estimate for the step in flight.
        channel = HostChannel(h.distributed)
        in_flight: collections.deque[StepInFlight] = collections.deque()
        step, train_ms, stopped_by_cap = 0, 0.0, False
        checked_ms, last_step_ms = 0.0, 0.0  # when the last checked step ended (train time), and its length

        def in_flight_end_ms() -> float:
            """When the step in flight will end (the last checked one's end if none is in flight)."""
            return checked_ms + (last_step_ms if in_flight else 0.0)

        def check_oldest():
            nonlocal checked_ms, last_step_ms, stopped_by_cap
            done = in_flight.popleft()
            loss_value = done.wait()
            now_ms = train_ms + 1000 * (time.perf_counter() - t0)
            ended_ms, bad = channel.max([now_ms, float(not math.isfinite(loss_value))])
            if bad:
                raise TrainingDiverged(
                    f"the training loss became {loss_value} at step {done.number}: training diverged. Lower MATRIX_LR / "
                    f"TIED_EMBED_LR / SCALAR_LR, or check GRAD_CLIP_NORM; the run stops here and writes no artifact.")
            last_step_ms, checked_ms = ended_ms - checked_ms, ended_ms
            if wallclock_stop(in_flight_end_ms(), cap_ms):
                stopped_by_cap = True  # the step in flight (if any) ends past the cap: it is the last one
            last = not in_flight and (stopped_by_cap or done.number == h.iterations)
            n = done.number
            if h.train_log_every > 0 and (n <= 5 or n % h.train_log_every == 0 or last):
                tok_s = n * h.train_batch_tokens / (checked_ms / 1000)
                loss_value = channel.mean([loss_value])[0]  # the whole batch's loss, not this rank's share
                log(f"{n}/{h.iterations} train_loss: {loss_value:.4f} train_time: {checked_ms:.0f}ms "
                    f"step_avg: {checked_ms / n:.2f}ms tok/s: {tok_s:.0f}")

        t0 = time.perf_counter()
        while step < h.iterations and not stopped_by_cap:
            if val is not None and h.val_loss_every > 0 and step > 0 and step % h.val_loss_every == 0:
                while in_flight:
                    check_oldest()
                if stopped_by_cap:
                    break
                sync(device)
                train_ms += 1000 * (time.perf_counter() - t0)
                span, model.attention_span = model.attention_span, None  # whole windows, as the final scoring
                loss, bpb, _, _ = evaluate_plain(model, val, h, device)
                model.attention_span = span
                log(f"{step}/{h.iterations} val_loss: {loss:.4f} val_bpb: {bpb:.4f}")
                t0 = time.perf_counter()
            # the step about to be queued starts on the GPU when the one in flight ends
            frac = in_flight_end_ms() / cap_ms if cap_ms is not None else step / max(h.iterations, 1)
            if h.num_loops > 0 and not model.looping and frac >= h.enable_looping_at:
                model.looping = True
                enc, dec = model.layer_order()
                log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{enc} decoder:{dec}")
            span = self.span_at(frac)
            if span != model.attention_span:
                model.attention_span = span
                log(f"attention_span: step:{step} frac:{frac:.3f} span:{span}")
            loss = self.step(step, lr_scale_at(frac, h.warmdown_frac, h.min_lr), h.grad_accum_steps,
                             poison=step + 1 == h.debug_nan_at_step)
            ema.update()
            step += 1
            in_flight.append(StepInFlight.queue(step, loss))
            if len(in_flight) > 1:
                check_oldest()
        while in_flight:
            check_oldest()
        sync(device)
        train_ms += 1000 * (time.perf_counter() - t0)
        model.attention_span = None  # evaluation and calibration see whole windows
        if stopped_by_cap:
            log(f"stopping_early: wallclock_cap train_time: {train_ms:.0f}ms step: {step}/{h.iterations}")
        log(f"train_end: step:{step} train_time:{train_ms:.0f}ms reason:{'wallclock_cap' if stopped_by_cap else 'iterations'}")
        if device.type == "cuda":
            log(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
        return TrainResult(step, train_ms, stopped_by_cap, self.loader), ema


# ================================================================================================
# Quantization: Hessians, GPTQ + SDClip
# ================================================================================================


def hessian_key(weight_name: str) -> str:
    """Weights that read the same input share one Hessian: q, k and v of a block read the same x."""
    return weight_name.replace(".attn.c_k.", ".attn.c_q.").replace(".attn.c_v.", ".attn.c_q.")


def quantized_weight_names(model: GPT, min_numel: int) -> list[str]:
    """Linear weights and the embedding with more than min_numel values; control tensors stay fp16."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear)} | {"tok_emb.weight"}
    return [n for n, p in model.named_parameters() if n in linear and p.numel() > min_numel]


class RandomTokenBatches:
    """Micro-batches of random tokens, shaped like the train loader's: timing probes run on these, so
    nothing outside the timed budget reads training data."""

    def __init__(self, h, device: torch.device):
        self.shape, self.vocab, self.device = (h.micro_batch_seqs, h.train_seq_len), h.vocab_size, device
        self.gen = torch.Generator(device=device).manual_seed(0)

    def next(self) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, self.vocab, self.shape, generator=self.gen, device=self.device)
        return x, x


def probe_calibration_ms(model: GPT, h, device: torch.device) -> float:
    """Milliseconds of one GPTQ calibration micro-batch per rank (hooks, eager blocks, all-reduce), on
    random tokens; the first call warms the eager kernels up and is not counted."""
    batches = RandomTokenBatches(h, device)
    for _ in range(2):
        _, ms = timed(device, lambda: collect_hessians(model, batches, h, device, batches=h.world_size))
    return ms


@torch.no_grad()
def collect_hessians(model: GPT, loader, h, device: torch.device, batches: int | None = None) -> dict[str, Tensor]:
    """H = sum x x^T of the inputs of every quantized layer over GPTQ_CALIBRATION_BATCHES micro-batches
    (or `batches`) of training data, split over ranks and summed across them (N ranks collect N times
    faster). The output head's (= tied embedding's) H comes from the final hidden states."""
    batches = h.gptq_calibration_batches if batches is None else batches
    names = quantized_weight_names(model, h.quant_min_numel)
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    counts = {"rows": 0}
    hooks = []

    def add(key: str, x: Tensor):
        x = x.detach().reshape(-1, x.size(-1)).float()
        if key not in sums:
            sums[key] = torch.zeros(x.size(1), x.size(1), device=device)
        sums[key].addmm_(x.T, x)

    for key in sorted({hessian_key(n) for n in names}):
        if key in ("tok_emb.weight", "lm_head.weight"):
            continue
        if key.endswith(".attn.c_q.weight"):  # q, k, v read the attention's input: one Hessian, hooked there
            module = modules[key.removesuffix(".c_q.weight")]
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=key: add(key, args[0])))
            continue
        module = modules[key.removesuffix(".weight")]
        hooks.append(module.register_forward_hook(lambda m, inp, out, key=key: add(key, inp[0])))
    head_source = model.head_proj if model.head_proj is not None else model.final_norm
    hooks.append(head_source.register_forward_hook(lambda m, inp, out: add("head", out)))
    runtime = model.runtime
    model.use_runtime(dataclasses.replace(runtime, block=run_block))  # eager, so the hooks see every call
    try:
        share = [batches // h.world_size + (r < batches % h.world_size) for r in range(h.world_size)]
        for i in range(max(share)):  # every rank runs the same number of micro-batches
            x, _ = loader.next()
            if i < share[h.rank]:
                model.forward_hidden(x)
                counts["rows"] += x.numel()
    finally:
        model.use_runtime(runtime)
        for hk in hooks:
            hk.remove()
    rows = torch.tensor(float(counts["rows"]), device=device)
    if dist.is_available() and dist.is_initialized():
        for key in sorted(sums):
            dist.all_reduce(sums[key])
        dist.all_reduce(rows)
    return {k: v / rows for k, v in sums.items()}


SCALE_STEPS_PER_OCTAVE = 32  # row scales are stored as 8-bit log codes: a 2.2% grid, 256 steps = 8 octaves


def scales_from_codes(top: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Row scales from (per-matrix top scale, uint8 log codes): top * 2^(-code/32), in float32. The
    quantizer and the loader both call this, so the dequantized weights are bit-identical."""
    return (top[..., None].astype(np.float64) * np.exp2(-codes.astype(np.float64) / SCALE_STEPS_PER_OCTAVE)).astype(np.float32)


def sdclip_scales(W: Tensor, bits: int, clip_sigmas: float) -> tuple[np.ndarray, np.ndarray]:
    """SDClip: one scale per row, k * std(row) / qmax, snapped to the stored log grid below the matrix's
    largest scale. Returns (top (n,) float32, codes (n, rows) uint8). One byte per row instead of fp16
    saves ~25 KB of artifact on the full model; the grid step is far below what SDClip's k could tell."""
    qmax = 2 ** (bits - 1) - 1
    return log_scale_codes((clip_sigmas * W.double().std(dim=-1) / qmax).clamp_min(1e-12).cpu().numpy())  # (n, rows)


def log_scale_codes(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row scales (..., rows) in their stored form: (the largest per matrix as float32, uint8 log codes below
    it), which scales_from_codes turns back into scales on the grid."""
    top = raw.max(axis=-1).astype(np.float32)
    codes = np.clip(np.round(SCALE_STEPS_PER_OCTAVE * np.log2(top[..., None] / raw)), 0, 255).astype(np.uint8)
    return top, codes


def round_to_grid(W: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer codes of W (..., rows, cols) on a symmetric grid of `bits` bits with one scale per row."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(W / scale[..., None]), -qmax, qmax)


def gptq_quantize(W: Tensor, H: Tensor, bits: int, clip_sigmas: float, block: int = 128,
                  damp_frac: float = 0.01, notes: list | None = None) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """GPTQ on a batch of matrices W (n, rows, cols) with Hessians H (n, cols, cols).

    Columns are visited in order of descending Hessian diagonal; each column is rounded to the SDClip
    grid and its error, weighted by the inverse Hessian's Cholesky factor, is pushed onto the columns
    not yet quantized (blocked: inside a block column by column, then one matmul for the rest).
    Returns int8 codes (n, rows, cols), the per-matrix top scales (n,) and the uint8 row-scale codes (n, rows).
    """
    W = W.float().clone()
    H = H.float().clone()
    n, rows, cols = W.shape
    top, scale_codes = sdclip_scales(W, bits, clip_sigmas)
    scale = torch.from_numpy(scales_from_codes(top, scale_codes)).to(W.device)
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0  # inputs that never fire: their weights can't matter, quantize them as zero
    if dead.any():
        H[dead.unsqueeze(-1).expand_as(H) & dead.unsqueeze(-2).expand_as(H)] = 0
        diag[dead] = 1.0
        W.masked_fill_(dead.unsqueeze(1), 0.0)
        if notes is not None:
            notes.append(f"{int(dead.sum())} dead input columns")
    perm = torch.argsort(diag, dim=-1, descending=True)
    inv_perm = torch.argsort(perm, dim=-1)
    W = torch.gather(W, 2, perm.unsqueeze(1).expand(n, rows, cols))
    H = torch.gather(torch.gather(H, 1, perm.unsqueeze(-1).expand(n, cols, cols)), 2, perm.unsqueeze(1).expand(n, cols, cols))
    eye = torch.eye(cols, device=W.device)
    damp = damp_frac * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    for attempt in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp[:, None, None] * eye)
        if not bool((info != 0).any()):
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if not bool((info != 0).any()):
                break
        damp = torch.where(info != 0, damp * 10, damp)
        if notes is not None:
            notes.append(f"Cholesky failed, damping x10 (attempt {attempt + 1})")
    else:
        raise RuntimeError("GPTQ: the Hessian stays singular after 8 rounds of extra damping")
    Q = torch.zeros(n, rows, cols, dtype=torch.int8, device=W.device)
    sc = scale.unsqueeze(-1)  # (n, rows, 1)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        Wb = W[:, :, i1:i2].clone()
        Ub = U[:, i1:i2, i1:i2]
        err_block = torch.zeros_like(Wb)
        for j in range(i2 - i1):
            w = Wb[:, :, j:j + 1]
            q = round_to_grid(w, scale, bits)  # w (n, rows, 1), one scale per row
            Q[:, :, i1 + j] = q.squeeze(-1).to(torch.int8)
            err = (w - q * sc) / Ub[:, j, j].view(n, 1, 1)
            Wb[:, :, j + 1:] -= err * Ub[:, j:j + 1, j + 1:]
            err_block[:, :, j:j + 1] = err
        if i2 < cols:
            W[:, :, i2:] -= err_block @ U[:, i1:i2, i2:]
    Q = torch.gather(Q, 2, inv_perm.unsqueeze(1).expand(n, rows, cols))
    return Q, top, scale_codes


@dataclasses.dataclass
class QuantizedTensor:
    name: str
    shape: tuple
    bits: int  # 16 = stored as fp16, else int codes with per-row log-coded scales
    codes: np.ndarray | None = None  # int8 (rows, cols)
    scale_top: float = 0.0  # largest row scale (float32)
    scale_codes: np.ndarray | None = None  # uint8 (rows,): scale = top * 2^(-code/32)
    values: np.ndarray | None = None  # float16, for bits == 16
    col_scale: np.ndarray | None = None  # float16 (cols,): AWQ_ALPHA's column scales, divided out after the rows'

    def dequantize(self) -> Tensor:
        if self.bits == 16:
            return torch.from_numpy(self.values.astype(np.float32)).view(self.shape)
        scales = scales_from_codes(np.float32(self.scale_top), self.scale_codes)
        W = torch.from_numpy(self.codes.astype(np.float32) * scales[:, None])
        return W if self.col_scale is None else W / torch.from_numpy(self.col_scale.astype(np.float32))


def quantize_model(model: GPT, hessians: dict[str, Tensor], h, matrix_clip_sigmas: float | None = None) -> tuple[list[QuantizedTensor], list[str]]:
    """Quantize every weight of the model: GPTQ for large matrices (batched by shape), fp16 for the rest."""
    clip = h.matrix_clip_sigmas if matrix_clip_sigmas is None else matrix_clip_sigmas
    state = {n: p.detach().float() for n, p in model.named_parameters()}
    targets = set(quantized_weight_names(model, h.quant_min_numel))
    notes: list[str] = []
    # Jobs: rows of weights that share a Hessian are stacked (q|k|v), then same-shape jobs are batched.
    jobs: dict[str, list[str]] = {}
    for name in state:
        if name in targets:
            key = "head" if name in ("tok_emb.weight", "lm_head.weight") else hessian_key(name)
            jobs.setdefault(key, []).append(name)
    bits_of = {key: h.embed_bits if key == "head" else h.matrix_bits for key in jobs}
    clip_of = {}
    for key in jobs:
        # ARTIFACT_FIT's coarser grid (clip above MATRIX_CLIP_SIGMAS) scales the MLP's own k alike
        key_clip = clip * h.mlp_clip_sigmas / h.matrix_clip_sigmas if ".mlp." in key and h.mlp_clip_sigmas > 0 else clip
        clip_of[key] = h.embed_clip_sigmas if key == "head" else key_clip
    alpha_of = {key: 0.0 if key == "head" else h.awq_alpha for key in jobs}
    results = gptq_jobs(state, jobs, bits_of, clip_of, hessians, notes, alpha_of)
    if h.matrix_extra_bit_top_k > 0:
        # Spend bytes where quantization hurts most: the groups with the largest output error per weight get one
        # more bit (about a quarter of the error for ~1 more bit per weight), quantized again from the float weights.
        per_weight = {key: sum(weighted_quant_error(state[n], results[n], hessians[key]) for n in names)
                      / sum(state[n].numel() for n in names)
                      for key, names in jobs.items() if key != "head" and bits_of[key] < 8}
        upgrade = sorted(per_weight, key=lambda k: -per_weight[k])[:h.matrix_extra_bit_top_k]
        results.update(gptq_jobs(state, {k: jobs[k] for k in upgrade}, {k: bits_of[k] + 1 for k in upgrade}, clip_of, hessians,
                                 notes, alpha_of))
        notes.append("extra bit: " + ", ".join(upgrade))
    out = []
    for name, t in state.items():
        out.append(results.get(name) or QuantizedTensor(name, tuple(t.shape), 16, values=t.half().cpu().numpy()))
    if h.lqer_rank > 0:
        out += low_rank_corrections(state, results, hessians, h.lqer_rank, h.lqer_top_k, h.lqer_bits, notes)
    return out, notes


def weighted_quant_error(W: Tensor, q: "QuantizedTensor", H: Tensor) -> float:
    """tr(E H E^T) for E = W - Q(W): the squared error of the layer's outputs on its calibration inputs."""
    E = (W - q.dequantize().to(W.device)).double()
    return float(((E @ H.to(W.device).double()) * E).sum())


def awq_column_scales(H: Tensor, alpha: float) -> Tensor:
    """AWQ_ALPHA's column scales for a batch of Hessians H (n, cols, cols): (input RMS / its mean)^alpha per
    column, snapped to 2^(k/16) within [1/16, 16] and rounded to fp16, the values the artifact stores (so the
    quantizer and the loader use the same numbers). Inputs that never fire get 1/16."""
    rms = torch.diagonal(H, dim1=-2, dim2=-1).float().clamp_min(0).sqrt()
    ratio = rms / rms.mean(-1, keepdim=True).clamp_min(1e-12)
    log2 = (alpha * torch.log2(ratio.clamp_min(2.0 ** -32))).clamp(-4, 4)
    return (2.0 ** (torch.round(16 * log2) / 16)).half().float()


def gptq_jobs(state: dict[str, Tensor], jobs: dict[str, list[str]], bits_of: dict[str, int], clip_of: dict[str, float],
              hessians: dict[str, Tensor], notes: list[str], alpha_of: dict[str, float] | None = None) -> dict[str, "QuantizedTensor"]:
    """GPTQ for each job (the weights that share one Hessian, rows stacked), jobs of one shape, bit width, clip
    and AWQ alpha batched into one call; returns a QuantizedTensor per weight name. With an alpha, the job is
    quantized as W diag(s) under the Hessian diag(s)^-1 H diag(s)^-1 (the same layer outputs), so input columns
    that carry more activation get a finer share of each row's grid; s is stored with the codes."""
    alpha_of = alpha_of or {}
    batches: dict[tuple, list[str]] = {}
    for key, names in jobs.items():
        rows = sum(state[n].size(0) for n in names)
        batches.setdefault((rows, state[names[0]].size(1), bits_of[key], clip_of[key], alpha_of.get(key, 0.0)), []).append(key)
    results: dict[str, QuantizedTensor] = {}
    for (rows, cols, bits, clip_k, alpha), keys in sorted(batches.items(), key=lambda kv: str(kv[0])):
        W = torch.stack([torch.cat([state[n] for n in jobs[k]], 0) for k in keys])
        H = torch.stack([hessians[k] for k in keys]).to(W.device)
        col = awq_column_scales(H, alpha).to(W.device) if alpha > 0 else None
        if col is not None:
            W, H = W * col[:, None, :], H / (col[:, :, None] * col[:, None, :])
        Q, top, scale_codes = gptq_quantize(W, H, bits, clip_k, notes=notes)
        for b, key in enumerate(keys):
            start = 0
            for name in jobs[key]:
                r = state[name].size(0)
                results[name] = QuantizedTensor(name, tuple(state[name].shape), bits,
                                                codes=Q[b, start:start + r].cpu().numpy(), scale_top=float(top[b]),
                                                scale_codes=scale_codes[b, start:start + r],
                                                col_scale=None if col is None else col[b].cpu().numpy().astype(np.float16))
                start += r
    return results


LQER_SUFFIXES = (".lqer_a", ".lqer_b")  # the two factors of a weight's correction, stored after all parameters
AWQ_SUFFIX = ".awq_cols"  # AWQ_ALPHA: a weight's column scales, stored as fp16 after the LQER factors


def maxabs_codes(M: Tensor, bits: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Codes of M (rows, cols) on a symmetric grid with one scale per row, max |row| / qmax snapped to the
    stored log grid (no clipping beyond the grid step): (codes int8, top, scale codes uint8)."""
    qmax = 2 ** (bits - 1) - 1
    top, scale_codes = log_scale_codes((M.abs().amax(dim=1).double() / qmax).clamp_min(1e-12).cpu().numpy())
    scales = torch.from_numpy(scales_from_codes(top, scale_codes)).to(M.device)
    return round_to_grid(M.float(), scales, bits).to(torch.int8).cpu().numpy(), float(top), scale_codes


def low_rank_corrections(state: dict[str, Tensor], results: dict[str, "QuantizedTensor"], hessians: dict[str, Tensor],
                         rank: int, top_k: int, bits: int, notes: list[str]) -> list["QuantizedTensor"]:
    """LQER_RANK: a rank-r correction A B of the quantization error E = W - Q(W) for the top_k matrices where
    it removes the most output error. The error is weighted by each input channel's RMS (the square root of
    the Hessian's diagonal), so the SVD keeps what the layer's outputs feel, not what the weights hold:
    E diag(d) ~ U S V^T, A = U S, B = V^T diag(d)^-1. Both factors are stored with LQER_BITS bits, A
    transposed (rank rows each), and the loader adds A B to the dequantized weight, so evaluation runs the
    plain model."""
    gains = {}
    for name, q in results.items():
        if name in ("tok_emb.weight", "lm_head.weight"):
            continue
        W = state[name]
        E = W - q.dequantize().to(W.device)
        H = hessians[hessian_key(name)].to(W.device).float()
        d = H.diagonal().clamp_min(1e-12).sqrt()
        U, S, Vh = torch.linalg.svd(E * d[None, :], full_matrices=False)
        r = min(rank, S.numel())
        gains[name] = (float((S[:r] ** 2).sum() / (S ** 2).sum().clamp_min(1e-30)), float((S[:r] ** 2).sum()),
                       U[:, :r] * S[:r], Vh[:r] / d[None, :])
    chosen = sorted(gains, key=lambda n: -gains[n][1])[:top_k]
    out = []
    for name in chosen:
        for suffix, factor in zip(LQER_SUFFIXES, (gains[name][2].T, gains[name][3])):
            codes, top, scale_codes = maxabs_codes(factor, bits)
            out.append(QuantizedTensor(name + suffix, tuple(factor.shape), bits, codes=codes, scale_top=top, scale_codes=scale_codes))
    notes.append("lqer: " + ", ".join(f"{n} -{100 * gains[n][0]:.1f}%" for n in chosen) + " of weighted error")
    return out


# ================================================================================================
# Artifact: compact binary layout, byte shuffle, compression, exact size accounting
# ================================================================================================
#
# File = header (24 bytes) + compressed payload + (since version 4) the entropy-coded codes.
#   header: magic b"PGLF", version u8, compressor u8 (0 brotli, 1 lzma), 2 reserved bytes,
#           crc32 u32 of the payload before compression followed by the coded codes, payload length u64,
#           length u32 of the coded codes (0, and reserved, before version 4).
#   payload: u32 length + JSON {config, table, names_digest, code_tables (version 4)}, then four sections:
#     int8 codes of every quantized tensor (in table order; each in column order since version 3: GPTQ's
#     error feedback runs along a row, so codes down a column are more alike; none here since version 4),
#     uint8 row-scale codes, float32 top scale per quantized tensor, fp16 plain tensors (byte-shuffled).
#   coded codes (version 4): the same column-order codes, rANS-coded outside the compressor (see rans_encode).
#     GPTQ codes are nearly independent draws, so Brotli ends ~1% above their order-0 entropy while a
#     static per-tensor table gets within ~0.02% of it (~160 KB less on the record-size model). Context
#     tables (previous code in the column, running column magnitude) were measured: <=16 KB before the
#     cost of their tables, so they are not used.
# The table lists, per tensor in the model's parameter order, [bits, *shape]; names are not stored, only
# a digest of them, which the loader compares with the model built from the stored config.

ARTIFACT_MAGIC = b"PGLF"
ARTIFACT_VERSION = 4  # 4: codes rANS-coded; 3: codes in column order; 2: row order, row scales as 8-bit log codes
READABLE_VERSIONS = (2, 3, 4)
ARTIFACT_HEADER = struct.Struct("<4sBBHIQI")
COMPRESSORS = {"brotli": 0, "lzma": 1}
RANS_LANES = 512  # independent rANS states; each numpy step codes one symbol in every lane. Each lane ships a
# 5-byte final state: 512 lanes decode the record model's 36 M codes in ~1.6 s (2 CPU cores), 1024 in ~1.1 s for 2.5 KB
RANS_PRECISION = 16  # code frequencies sum to 2**16 (coarser tables cost ~3 KB at 2**14, ~14 KB at 2**12)
RANS_LOW = 1 << 24  # states stay in [2**24, 2**40), 16-bit words in and out: exact in int64; a state bound of
# 2**16 (32-bit states) would lose ~20 KB, as x // freq gets coarse when the state is near the frequency total


def code_frequencies(codes: np.ndarray) -> list[int]:
    """[lo, f(lo), ..., f(hi)] for the int codes lo..hi: counts scaled to sum to 2**RANS_PRECISION, every value
    that occurs getting 1 plus its share of the rest (so never 0), the leftover going to the largest fractions."""
    lo = int(codes.min())
    counts = np.bincount(codes.ravel().astype(np.int64) - lo)
    present = counts > 0
    share = counts * ((1 << RANS_PRECISION) - int(present.sum())) / counts.sum()
    freq = np.floor(share).astype(np.int64) + present
    freq[np.argsort(np.floor(share) - share - 2 * present, kind="stable")[:(1 << RANS_PRECISION) - int(freq.sum())]] += 1
    return [lo, *freq.tolist()]


def rans_table(table: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frequency and cumulative start per code byte (two's complement), and the code byte of every slot."""
    byte = np.arange(table[0], table[0] + len(table) - 1) & 0xFF
    freq, start = np.zeros(256, np.int64), np.zeros(256, np.int64)
    freq[byte] = table[1:]
    start[byte] = np.cumsum(table[1:]) - table[1:]
    if freq.min() < 0 or freq.sum() != 1 << RANS_PRECISION:
        raise ValueError("a code table does not sum to the coder's total")
    return freq, start, np.repeat(byte, freq[byte]).astype(np.uint8)


def rans_encode(streams: list[np.ndarray], tables: list[list[int]]) -> bytes:
    """Interleaved static rANS of uint8 code streams, one table each. Lane i codes symbols i, i + LANES, ... of
    every stream in turn, so a numpy step handles LANES neighbouring symbols. The decoder runs forward, so this
    runs backward; the 16-bit words a step flushes are stored in lane order at that step's place, which is
    where the decoder's same step reads them. Output: final states (5 bytes per lane), then the words."""
    x = np.full(RANS_LANES, RANS_LOW, dtype=np.int64)
    steps = []
    for sym, table in zip(reversed(streams), reversed(tables)):
        freq, start, _ = rans_table(table)
        for a in range((sym.size - 1) // RANS_LANES * RANS_LANES, -1, -RANS_LANES):
            s = sym[a:a + RANS_LANES]
            xs, f = x[:s.size], freq[s]  # a view: updates land in x
            full = xs >= f * (RANS_LOW >> RANS_PRECISION << 16)  # coding would leave [RANS_LOW, 2**40): flush 16 bits
            steps.append(xs[full] & 0xFFFF)
            xs[full] >>= 16
            q, r = np.divmod(xs, f)
            xs[:] = (q << RANS_PRECISION) + r + start[s]
    words = np.concatenate(steps[::-1]).astype("<u2")
    return x.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :5].tobytes() + words.tobytes()


def rans_decode(data: bytes, sizes: list[int], tables: list[list[int]]) -> np.ndarray:
    """Inverse of rans_encode: the concatenated streams. Raises ValueError (or IndexError) on data that is not
    a coding of streams of these sizes: every word must be used and every lane must end in its initial state."""
    state = np.zeros((RANS_LANES, 8), np.uint8)
    state[:, :5] = np.frombuffer(data, np.uint8, count=5 * RANS_LANES).reshape(-1, 5)
    x = state.view("<u8").ravel().astype(np.int64)
    words = np.frombuffer(data, "<u2", offset=5 * RANS_LANES).astype(np.int64)
    out, pos, used = np.empty(sum(sizes), np.uint8), 0, 0
    for n, table in zip(sizes, tables):
        freq, start, symbol = rans_table(table)
        for a in range(0, n, RANS_LANES):
            xs = x[:min(RANS_LANES, n - a)]
            slot = xs & ((1 << RANS_PRECISION) - 1)
            s = symbol[slot]
            xs[:] = freq[s] * (xs >> RANS_PRECISION) + slot - start[s]
            low = xs < RANS_LOW
            k = int(np.count_nonzero(low))
            xs[low] = (xs[low] << 16) | words[used:used + k]
            out[pos + a:pos + a + xs.size], used = s, used + k
        pos += n
    if used != words.size or (x != RANS_LOW).any():
        raise ValueError("the coded codes do not decode to the tensor table")
    return out


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """Group byte 0 of every stride-byte value, then byte 1, ...: low and high bytes of fp16 values
    have very different statistics, and compressors do better on each group alone."""
    arr = np.frombuffer(data, dtype=np.uint8)
    assert arr.size % stride == 0
    return arr.reshape(-1, stride).T.copy().tobytes()


def byte_unshuffle(data: bytes, stride: int = 2) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.reshape(stride, -1).T.copy().tobytes()


def names_digest(names_and_shapes) -> str:
    return hashlib.sha256(json.dumps(list(names_and_shapes)).encode()).hexdigest()[:16]


def compress(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def decompress(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli
        return brotli.decompress(data)
    return lzma.decompress(data)


def serialize_artifact(tensors: list[QuantizedTensor], config: dict, compressor: str, eval_settings: dict | None = None) -> bytes:
    """eval_settings (EVAL_* and TTT_* of the run) go into the JSON as "eval"; artifacts without it still load."""
    scaled = [t for t in tensors if t.col_scale is not None]
    tensors = tensors + [QuantizedTensor(t.name + AWQ_SUFFIX, (t.shape[1],), 16, values=t.col_scale) for t in scaled]
    table = [[t.bits, *t.shape] for t in tensors]
    meta = {"config": config, "table": table, "names_digest": names_digest((t.name, list(t.shape)) for t in tensors)}
    corrected = [t.name[:-len(LQER_SUFFIXES[0])] for t in tensors if t.name.endswith(LQER_SUFFIXES[0])]
    if corrected:
        meta["lqer"] = corrected  # their factors follow the parameters in the table, a then b for each
    if scaled:
        meta["awq"] = [t.name for t in scaled]  # their column scales follow the LQER factors, in this order
    if eval_settings is not None:
        meta["eval"] = eval_settings
    quantized = [t for t in tensors if t.bits != 16]
    meta["code_tables"] = tables = [code_frequencies(t.codes) for t in quantized]
    meta = json.dumps(meta, separators=(",", ":")).encode()
    streams = [np.ascontiguousarray(t.codes.astype(np.int8).T).view(np.uint8).ravel() for t in quantized]  # column order
    coded = rans_encode(streams, tables) if quantized else b""
    scale_codes = b"".join(t.scale_codes.astype(np.uint8).tobytes() for t in quantized)
    tops = np.array([t.scale_top for t in quantized], dtype="<f4").tobytes()
    plain = b"".join(t.values.astype("<f2").tobytes() for t in tensors if t.bits == 16)
    payload = struct.pack("<I", len(meta)) + meta + scale_codes + tops + byte_shuffle(plain)
    header = ARTIFACT_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, COMPRESSORS[compressor], 0,
                                  zlib.crc32(coded, zlib.crc32(payload)), len(payload), len(coded))
    return header + compress(payload, compressor) + coded


def parse_artifact(blob: bytes, source: str = "artifact") -> tuple[dict, list[tuple[int, tuple]], bytes, bytes, np.ndarray, bytes]:
    """Check and unpack an artifact: (meta, table, codes, scale codes, tops, plain). Refuses anything damaged."""
    fix = f"The file {source} is damaged or not an artifact of this script: re-run training or copy it again."
    if len(blob) < ARTIFACT_HEADER.size:
        raise ArtifactError(f"{source} is {len(blob)} bytes, shorter than the artifact header. {fix}")
    magic, version, comp_id, reserved_a, crc, length, coded_len = ARTIFACT_HEADER.unpack_from(blob)
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"{source} does not start with the artifact magic {ARTIFACT_MAGIC!r} (found {magic!r}). {fix}")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{source} has artifact version {version}; this script reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}.")
    if reserved_a or (coded_len and version < 4):
        raise ArtifactError(f"{source} has non-zero reserved header fields: the header is corrupt. {fix}")
    names = {v: k for k, v in COMPRESSORS.items()}
    if comp_id not in names:
        raise ArtifactError(f"{source} names an unknown compressor id {comp_id}. {fix}")
    if ARTIFACT_HEADER.size + coded_len > len(blob):
        raise ArtifactError(f"{source} is shorter than its header says; it is truncated or corrupt. {fix}")
    coded = blob[len(blob) - coded_len:]
    try:
        payload = decompress(blob[ARTIFACT_HEADER.size:len(blob) - coded_len], names[comp_id])
    except Exception as e:  # noqa: BLE001 - brotli and lzma raise their own error types
        raise ArtifactError(f"{source} could not be decompressed ({type(e).__name__}: {e}); it is truncated or corrupt. {fix}") from None
    if len(payload) != length or zlib.crc32(coded, zlib.crc32(payload)) != crc:
        raise ArtifactError(f"{source} fails its checksum (length {len(payload)} vs {length}); it is corrupt. {fix}")
    (meta_len,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + meta_len])
    table = [(row[0], tuple(row[1:])) for row in meta["table"]]
    n_codes = sum(math.prod(s) for b, s in table if b != 16)
    n_rows = sum(s[0] for b, s in table if b != 16)
    n_tops = sum(b != 16 for b, s in table)
    n_plain = sum(math.prod(s) for b, s in table if b == 16)
    body = payload[4 + meta_len:]
    in_payload = n_codes if version < 4 else 0  # since version 4 the codes are in the coded section
    if len(body) != in_payload + n_rows + 4 * n_tops + 2 * n_plain:
        raise ArtifactError(f"{source}: the tensor table does not match the data size. {fix}")
    codes, body = body[:in_payload], body[in_payload:]
    if version >= 4 and n_tops:
        try:
            codes = rans_decode(coded, [math.prod(s) for b, s in table if b != 16], meta["code_tables"]).tobytes()
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise ArtifactError(f"{source}: its coded codes do not decode ({e}); it is corrupt. {fix}") from None
    scale_codes = body[:n_rows]
    tops = np.frombuffer(body, dtype="<f4", count=n_tops, offset=n_rows)
    plain = byte_unshuffle(body[n_rows + 4 * n_tops:])
    meta["version"] = version
    return meta, table, codes, scale_codes, tops, plain


def stored_codes(codes: bytes, offset: int, shape: tuple, version: int) -> np.ndarray:
    """One tensor's int codes, shaped as the tensor, from parse_artifact's codes (column order since version 3)."""
    q = np.frombuffer(codes, dtype=np.int8, count=math.prod(shape), offset=offset)
    return q.reshape(shape[::-1]).T if version >= 3 else q.reshape(shape)


def load_artifact_state(blob: bytes, model: GPT, source: str = "artifact", parsed: tuple | None = None) -> dict[str, Tensor]:
    """Dequantized state dict for `model` from an artifact, after checking that the table fits it. `parsed`:
    parse_artifact's result for this blob, if the caller has it (decoding the codes takes ~1.5 s)."""
    meta, table, codes, scale_codes, tops, plain = parsed or parse_artifact(blob, source)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    corrected = meta.get("lqer", [])  # LQER: their factors' shapes come from the table, their names from here
    scaled = meta.get("awq", [])  # AWQ_ALPHA: so do their column scales'
    extra_names = [n + suffix for n in corrected for suffix in LQER_SUFFIXES] + [n + AWQ_SUFFIX for n in scaled]
    params += list(zip(extra_names, (s for _, s in table[len(params):])))
    if (len(table) != len(params) or meta["names_digest"] != names_digest((n, list(s)) for n, s in params)
            or [s for _, s in table] != [s for _, s in params]):
        raise ArtifactError(f"{source} was made for a different network shape than the one built from its config.")
    out, c, r, p, k = {}, 0, 0, 0, 0
    for (name, shape), (bits, _) in zip(params, table):
        n = math.prod(shape)
        if bits == 16:
            out[name] = torch.from_numpy(np.frombuffer(plain, dtype="<f2", count=n, offset=2 * p).astype(np.float32)).view(shape)
            p += n
        else:
            t = QuantizedTensor(name, shape, bits, codes=stored_codes(codes, c, shape, meta["version"]),
                                scale_top=float(tops[k]), scale_codes=np.frombuffer(scale_codes, dtype=np.uint8, count=shape[0], offset=r))
            out[name] = t.dequantize()
            c, r, k = c + n, r + shape[0], k + 1
    for name in scaled:  # AWQ_ALPHA: the codes were of W diag(s)
        out[name] = out[name] / out.pop(name + AWQ_SUFFIX)[None, :]
    for name in corrected:  # LQER: W = Q + A B, A stored transposed
        a, b = (out.pop(name + suffix) for suffix in LQER_SUFFIXES)
        out[name] = out[name] + a.T @ b
    return out


def artifact_config(blob: bytes, source: str) -> dict:
    return parse_artifact(blob, source)[0]["config"]


# ================================================================================================
# Source packing: the compressed submission copy of this file (--pack)
# ================================================================================================


def _docstring_owners(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                yield node, first


def strip_docstrings(tree: ast.AST) -> ast.AST:
    for node, _ in list(_docstring_owners(tree)):
        node.body = node.body[1:] or [ast.Pass()]
    return tree


def strip_source(source: str) -> str:
    """Drop docstrings, comments and blank lines; keep every other character as written. Works from
    source positions (ast + tokenize), so the result is the same on every Python version, unlike
    ast.unparse, and a reviewer can reproduce the packed size anywhere."""
    import tokenize
    lines = source.splitlines()
    keep = [True] * len(lines)
    protected = set()  # interior lines of multi-line strings: never touch them
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            protected.update(range(node.lineno, node.end_lineno))  # 0-based indices of lines lineno+1..end
    for owner, doc in _docstring_owners(tree):
        first, last = doc.lineno - 1, doc.end_lineno - 1
        protected.difference_update(range(first, last + 1))
        for i in range(first, last + 1):
            keep[i] = False
        if len(owner.body) == 1:  # the body would be empty: a `pass` takes the docstring's place
            keep[first] = True
            lines[first] = " " * doc.col_offset + "pass"
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col].rstrip()
    out = [line for i, line in enumerate(lines) if keep[i] and (line.strip() or i in protected)]
    return "\n".join(out) + "\n"


# The unpacked source is registered in linecache under a name that is not a file: Triton's @jit reads a
# kernel's source through inspect, which fails for code compiled from a string (and would read the packed
# file itself if the code were compiled under its real name).
PACKED_HEAD = "import brotli,base64,linecache as L\ns=brotli.decompress(base64.b85decode("
PACKED_TAIL = ')).decode()\nf="<train_gpt>"\nL.cache[f]=(len(s),None,s.splitlines(True),f)\nexec(compile(s,f,"exec"))\n'


def pack_source(source: str) -> str:
    """The submission copy of this script: docstrings, comments and blank lines dropped, Brotli-11
    compressed (smaller than LZMA on source text), base85-encoded, wrapped in a five-line self-extracting
    script that runs the same program."""
    minified = strip_source(source)
    encoded = base64.b85encode(compress(minified.encode(), "brotli")).decode()
    return f'{PACKED_HEAD}"{encoded}"{PACKED_TAIL}'


def unpack_source(packed: str) -> str:
    return decompress(base64.b85decode(packed[len(PACKED_HEAD) + 1:].split('"', 1)[0]), "brotli").decode()


def code_sizes() -> tuple[int, int, str]:
    """(bytes of the code that would be submitted, bytes of this readable file, sha256 of the packed copy)."""
    source = SCRIPT_PATH.read_text(encoding="utf-8")
    readable = len(source.encode("utf-8"))
    if source.startswith(PACKED_HEAD):  # already the packed copy
        return readable, readable, hashlib.sha256(source.encode()).hexdigest()
    packed = pack_source(source).encode("utf-8")
    return len(packed), readable, hashlib.sha256(packed).hexdigest()


# ================================================================================================
# Evaluation: exact byte accounting, plain / sliding-window val_bpb, score-first TTT
# ================================================================================================


# Case markers of data/prepare.py --case-ops (capitalized word, ALL-CAPS word): user-defined pieces that stand for
# no byte of the original text; the lower-cased letters after them keep their UTF-8 length.
CASE_MARKERS = ("\ue000", "\ue001")


def build_byte_luts(sp, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token id: UTF-8 bytes of its piece without a leading '▁', whether it starts with '▁', and
    whether it is a boundary (control/unknown/unused: BOS counts 0 bytes and swallows the next space)."""
    base = np.zeros(vocab_size, dtype=np.int64)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)
    for i in range(min(sp.get_piece_size(), vocab_size)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece in CASE_MARKERS:  # 0 bytes and not a boundary: the space of a following '▁word' still counts
            continue
        if piece.startswith("▁"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def count_target_bytes(tokens: np.ndarray, luts) -> np.ndarray:
    """bytes[j] = UTF-8 bytes that target token j stands for (j >= 1; bytes[0] = 0): its piece without
    '▁', plus the space if the piece starts with '▁' and the previous token is not a boundary."""
    base, space, boundary = luts
    tokens = tokens.astype(np.int64)
    out = np.zeros(tokens.size, dtype=np.int64)
    out[1:] = base[tokens[1:]] + (space[tokens[1:]] & ~boundary[tokens[:-1]])
    return out


def load_tokenizer(tokenizer_path: str, vocab_size: int):
    path = Path(tokenizer_path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found. Download it with `python data/prepare.py download`, or set "
                        "TOKENIZER_PATH (or DATA_DIR) to the SentencePiece model the shards were made with.")
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"tokenizer {path} could not be loaded by sentencepiece: {e}") from None
    if sp.get_piece_size() != vocab_size:
        raise DataError(f"tokenizer {path} has {sp.get_piece_size()} pieces but VOCAB_SIZE={vocab_size}. "
                        "Set VOCAB_SIZE to the tokenizer's size, or point TOKENIZER_PATH at the matching model.")
    return sp


class ValidationData:
    def __init__(self, h, device: torch.device):
        self.sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
        self.tokens_np = load_validation_tokens(h)
        self.tokens = torch.from_numpy(self.tokens_np.astype(np.int64))  # CPU; windows are copied per batch
        self.target_bytes = count_target_bytes(self.tokens_np, build_byte_luts(self.sp, h.vocab_size))
        self.cum_bytes = np.concatenate([[0], np.cumsum(self.target_bytes)])  # bytes of targets [a, b) = cum[b] - cum[a]
        self.tokenizer_sha256 = hashlib.sha256(Path(h.tokenizer_path).read_bytes()).hexdigest()
        self.updates = 0  # optimizer steps taken on these tokens so far (TTT counts its own)

    @property
    def n(self) -> int:
        return self.tokens_np.size

    def bytes_of(self, a: int, b: int) -> int:
        return int(self.cum_bytes[b] - self.cum_bytes[a])


@dataclasses.dataclass
class EvalResult:
    loss_sum: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def bpb(self) -> float:
        return self.loss_sum / math.log(2) / self.bytes


def reduce_result(loss_sum: float, tokens: int, nbytes: int, device) -> EvalResult:
    t = torch.tensor([loss_sum, tokens, nbytes], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return EvalResult(t[0].item(), int(t[1].item()), int(t[2].item()))


def rank_share(n: int, rank: int, world: int) -> slice:
    return slice(n * rank // world, n * (rank + 1) // world)


@torch.no_grad()
def score_windows(model: GPT, inputs: Tensor, targets: Tensor, score_from: int) -> Tensor:
    """Per-token NLL (float32) of positions score_from.. of a batch of windows. Only the scored positions
    go through the output head, which for stride-64 windows skips 97% of the logits work."""
    hidden = model.forward_hidden(inputs)[:, score_from:]
    return model.runtime.head_nll(hidden.contiguous(), model.head_weight(), targets[:, score_from:].contiguous(), model.logit_softcap)


def padded_batches(n: int, batch: int):
    """Index ranges of batches of a fixed size (the last padded by repeating its first index), so that
    compiled graphs see one shape; the padding rows are scored and thrown away."""
    for lo in range(0, n, batch):
        idx = list(range(lo, min(lo + batch, n)))
        yield idx, idx + [idx[0]] * (batch - len(idx))


@torch.no_grad()
def evaluate_plain(model: GPT, val: ValidationData, h, device) -> tuple[float, float, int, int]:
    """Non-overlapping windows of EVAL_SEQ_LEN; every target of the covered range is scored once."""
    was_training = model.training
    model.eval()
    L = min(h.eval_seq_len, val.n - 1)
    n_seqs = (val.n - 1) // L
    mine = range(n_seqs)[rank_share(n_seqs, h.rank, h.world_size)]
    batch = max(1, min(h.eval_batch_seqs, h.val_batch_tokens // (L * h.world_size)))
    loss_sum, tokens, nbytes = 0.0, 0, 0
    for real, padded in padded_batches(len(mine), batch):
        starts = torch.tensor([mine[i] * L for i in padded])
        win = val.tokens[starts[:, None] + torch.arange(L + 1)].to(device, non_blocking=True)
        nll = score_windows(model, win[:, :-1], win[:, 1:], 0)[:len(real)]
        loss_sum += nll.double().sum().item()
        for i in real:
            a = mine[i] * L + 1
            tokens, nbytes = tokens + L, nbytes + val.bytes_of(a, a + L)
    model.train(was_training)
    r = reduce_result(loss_sum, tokens, nbytes, device)
    return r.loss, r.bpb, r.tokens, r.bytes


def plan_windows(n_tokens: int, seq_len: int, stride: int) -> np.ndarray:
    """Sliding windows over a stream of n_tokens, as rows (start, a, b): the window reads inputs
    tokens[start : start+Lw] and scores targets a..b-1 (target j = token j predicted from tokens < j).
    The first window scores all its targets, later ones their last `stride`, so every target 1..n-1 is
    scored exactly once, with at least Lw - stride tokens of context; all windows have length Lw."""
    Lw = min(seq_len, n_tokens - 1)
    ends = np.arange(Lw + 1, n_tokens + stride, stride)
    ends = np.minimum(ends, n_tokens)
    ends = ends[np.concatenate([[True], ends[1:] > ends[:-1]])]
    a = np.concatenate([[1], ends[:-1]])
    start = ends - 1 - Lw
    return np.stack([start, a, ends], axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Score-first TTT, read from the TTT_* settings in one place (from_settings). chunk_tokens also groups
    the windows of plain sliding evaluation, which is why TTT with lr 0 reproduces it exactly."""
    chunk_tokens: int  # targets per chunk (TTT_CHUNK_TOKENS)
    seq_len: int  # length of the training sequences cut from a chunk (EVAL_SEQ_LEN)
    lr: float
    epochs: int
    momentum: float
    grad_clip: float
    batch_seqs: int  # sequences per micro-batch per GPU

    @classmethod
    def from_settings(cls, h, **overrides) -> "TTTConfig":
        return dataclasses.replace(cls(h.ttt_chunk_tokens, h.eval_seq_len, h.ttt_lr, h.ttt_epochs, h.ttt_momentum,
                                       h.ttt_grad_clip, h.ttt_batch_seqs), **overrides)

    def lr_at(self, chunk: int, n_chunks: int) -> float:
        """Cosine decay over the chunks: lr for the first, ~0 for the last trained one."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))


def ttt_train_chunk(model: GPT, val: ValidationData, lo: int, hi: int, opt, cfg: TTTConfig, device,
                    rank: int = 0, world_size: int = 1):
    """One chunk's TTT: cfg.epochs SGD steps, each over all sequences made of targets lo..hi-1 (already
    scored). The sequences are split over ranks and gradients summed, so every rank gets the same weights.
    Returns (first, end, steps): the targets first..end-1 that the updates used (all ranks' sequences
    together) and the number of optimizer steps taken."""
    seq = min(cfg.seq_len, hi - lo)
    k = (hi - lo) // seq
    mine = range(k)[rank_share(k, rank, world_size)]
    params = [p for p in model.parameters()]
    total_tokens = k * seq
    steps = 0
    model.train()
    for _ in range(cfg.epochs):
        for p in params:
            p.grad = None
        for lo_i in range(0, len(mine), cfg.batch_seqs):
            ids = list(mine[lo_i:lo_i + cfg.batch_seqs])
            starts = torch.tensor([lo - 1 + i * seq for i in ids])
            win = val.tokens[starts[:, None] + torch.arange(seq + 1)].to(device, non_blocking=True)
            loss = model_loss(model, win[:, :-1], win[:, 1:]) * (len(ids) * seq / total_tokens)
            loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            pieces = torch.split(flat, [g.numel() for g in grads])
            torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(pieces, grads)])
            for p, g in zip(params, grads):
                p.grad = g.view_as(p)
        else:
            for p, g in zip(params, grads):
                p.grad = g
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        steps += 1
        val.updates += 1
    for p in params:
        p.grad = None
    model.eval()
    return lo, lo + k * seq, steps


class ScoreLedger:
    """What one sliding pass did, recorded where it happens and checked against the rules: how often each
    target was scored and in which chunk's phase, which targets updates have trained on (TTT sums gradients
    over ranks, so every rank's weights have seen every rank's sequences), and per chunk the windows scored
    and optimizer steps taken. The ttt:legality and compliance lines are read from it, never typed."""

    def __init__(self, n_tokens: int, n_chunks: int):
        self.scored = np.zeros(n_tokens, dtype=np.uint8)  # scorings of each target on this rank
        self.scored_in = np.full(n_tokens, -1, dtype=np.int32)  # chunk phase in which it was scored
        self.trained = np.zeros(n_tokens, dtype=bool)
        self.windows = np.zeros(n_chunks, dtype=np.int64)
        self.updates = np.zeros(n_chunks, dtype=np.int64)
        self.trained_ranges: list[tuple[int, int, int]] = []  # (chunk, first target, end target)

    def score(self, chunk: int, a: int, b: int):
        """Record that targets a..b-1 are about to be scored; stops the run if an update has used any."""
        check_score_first(self.trained, a, b)
        self.scored[a:b] += 1
        self.scored_in[a:b] = chunk
        self.windows[chunk] += 1

    def score_windows(self, chunk: int, rows: np.ndarray):
        """score() for windows given as plan rows (start, a, b). Windows that follow each other (a == previous
        b, as in a plan) cover one range exactly once: recorded in one step, which keeps this off the
        evaluation's clock; any other batch is recorded window by window."""
        if len(rows) > 1 and (rows[1:, 1] == rows[:-1, 2]).all():
            self.score(chunk, int(rows[0, 1]), int(rows[-1, 2]))
            self.windows[chunk] += len(rows) - 1
        else:
            for _, a, b in rows.tolist():
                self.score(chunk, a, b)

    def train(self, chunk: int, first: int, end: int, steps: int):
        self.trained[first:end] = True
        self.updates[chunk] += steps
        self.trained_ranges.append((chunk, first, end))

    def summary(self, device) -> dict:
        """The legality counts of the whole pass, summed over ranks. Scorings are capped at 2 per rank before
        the sum, so that uint8 holds any count that matters (0, 1 or "more than once")."""
        scored = torch.from_numpy(np.minimum(self.scored, 2))
        scored_in = torch.from_numpy(self.scored_in)
        windows = torch.from_numpy(self.windows)
        if dist.is_available() and dist.is_initialized():
            scored, scored_in, windows = scored.to(device), scored_in.to(device), windows.to(device)
            dist.all_reduce(scored)
            dist.all_reduce(scored_in, op=dist.ReduceOp.MAX)
            dist.all_reduce(windows)
        scored, scored_in, windows = scored.cpu().numpy(), scored_in.cpu().numpy(), windows.cpu().numpy()
        # an update whose targets were not all scored in an earlier (or the same, before it) chunk phase
        early = sum(int(self.updates[c]) for c, first, end in self.trained_ranges
                    if (scored[first:end] == 0).any() or (scored_in[first:end] > c).any())
        if early:
            raise ScoreFirstViolation(f"score-first rule broken: {early} TTT updates trained on targets that had "
                                      "not been scored before them. The run stops without a result.")
        return dict(score_first=1, chunks=int((windows > 0).sum()), trained_chunks=int((self.updates > 0).sum()),
                    updates_before_score=early, tokens_scored=int(scored.astype(np.int64).sum()),
                    each_token_once=int(each_token_once(scored)))


class EvalProgress:
    """A progress line for a long evaluation pass, about every 10 % of its chunks or every 30 s: targets
    scored, running val_bpb and an ETA. The figures are rank 0's share of the windows (the line says so):
    an exact figure would need a collective per line, and the final stage line is exact anyway."""

    def __init__(self, name: str, total: int, every_frac: float = 0.1, every_s: float = 30.0):
        self.name, self.total, self.every_frac, self.every_s = name, total, every_frac, every_s
        self.t0 = self.last = time.perf_counter()
        self.next_frac = every_frac

    def update(self, done: int, tokens: int, loss_sum: float, nbytes: int):
        now = time.perf_counter()
        if done >= self.total or (done / self.total < self.next_frac and now - self.last < self.every_s):
            return  # the last chunk is followed by the stage's own line
        while self.next_frac <= done / self.total:
            self.next_frac += self.every_frac
        self.last, elapsed = now, now - self.t0
        bpb = loss_sum / math.log(2) / max(nbytes, 1)
        log(f"eval_progress: {self.name} chunk:{done}/{self.total} rank0_tokens:{tokens} rank0_running_bpb:{bpb:.4f} "
            f"elapsed:{elapsed:.0f}s eta:{elapsed / done * (self.total - done):.0f}s")


def evaluate_sliding(model: GPT, val: ValidationData, h, device, ttt: TTTConfig | None = None,
                     observer=None) -> tuple[EvalResult, dict]:
    """Sliding-window val_bpb, optionally with score-first test-time training.

    The targets are cut into chunks of TTT_CHUNK_TOKENS; a window belongs to the chunk of its first
    scored target. Chunk by chunk: score its windows under no_grad (split over ranks), then, with TTT and
    unless it is the last chunk, train on the chunk's targets. So a token is only ever scored by weights
    that have never been trained on it, and each token is scored exactly once. Plain sliding evaluation is
    the same loop without the training, which is why TTT with lr 0 reproduces it exactly.
    `observer(event, a, b)` (tests) sees every ("score", a, b) and ("train", a, b) in order.
    """
    plan = plan_windows(val.n, h.eval_seq_len, h.eval_stride)
    assert plan[0, 1] == 1 and plan[-1, 2] == val.n and (plan[1:, 1] == plan[:-1, 2]).all()
    Lw = int(plan[0, 2] - plan[0, 1]) if plan.shape[0] else 0
    C = (ttt or TTTConfig.from_settings(h)).chunk_tokens
    chunk_of = (plan[:, 1] - 1) // C
    n_chunks = int(chunk_of[-1]) + 1
    model.eval()
    opt = None
    if ttt is not None:
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(model.parameters(), lr=ttt.lr, momentum=ttt.momentum)
    loss_sum, tokens, nbytes = 0.0, 0, 0
    ledger = ScoreLedger(val.n, n_chunks)
    progress = EvalProgress("ttt" if ttt is not None else "sliding", n_chunks)
    bounds = np.searchsorted(chunk_of, np.arange(n_chunks + 1))
    for c in range(n_chunks):
        rows = plan[bounds[c]:bounds[c + 1]]
        mine = rows[rank_share(len(rows), h.rank, h.world_size)]
        first = mine[:1] if len(mine) and mine[0, 1] == 1 else mine[:0]  # the full-context first window
        rest = mine[len(first):]
        with torch.no_grad():
            for group, score_from, batch in ((first, 0, 1), (rest, max(Lw - h.eval_stride, 0), h.eval_batch_seqs)):
                for real, padded in padded_batches(len(group), batch):
                    sel = group[padded]
                    ledger.score_windows(c, sel[:len(real)])  # before the weights see them
                    for start, a, b in sel[:len(real)].tolist():
                        tokens, nbytes = tokens + (b - a), nbytes + val.bytes_of(a, b)
                        if observer is not None:
                            observer("score", a, b)
                    win = val.tokens[torch.from_numpy(sel[:, 0])[:, None] + torch.arange(Lw + 1)].to(device, non_blocking=True)
                    nll = score_windows(model, win[:, :-1], win[:, 1:], score_from)[:len(real)].double()
                    # target of output position p is start + score_from + p + 1; keep those in [a, b)
                    pos = torch.arange(nll.size(1), device=device)[None, :] + score_from + 1
                    sel_t = torch.from_numpy(sel[:len(real)]).to(device)
                    keep = pos + sel_t[:, :1] >= sel_t[:, 1:2]
                    loss_sum += (nll * keep).sum().item()
        if ttt is not None and c < n_chunks - 1:
            lo, hi = c * C + 1, min((c + 1) * C + 1, val.n)
            for g in opt.param_groups:
                g["lr"] = ttt.lr_at(c, n_chunks)
            if observer is not None:
                observer("train", lo, hi)
            ledger.train(c, *ttt_train_chunk(model, val, lo, hi, opt, ttt, device, h.rank, h.world_size))
        progress.update(c + 1, tokens, loss_sum, nbytes)
    result = reduce_result(loss_sum, tokens, nbytes, device)
    if ttt is not None:
        for p in model.parameters():
            p.grad = None
    return result, ledger.summary(device)


def ttt_compile_warmup(model: GPT, cfg: TTTConfig, device, world_size: int = 1):
    """Compile the TTT training graphs on random tokens (never on validation data) and leave the
    weights untouched: forward and backward only, no optimizer step."""
    seq = min(cfg.seq_len, cfg.chunk_tokens)
    g = torch.Generator().manual_seed(0)
    rows = max(1, min(cfg.batch_seqs, math.ceil(cfg.chunk_tokens // seq / world_size)))
    fake = torch.randint(0, model.tok_emb.num_embeddings, (rows, seq + 1), generator=g).to(device)
    model.train()
    model_loss(model, fake[:, :-1], fake[:, 1:]).backward()
    for p in model.parameters():
        p.grad = None
    model.eval()


# ------------------------------------------------------------------------------------------------
# Document-level TTT (TTT_MODE=lora): per-document LoRA adapters, score-first within each document
# ------------------------------------------------------------------------------------------------
# Global TTT moves one set of weights through the whole stream, so what it learns from a document is
# mostly washed out by the next ones. Here every document gets its own small adapters, starting from zero
# effect: its first chunk is scored by the shipped model, then the adapters train on that chunk, then the
# next chunk is scored, and so on; the adapters are dropped at the document's end. Documents never see each
# other (attention and adapters stay inside one), and many documents run side by side as one batch.

LORA_TARGETS = {"attn_q": "attn.c_q", "attn_k": "attn.c_k", "attn_v": "attn.c_v", "attn_out": "attn.proj",
                "mlp_in": "mlp.fc", "mlp_out": "mlp.proj"}  # block submodules; "head" is the output head


@dataclasses.dataclass(frozen=True)
class DocTTTConfig:
    rank: int
    lr: float
    chunk: int  # targets per document chunk (TTT_LORA_CHUNK)
    docs: int  # documents per batch per GPU (TTT_LORA_DOCS)
    targets: tuple[str, ...]
    seq_len: int  # the longest context a chunk is scored with (EVAL_SEQ_LEN)
    context: int  # tokens of the stream before the document that may be read too (TTT_LORA_CONTEXT)

    @classmethod
    def from_settings(cls, h) -> "DocTTTConfig":
        targets = tuple(t.strip() for t in h.ttt_lora_targets.split(",") if t.strip())
        unknown = [t for t in targets if t not in LORA_TARGETS and t != "head"]
        if unknown or not targets:
            raise ConfigError(f"TTT_LORA_TARGETS={h.ttt_lora_targets!r}: unknown {unknown or 'empty list'}; use a comma list of "
                              f"{', '.join([*LORA_TARGETS, 'head'])}.")
        if h.ttt_lora_chunk > h.eval_seq_len:
            raise ConfigError(f"TTT_LORA_CHUNK={h.ttt_lora_chunk} is longer than EVAL_SEQ_LEN={h.eval_seq_len}, the context "
                              "a chunk is scored with; lower TTT_LORA_CHUNK.")
        return cls(h.ttt_lora_rank, h.ttt_lora_lr, h.ttt_lora_chunk, h.ttt_lora_docs, targets, h.eval_seq_len,
                   h.ttt_lora_context)


def document_spans(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Rows (start, end), one per document: inputs tokens[start:end] predict targets start+1..end, so a
    document's last target is the next document's BOS (where it ends). Documents start at each BOS (and at
    0); their targets together are 1..n-1, each exactly once."""
    starts = np.flatnonzero(tokens[:-1] == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [tokens.size - 1]])
    return np.stack([starts, ends], axis=1).astype(np.int64)


class DocumentAdapters:
    """LoRA adapters for a batch of documents, one set per document on each target layer, trained with Adam.
    Every document starts from the same set: B zero (so it changes no output), A the same random matrix
    (fixed seed), so a document's result does not depend on the batch it shares. use(rows) points the
    layers at the sets of some of the documents; remove() takes them off again."""

    def __init__(self, model: GPT, cfg: DocTTTConfig, n_docs: int, device):
        g = torch.Generator(device="cpu").manual_seed(0)
        pairs = []

        def pair(n_in: int, n_out: int):
            a = torch.randn(cfg.rank, n_in, generator=g) / math.sqrt(n_in)
            a = a.to(device)[None].repeat(n_docs, 1, 1).requires_grad_(True)
            b = torch.zeros(n_docs, n_out, cfg.rank, device=device, requires_grad=True)
            pairs.append((a, b))
            return a, b
        modules = [block.get_submodule(LORA_TARGETS[t]) for block in model.blocks for t in cfg.targets if t != "head"]
        self.layers = [(m, pair(m.in_features, m.out_features)) for m in modules]
        weight = model.head_weight()
        self.head = pair(weight.size(1), weight.size(0)) if "head" in cfg.targets else None
        self.opt = torch.optim.Adam([t for ab in pairs for t in ab], lr=cfg.lr)
        self.head_rows = None

    def use(self, rows: Tensor):
        for module, (a, b) in self.layers:
            module.lora = (a[rows], b[rows])
        self.head_rows = (self.head[0][rows], self.head[1][rows]) if self.head is not None else None

    def remove(self):
        for module, _ in self.layers:
            module.lora = None
        self.head_rows = None


def adapted_nll(model: GPT, inputs: Tensor, targets: Tensor, positions: Tensor, adapters: DocumentAdapters) -> Tensor:
    """Per-target NLL (float32) at `positions` (one row of positions per sequence) with the adapters in use."""
    hidden = model.forward_hidden(inputs)
    hidden = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.size(-1)))
    delta = lora_delta(hidden, *adapters.head_rows) if adapters.head_rows is not None else None
    return head_nll(hidden, model.head_weight(), targets.gather(1, positions), model.logit_softcap, delta)


def document_batches(spans: np.ndarray, doc_ids: np.ndarray, docs: int, chunk: int, phase: int) -> tuple[list, int]:
    """The documents doc_ids, longest first, in batches of `docs` (like lengths together, so little padding),
    each with the first chunk-phase number it uses (phases are numbered from `phase` on, for the score
    ledger); and the next free phase number."""
    lengths = spans[:, 1] - spans[:, 0]
    order = doc_ids[np.argsort(-lengths[doc_ids], kind="stable")]
    out = []
    for lo in range(0, len(order), docs):
        idx = order[lo:lo + docs]
        out.append((idx, phase))
        phase += -(-int(lengths[idx].max()) // chunk)
    return out, phase


def evaluate_document_ttt(model: GPT, val: ValidationData, h, device, cfg: DocTTTConfig,
                          global_cfg: TTTConfig | None = None, observer=None) -> tuple[EvalResult, dict]:
    """val_bpb with per-document score-first LoRA TTT. Batches of documents are dealt to ranks in turn.
    For chunk c of every document of a batch: score the chunk's targets under no_grad (context: the tokens
    before them, at most EVAL_SEQ_LEN, from the document and the TTT_LORA_CONTEXT stream tokens before it),
    then, for documents with a chunk after it, one Adam step of their adapters on the chunk's loss. A set of
    adapters only ever scores its own document, so the context it trained on never reaches a score.
    With global_cfg (TTT_MODE=both) documents are grouped by the global chunk their first target falls in;
    after a group is scored, the base weights take that chunk's global TTT step (all ranks together), as in
    evaluate_sliding. Without it the base weights never change."""
    spans = document_spans(val.tokens_np, val.sp.bos_id())
    group_of = spans[:, 0] // global_cfg.chunk_tokens if global_cfg is not None else np.zeros(len(spans), np.int64)
    groups = np.split(np.arange(len(spans)), np.flatnonzero(np.diff(group_of)) + 1)
    plans, phase = [], 0
    for group in groups:  # phases: each group's document chunks, then its global step
        batches, phase = document_batches(spans, group, cfg.docs, cfg.chunk, phase)
        plans.append((group, batches, phase))
        phase += 1
    ledger = ScoreLedger(val.n, phase)
    progress = EvalProgress("doc_ttt", sum(len(b[h.rank::h.world_size]) for _, b, _ in plans))
    runtime = model.runtime  # the adapters change per batch and shapes per chunk: the eager functions run
    eager = dataclasses.replace(runtime, block=run_block, merge_skip=merge_skip, sum_tensors=sum_tensors)
    trainable = [p.requires_grad for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=global_cfg.lr, momentum=global_cfg.momentum) if global_cfg else None
    totals, done = [0.0, 0, 0], 0  # loss sum, tokens, bytes
    try:
        for g, (group, batches, global_phase) in enumerate(plans):
            model.use_runtime(eager)
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            for idx, phase0 in batches[h.rank::h.world_size]:
                adapt_documents(model, val, spans[idx], phase0, cfg, ledger, totals, device, observer)
                done += 1
                progress.update(done, totals[1], totals[0], totals[2])
            if global_cfg is not None and g < len(plans) - 1:
                lo, hi = int(spans[group[0], 0]) + 1, int(spans[group[-1], 1]) + 1
                model.use_runtime(runtime)
                for p in model.parameters():
                    p.requires_grad_(True)
                for pg in opt.param_groups:
                    pg["lr"] = global_cfg.lr_at(g, len(plans))
                if observer is not None:
                    observer("train", lo, hi)
                ledger.train(global_phase, *ttt_train_chunk(model, val, lo, hi, opt, global_cfg, device, h.rank, h.world_size))
    finally:
        for module in model.modules():
            if isinstance(module, CastedLinear):
                module.lora = None
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
            p.grad = None
        model.use_runtime(runtime)
    return reduce_result(*totals, device), ledger.summary(device)


def adapt_documents(model: GPT, val: ValidationData, spans: np.ndarray, phase0: int, cfg: DocTTTConfig,
                    ledger: ScoreLedger, totals: list, device, observer=None):
    """One batch of documents (rows of spans), chunk by chunk: score, then one adapter step (see
    evaluate_document_ttt). Adds the loss sum, targets and bytes scored to totals."""
    start, length = spans[:, 0], spans[:, 1] - spans[:, 0]
    adapters = DocumentAdapters(model, cfg, len(spans), device)
    C = cfg.chunk
    for c in range(-(-int(length.max()) // C)):
        phase, lo = phase0 + c, c * C
        rows = np.flatnonzero(length > lo)  # documents that have a chunk c
        end = start[rows] + np.minimum(lo + C, length[rows])  # stream position after the chunk's last input
        first = start[rows] + lo  # stream position of the chunk's first input (its target is first + 1)
        w0 = np.maximum.reduce([np.zeros_like(end), start[rows] - cfg.context, end - cfg.seq_len])
        T = int((end - w0).max())
        inputs = torch.zeros(len(rows), T, dtype=torch.int64)
        targets = torch.zeros(len(rows), T, dtype=torch.int64)
        for k, (w, e) in enumerate(zip(w0.tolist(), end.tolist())):
            inputs[k, :e - w] = val.tokens[w:e]
            targets[k, :e - w] = val.tokens[w + 1:e + 1]
        positions = torch.from_numpy(first - w0)[:, None] + torch.arange(C)[None, :]
        valid = torch.arange(C)[None, :] < torch.from_numpy(end - first)[:, None]
        positions = torch.where(valid, positions, torch.zeros_like(positions))
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        positions, valid = positions.to(device), valid.to(device)
        for a, b in zip((first + 1).tolist(), (end + 1).tolist()):  # recorded before the adapters see them
            ledger.score(phase, a, b)
            totals[1], totals[2] = totals[1] + (b - a), totals[2] + val.bytes_of(a, b)
            if observer is not None:
                observer("score", a, b)
        adapters.use(torch.from_numpy(rows).to(device))
        with torch.no_grad():
            nll = adapted_nll(model, inputs, targets, positions, adapters)
        totals[0] += (nll.double() * valid).sum().item()
        learn = np.flatnonzero(length[rows] > lo + C)  # of these, the documents with a chunk after this one
        if learn.size:
            sel = torch.from_numpy(learn).to(device)
            adapters.use(torch.from_numpy(rows[learn]).to(device))
            nll = adapted_nll(model, inputs[sel], targets[sel], positions[sel], adapters)
            mask = valid[sel].float()
            loss = ((nll * mask).sum(1) / mask.sum(1)).sum()  # each document's mean: their adapters are separate
            adapters.opt.zero_grad(set_to_none=True)
            loss.backward()
            adapters.opt.step()
            val.updates += 1
            for j, (a, b) in enumerate(zip((first[learn] + 1).tolist(), (end[learn] + 1).tolist())):
                ledger.train(phase, a, b, 1 if j == 0 else 0)
                if observer is not None:
                    observer("train", a, b)
        adapters.remove()


def evaluate_ttt(model: GPT, val: ValidationData, hh, device) -> tuple[EvalResult, dict]:
    """The TTT pass TTT_MODE names, compile warm-up included (global TTT, on random tokens only)."""
    if hh.ttt_mode == "lora":
        return evaluate_document_ttt(model, val, hh, device, DocTTTConfig.from_settings(hh))
    cfg = TTTConfig.from_settings(hh)
    if compile_requested(hh, device):
        t0 = time.perf_counter()
        ttt_compile_warmup(model, cfg, device, hh.world_size)
        log(f"ttt:compile_warmup on random tokens {1000 * (time.perf_counter() - t0):.0f}ms")
    if hh.ttt_mode == "both":
        return evaluate_document_ttt(model, val, hh, device, DocTTTConfig.from_settings(hh), global_cfg=cfg)
    return evaluate_sliding(model, val, hh, device, ttt=cfg)


# ================================================================================================
# Main: setup, train, quantize, write the artifact, reload it, evaluate
# ================================================================================================


def setup_device(h) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", h.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if h.distributed and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def claim_run_id(h):
    """Settle the run's id on rank 0 and hand it to every rank. Runs never overwrite each other: a default id
    (date, time, seed) that is taken gets a suffix _2, _3, ...; a RUN_ID set by hand whose log or run folder
    exists is refused. The claim creates the (empty) log and, for training, the run folder."""
    choice = [None, None]  # the id, or why there is none
    if h.is_main:
        try:
            choice[0] = claim_free_run_id(h)
        except UserError as e:
            choice[1] = str(e)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    h.set_run_id(choice[0])


def claim_free_run_id(h) -> str:
    base = h.run_id
    for n in range(1, 1000):
        h.set_run_id(base if n == 1 else f"{base}_{n}")
        log_path, run_dir = Path(h.logfile), Path(h.run_dir)
        taken = [p for p in (log_path, None if h.eval_only else run_dir) if p is not None and p.exists()]
        if not taken:
            try:  # exclusive creation: of two runs starting together, one gets the id
                if not h.eval_only:
                    run_dir.mkdir(parents=True)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                open(log_path, "x").close()
                return h.run_id
            except FileExistsError:
                taken = [log_path]
        if h.run_id_given:
            raise ConfigError(f"RUN_ID={base} is already used: {' and '.join(map(str, taken))} exist(s), from an earlier run. "
                              "Runs never overwrite each other: set another RUN_ID, or move those aside.")
    raise ConfigError(f"RUN_ID {base} and its suffixes _2.._999 are all used; set RUN_ID.")


def log_header(h, device: torch.device, runtime: Runtime) -> int:
    """Log what code ran, where, and with which settings; returns the submitted code size in bytes."""
    sha, nbytes = script_identity()
    packed_bytes, readable_bytes, packed_sha = code_sizes()
    log_typo_warnings(h.typo_warnings)  # first, where they are seen; repeated at the end of the run
    log(f"script: {SCRIPT_PATH.name} sha256:{sha} bytes:{nbytes} packed_sha256:{packed_sha} packed_bytes:{packed_bytes}")
    if h.is_main:  # git runs once, on the rank that writes the log
        log(code_identity())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python"  # torchrun sets it on every worker
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    log(f"env: python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} device:{gpu} "
        f"gpus:{torch.cuda.device_count()} world_size:{h.world_size} host:{platform.node()} launcher:{launcher} backend:{backend}")
    log(runtime.describe())
    log(f"run: id:{h.run_id} log:{h.logfile} artifact:{h.artifact_path} model:{'none' if h.eval_only else h.model_path}")
    log(f"preset: {h.preset} ({h.preset_reason}{'; data: bundled sample ' + h.data_dir if h.sample_data else ''})")
    log("settings:")
    for line in h.as_lines():
        log(line)
    # What was set by hand, so a record README can give the exact command that reproduces the run.
    log("env_set: " + " ".join(f"{n}={v}" for n, v in sorted(h.explicit_values.items())))
    log(f"derived: grad_accum_steps:{h.grad_accum_steps} micro_batch_seqs:{h.micro_batch_seqs} "
        f"tokens_per_micro_batch:{h.micro_batch_seqs * h.train_seq_len}")
    return packed_bytes


def log_typo_warnings(warnings: list[str]):
    """Environment variables that look like misspelt settings (and so change nothing)."""
    for w in warnings:
        log(f"warning: {w}")


def save_float_weights(model: GPT, path: str):
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def over_limit_path(path: Path, over: int) -> Path:
    return path.with_name(f"{path.stem}.OVER_LIMIT_by_{over}_bytes{path.suffix}")


def build_artifact(model: GPT, hessians: dict, h, code_bytes: int) -> tuple[bytes, float]:
    """Quantize and pack; with ARTIFACT_FIT, coarsen the matrix grid until code + model fit the limit."""
    t0 = time.perf_counter()
    clip = h.matrix_clip_sigmas
    tensors, notes = quantize_model(model, hessians, h, clip)
    n_quantized = sum(t.bits != 16 for t in tensors)
    log(f"gptq:quantized {n_quantized} tensors in {time.perf_counter() - t0:.1f}s" + (f" ({'; '.join(notes)})" if notes else ""))
    blob = serialize_artifact(tensors, h.model_config(), h.compressor, h.eval_config())
    n_matrix = sum(math.prod(t.shape) for t in tensors if t.bits == h.matrix_bits and t.name != "tok_emb.weight")
    for attempt in range(6):
        if not h.artifact_fit or within_byte_limit(code_bytes, len(blob)) or n_matrix == 0:
            break
        over = code_bytes + len(blob) - ARTIFACT_LIMIT_BYTES
        # A coarser grid by a factor f saves about log2(f) bits per matrix weight; aim 20% past the target.
        clip *= 2 ** (1.2 * 8 * over / n_matrix)
        log(f"artifact_fit: {over} bytes over the limit; retrying with MATRIX_CLIP_SIGMAS={clip:.4f} (attempt {attempt + 1})")
        tensors, _ = quantize_model(model, hessians, h, clip)
        blob = serialize_artifact(tensors, h.model_config(), h.compressor, h.eval_config())
    return blob, clip


def write_artifact(blob: bytes, h, code_bytes: int, readable_bytes: int) -> Path:
    total = code_bytes + len(blob)
    log(f"Serialized model quantized+{h.compressor}: {len(blob)} bytes")
    log(f"Code size: {code_bytes} bytes (readable: {readable_bytes} bytes)")
    log(f"Total submission size quantized+{h.compressor}: {total} bytes")
    path = Path(h.artifact_path)
    margin = ARTIFACT_LIMIT_BYTES - total
    fits = within_byte_limit(code_bytes, len(blob))
    if not fits:
        path = over_limit_path(path, -margin)
        log(f"warning: the submission is {-margin} bytes over the {ARTIFACT_LIMIT_BYTES:,}-byte limit; the artifact is "
            f"written as {path} (ARTIFACT_PATH is left untouched) and still evaluated. Set ARTIFACT_FIT=1, raise "
            "MATRIX_CLIP_SIGMAS, or shrink the model to fit.")
    if h.is_main:
        atomic_write_bytes(path, blob)
    log(f"artifact: path={path} fits:{int(fits)} limit:{ARTIFACT_LIMIT_BYTES} margin:{margin}")
    return path


def timed(device, fn):
    """(fn(), milliseconds), with the device synchronized on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, 1000 * (time.perf_counter() - t0)


def log_stage(name: str, loss: float, bpb: float, ms: float, tokens: int, nbytes: int):
    log(f"{name} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{ms:.0f}ms")
    log(f"{name} val_tokens:{tokens} val_bytes:{nbytes}")


def resolve_eval_settings(h, stored: dict, source: str) -> tuple[dict, dict]:
    """The EVAL_* / TTT_* values to score an artifact with, and where each came from: set in the environment
    ("env") wins; else the value stored in the artifact by the run that made it ("artifact"); else, for an
    artifact made before they were stored, this run's default ("default")."""
    values, sources = {}, {}
    for name, value in h.eval_config().items():
        if name in h.explicit:
            values[name], sources[name] = value, "env"
        elif name in stored:
            setting = SETTINGS_BY_NAME[name]
            try:
                values[name] = setting.kind(stored[name])
                _check_value(setting, values[name])
            except (TypeError, ValueError, ConfigError):
                raise ArtifactError(f"{source} stores {name}={stored[name]!r}, which is not a valid value ({setting.help}). "
                                    f"Set {name} explicitly to override it.") from None
            sources[name] = "artifact"
        else:
            values[name], sources[name] = value, "default"
    if values["EVAL_STRIDE"] > values["EVAL_SEQ_LEN"]:
        raise ConfigError(f"EVAL_STRIDE={values['EVAL_STRIDE']} ({sources['EVAL_STRIDE']}) must not exceed "
                          f"EVAL_SEQ_LEN={values['EVAL_SEQ_LEN']} ({sources['EVAL_SEQ_LEN']}); set both explicitly.")
    return values, sources


def load_eval_model(path: Path, h, device) -> tuple[GPT, object]:
    """A fresh model built from the artifact alone: config, tensor table and weights all come from it."""
    if not path.is_file():
        raise ArtifactError(f"artifact {path} not found. Train first, or set ARTIFACT_PATH to the shipped artifact.")
    blob = path.read_bytes()
    parsed = parse_artifact(blob, str(path))
    meta = parsed[0]
    # Model switches added after the artifact format: an artifact made before them was made without them.
    config = {"ATTN_GATE": False, "SMEAR_GATE": False, "TWO_LANE_START": -1, "DOC_MASK": False, **meta["config"]}
    differs = [k for k, v in config.items() if k in h.explicit and getattr(h, k.lower()) != v]
    if differs:
        log(f"warning: the artifact's own {', '.join(differs)} override the environment's for evaluation")
    eval_values, sources = resolve_eval_settings(h, meta.get("eval", {}), str(path))
    log("eval_settings: " + " ".join(f"{n}={v}({sources[n]})" for n, v in eval_values.items()))
    hh = h.replace(**config, **eval_values)
    model = GPT(hh).to(device)
    model.load_state_dict(load_artifact_state(blob, model, str(path), parsed), strict=True)
    model.use_runtime(build_runtime(hh, device))
    model.looping = hh.num_loops > 0
    return model, hh


def evaluate_artifact(path: Path, h, device, val: ValidationData) -> dict:
    """Score the artifact at `path`; returns what the evaluation measured, for the compliance line."""
    t_start = time.perf_counter()
    facts = dict(score_first="na", each_token_once="na")
    passes = []  # legality of each sliding pass (plain sliding, TTT)
    model, hh = load_eval_model(path, h, device)
    (loss, bpb, n_tok, n_bytes), ms = timed(device, lambda: evaluate_plain(model, val, hh, device))
    log_stage("quantized", loss, bpb, ms, n_tok, n_bytes)
    if hh.sliding_window_enabled:
        (r, legal), ms = timed(device, lambda: evaluate_sliding(model, val, hh, device))
        passes.append(legal)
        log_stage("quantized_sliding_window", r.loss, r.bpb, ms, r.tokens, r.bytes)
    if hh.ttt_enabled:
        t0 = time.perf_counter()
        (r, legal), _ = timed(device, lambda: evaluate_ttt(model, val, hh, device))
        passes.append(legal)
        facts["score_first"] = legal["score_first"]
        log("ttt:legality " + " ".join(f"{k}:{legal[k]}" for k in ("score_first", "chunks", "trained_chunks",
                                                                   "updates_before_score", "tokens_scored", "each_token_once")))
        log_stage("quantized_ttt", r.loss, r.bpb, 1000 * (time.perf_counter() - t0), r.tokens, r.bytes)  # incl. compile warm-up
    if passes:
        facts["each_token_once"] = int(all(p["each_token_once"] for p in passes))
    total_ms = 1000 * (time.perf_counter() - t_start)
    log(f"eval_total: time:{total_ms:.0f}ms limit:{EVAL_LIMIT_MS}ms")
    if not within_eval_limit(total_ms):
        log(f"warning: evaluation took {total_ms / 1000:.0f}s on this hardware, over the challenge's {EVAL_LIMIT_MS // 1000}s limit")
    facts["eval_within_limit"] = int(within_eval_limit(total_ms))
    return facts


def run(h, device: torch.device):
    runtime = build_runtime(h, device)  # first, so that the log names the attention backend near its top
    code_bytes = log_header(h, device, runtime)
    _, readable_bytes = script_identity()
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    if not Path(h.data_dir).is_dir() and not (h.explicit & {"TRAIN_FILES", "VAL_FILES", "TOKENIZER_PATH"}):
        get = "Download the data with `python data/prepare.py download` or make shards with `python data/prepare.py text ...`"
        if "DATA_DIR" in h.explicit:
            raise DataError(f"DATA_DIR={h.data_dir} does not exist. {get}, and point DATA_DIR at the folder that holds "
                            "datasets/ and tokenizers/" + ("." if h.eval_only else ", or unset DATA_DIR to use the bundled sample."))
        searched = "".join(f" nor the bundled sample in {d}" for d in h.sample_searched)
        raise DataError(f"no data found: neither {Path(h.data_dir).resolve()} (./data/ of the current folder, where the "
                        f"challenge shards are looked for by default){searched} exists. {get}, then set DATA_DIR to the "
                        "folder that holds datasets/ and tokenizers/ (or run from the folder that holds data/).")
    val = ValidationData(h, device)
    data_files = f"val_files:{h.val_files} tokenizer:{h.tokenizer_path}"
    if h.eval_only:
        log(f"data: val_tokens:{val.n} tokenizer_sha256:{val.tokenizer_sha256} {data_files} (EVAL_ONLY: training data not read)")
        path = Path(h.artifact_path)
        facts = evaluate_artifact(path, h, device, val)
        log_compliance(facts, None, val.updates, code_bytes, path)
        log_typo_warnings(h.typo_warnings)  # again at the end: the first ones are far up by now
        log("run_complete")
        return
    model = GPT(h).to(device)
    model.use_runtime(runtime)
    trainer = Trainer(h, model, device)
    windows = trainer.loader.windows
    log(f"data: train_shards:{len(windows.files)} train_tokens:{int(windows.counts.sum())} val_tokens:{val.n} "
        f"tokenizer_sha256:{val.tokenizer_sha256} {data_files}")
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    result, ema = trainer.train(val)
    ema.copy_to(model)
    log("ema:applying EMA weights")
    # GPTQ calibration reads training data, so it runs inside the training budget, right after training.
    (hessians, calib_ms) = timed(device, lambda: collect_hessians(model, result.loader, h, device))
    train_facts = dict(calibration_data=calibration_source(result.loader.windows.files, h.train_files, h.val_files))
    result.loader.close()
    del trainer, ema, result.loader
    log(f"gptq:calibration batches:{h.gptq_calibration_batches} time:{calib_ms:.0f}ms")
    total = result.train_time_ms + calib_ms
    log(f"train_budget: train_time:{result.train_time_ms:.0f}ms calibration:{calib_ms:.0f}ms total:{total:.0f}ms "
        f"limit:{1000 * h.max_wallclock_seconds:.0f}ms")
    train_facts["train_within_budget"] = int(train_within_budget(result.train_time_ms, calib_ms, h.max_wallclock_seconds))
    if not train_facts["train_within_budget"]:
        log(f"warning: training plus calibration took {total / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS or the challenge's "
            f"{TRAIN_LIMIT_MS // 1000}s; raise GPTQ_RESERVE_SECONDS")
    val_updates_before_quant = val.updates
    if h.is_main:
        save_float_weights(model, h.model_path)
    (loss, bpb, n_tok, n_bytes), ms = timed(device, lambda: evaluate_plain(model, val, h, device))
    log_stage("pre-quantization post-ema", loss, bpb, ms, n_tok, n_bytes)
    if h.is_main:
        blob, clip = build_artifact(model, hessians, h, code_bytes)
        path = write_artifact(blob, h, code_bytes, readable_bytes)
        paths = [str(path)]
    else:
        paths = [None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(paths, src=0)
    del model, hessians
    if device.type == "cuda":
        torch.cuda.empty_cache()
    facts = evaluate_artifact(Path(paths[0]), h, device, val)
    log_compliance(facts, train_facts, val_updates_before_quant, code_bytes, Path(paths[0]))
    if h.is_main:
        publish_run_files(h, Path(paths[0]))
    log_typo_warnings(h.typo_warnings)  # again at the end: the first ones are far up by now
    log("run_complete")


def calibration_source(files: list[Path], train_glob: str, val_glob: str) -> str:
    """What GPTQ calibration read, from the files of the loader it drew its batches from: "train" when all
    are training shards and none is a validation shard."""
    read = {Path(f).resolve() for f in files}
    train = {Path(f).resolve() for f in glob.glob(train_glob)}
    val = {Path(f).resolve() for f in glob.glob(val_glob)}
    if read & val:
        return "val"
    return "train" if read and read <= train else "other"


def log_compliance(facts: dict, train_facts: dict | None, val_updates_before_quant: int, code_bytes: int, artifact: Path):
    """The compliance line, every field measured by this run: the evaluation's counts (`facts`), training's
    time and calibration source (None in EVAL_ONLY), optimizer steps taken on validation tokens before the
    model was quantized, and the size of the artifact file that was scored."""
    train_facts = train_facts or dict(train_within_budget="na", calibration_data="none")
    log(f"compliance: score_first:{facts['score_first']} each_token_once:{facts['each_token_once']} "
        f"train_within_budget:{train_facts['train_within_budget']} calibration_data:{train_facts['calibration_data']} "
        f"val_training_before_quant:{val_updates_before_quant} "
        f"artifact_within_limit:{int(within_byte_limit(code_bytes, artifact.stat().st_size))} "
        f"eval_within_limit:{facts['eval_within_limit']}")


def publish_run_files(h, artifact: Path):
    """Copy the run's artifact and float weights to the challenge's names in the current folder
    (./final_model.int6.ptz, ./final_model.pt), atomically and only now that the run has completed: a failed
    or killed run never replaces the files of a good one. Paths set by hand are left where they were put;
    an artifact over the size limit is not published."""
    copies = []
    if "ARTIFACT_PATH" in h.default_paths and artifact == Path(h.artifact_path):
        copies.append((artifact, Path(PUBLISHED_ARTIFACT)))
    if "MODEL_PATH" in h.default_paths:
        copies.append((Path(h.model_path), Path(PUBLISHED_MODEL)))
    for src, dst in copies:
        atomic_write_bytes(dst, src.read_bytes())
    if copies:
        log("published: " + " ".join(f"{dst} (copy of {src})" for src, dst in copies))


def pack_command(out_path: str) -> int:
    """`python train_gpt.py --pack OUT`: write the compressed submission copy and check that it holds the
    same program (its decompressed source parses to the same syntax tree as this file without docstrings)."""
    source = SCRIPT_PATH.read_text(encoding="utf-8")
    packed = pack_source(source)
    unpacked = unpack_source(packed)
    if ast.dump(ast.parse(unpacked)) != ast.dump(strip_docstrings(ast.parse(source))):
        print("error: the packed copy does not decompress to the same program", file=sys.stderr)
        return 1
    compile(packed, out_path, "exec")
    atomic_write_bytes(out_path, packed.encode("utf-8"))
    print(f"packed {SCRIPT_PATH.name}: {len(source.encode())} -> {len(packed.encode())} bytes, written to {out_path}")
    return 0


def help_text() -> str:
    """--help: how to run, then every setting with its default, its small-preset value and its meaning."""
    usage = __doc__.split("\nSections,")[0].rstrip() if __doc__ else "train_gpt.py"
    width = max(len(st.name) for st in SETTINGS)
    rows = [f"  {st.name:<{width}}  {st.default!r:<14} {repr(SMALL_PRESET[st.name]) if st.name in SMALL_PRESET else '':<8} {st.help}"
            for st in SETTINGS]
    return (f"{usage}\n\nSettings are environment variables (NAME=value python train_gpt.py); any other argument than "
            f"--help or --pack OUT.py is refused.\n\n  {'NAME':<{width}}  {'default':<14} {'small':<8} meaning\n"
            + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    global SKIP_FINALIZATION
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--help"], ["-h"]):
        print(help_text(), end="")
        return 0
    if argv[:1] == ["--pack"]:
        if len(argv) != 2:
            print("usage: python train_gpt.py --pack OUT.py", file=sys.stderr)
            return 2
        return pack_command(argv[1])
    if argv:
        print(f"error: unknown arguments {argv}; settings are environment variables (`python train_gpt.py --help` lists them)", file=sys.stderr)
        return 2
    try:
        h = Hyperparameters()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise Interrupted(f"received {signal.Signals(signum).name}: stopped. Files already written are complete (every write is atomic); "
                          "nothing partial was left. Re-run to start again.")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    log.open(None, h.is_main)
    try:
        device = setup_device(h)
        claim_run_id(h)  # needs the process group: rank 0 decides
        log.open(h.logfile, h.is_main)
        run(h, device)
        return 0
    except UserError as e:
        if log.file is None:  # no log of this run yet (the id was refused): stderr, like a settings error
            if h.is_main:
                print(f"error: {e}", file=sys.stderr)
        else:
            log(f"error: {e}")
        if not h.is_main:
            print(f"error (rank {h.rank}): {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        import traceback
        log(f"error: unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        log.close()
        if dist.is_available() and dist.is_initialized():
            SKIP_FINALIZATION = dist.get_backend() == "gloo"
            dist.destroy_process_group()


# PyTorch leaks the default gloo process group once DDP has been built on it, so its worker threads outlive
# destroy_process_group. When one of them drops its last reference to a collective's tensor while the
# interpreter is finalizing, it cannot take the GIL, is unwound through a noexcept destructor and aborts the
# process (SIGABRT after `run_complete`, about one CPU run in five on a loaded 2-core machine). A gloo run
# therefore leaves with os._exit once everything is written and flushed; NCCL runs exit normally.
SKIP_FINALIZATION = False

if __name__ == "__main__":
    exit_code = main()
    if SKIP_FINALIZATION:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
