"""Shared fixtures: a tiny dataset (a 512-piece tokenizer trained with the challenge's settings on the
bundled public-domain sample, a few train shards, a short val shard) and a runner for train_gpt.py.

A small vocabulary keeps CPU runs fast: with 8192 pieces the output head dominates everything."""
from __future__ import annotations

import itertools
import json
import lzma
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

TINY_VOCAB = 512
CORPUS = REPO.parent / "shared" / "corpus"  # ../shared beside the checkout, as in CI
SP8192 = CORPUS / "tokenizer" / "sp8192.model"


def load_prepare():
    """data/prepare.py as the module `prepare`, loaded once for every test file: its case-op worker processes
    get their job function by pickle, by name, which must lead back to the same module object."""
    if "prepare" not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location("prepare", REPO / "data" / "prepare.py")
        sys.modules["prepare"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["prepare"])
    return sys.modules["prepare"]


def corpus_texts(split: str, n_docs: int | None) -> list[str]:
    """Texts of the first n_docs (None: all) documents of the proxy corpus's docs_{split}.jsonl.xz; skips the
    test without it."""
    path = CORPUS / f"docs_{split}.jsonl.xz"
    if not path.exists():
        pytest.skip(f"{path} not available")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n_docs)]


def sample_texts(n_docs: int) -> list[str]:
    """Decoded documents of the bundled sample (the sample ships shards, not text)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(REPO / "data/sample/tokenizers/fineweb_8192_bpe.model"))
    tokens = tg.read_shard(REPO / "data/sample/datasets/fineweb10B_sp8192/fineweb_train_000000.bin")
    bos = np.flatnonzero(tokens == 1).tolist() + [tokens.size]
    return [sp.decode(tokens[a + 1:b].tolist()) for a, b in zip(bos[:-1], bos[1:])][:n_docs]


SAMPLE_DATASET = REPO / "data" / "sample" / "datasets" / "fineweb10B_sp8192"


def sample_stream(split: str, n_docs: int) -> np.ndarray:
    """The first n_docs documents of the bundled sample's split as one token stream ([BOS] + ids each)."""
    tokens = np.concatenate([tg.read_shard(p) for p in sorted(SAMPLE_DATASET.glob(f"fineweb_{split}_*.bin"))])
    starts = np.flatnonzero(tokens == tg.BOS_ID).tolist() + [tokens.size]
    return tokens[:starts[min(n_docs, len(starts) - 1)]]


def write_split(folder: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> Path:
    """tokens as fineweb_{split}_NNNNNN.bin shards of shard_tokens each: documents run on across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, tokens.size, shard_tokens)):
        tg.write_shard(folder / f"fineweb_{split}_{i:06d}.bin", tokens[start:start + shard_tokens])
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs train_gpt.py (or data/prepare.py) as a whole process, or checks a whole corpus split; "
                                       "`-m \"not slow\"` skips these for a quick check")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """DATA_DIR with datasets/fineweb10B_sp512/{fineweb_train_00000{0,1,2}.bin, fineweb_val_000000.bin}
    and tokenizers/fineweb_512_bpe.model."""
    import sentencepiece as spm
    root = tmp_path_factory.mktemp("tiny_data")
    texts = sample_texts(120)
    model = root / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for doc in texts[:60] for t in doc.split(". ")), model_prefix=str(model),
        model_type="bpe", vocab_size=TINY_VOCAB, character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False, num_threads=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(model) + ".model")
    docs = [np.array([1] + sp.encode(t), dtype=np.uint16) for t in texts]
    val = np.concatenate(docs[:6])[:6000]
    train = np.concatenate(docs[6:])
    ds = root / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    for i, part in enumerate(np.array_split(train, 3)):
        tg.write_shard(ds / f"fineweb_train_{i:06d}.bin", part)
    tg.write_shard(ds / "fineweb_val_000000.bin", val)
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / f"fineweb_{TINY_VOCAB}_bpe.model").write_bytes(Path(str(model) + ".model").read_bytes())
    return root


def tiny_settings(data_dir: Path, **overrides) -> dict[str, str]:
    """Environment for a tiny, fast CPU run that still has recurrence, parallel blocks, GPTQ and TTT."""
    env = dict(
        PRESET="small", DATA_DIR=str(data_dir), VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="3", MODEL_DIM="64",
        EMBEDDING_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", XSA_LAST_N="3", LOOP_START="1", LOOP_END="1",
        NUM_LOOPS="1", PARALLEL_RESIDUAL_START="2", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32",
        TRAIN_BATCH_TOKENS="1024", MICRO_BATCH_TOKENS="1024", ITERATIONS="8", MAX_WALLCLOCK_SECONDS="0",
        WARMUP_STEPS="1", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0", GPTQ_CALIBRATION_BATCHES="2",
        QUANT_MIN_NUMEL="1024", TTT_ENABLED="0", TTT_CHUNK_TOKENS="2048", TTT_EPOCHS="1", EVAL_BATCH_SEQS="16",
        TTT_BATCH_SEQS="8", COMPILE="0", SEED="7", RUN_ID="test",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def tiny_env(tiny_data):
    return lambda **overrides: tiny_settings(tiny_data, **overrides)


def run_script(env: dict[str, str], cwd: Path, args: list[str] | None = None, script: Path | None = None,
               timeout: float = 300, torchrun_procs: int = 0) -> tuple[subprocess.CompletedProcess, str]:
    """Run train_gpt.py (or `script`) in `cwd` with exactly these settings on top of a clean environment.
    Returns the process and the text of logs/<RUN_ID>.txt ('' if none)."""
    base = {k: v for k, v in os.environ.items() if not (k.isupper() and k in tg.SETTINGS_BY_NAME)}
    base.update(env)
    base.setdefault("OMP_NUM_THREADS", "1")
    script = script or REPO / "train_gpt.py"
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd + (args or []), cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout)
    log = Path(cwd) / env.get("LOGS_DIR", "logs") / f"{env.get('RUN_ID', 'test')}.txt"
    return proc, (log.read_text() if log.exists() else "")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far steadier when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_h(**overrides) -> tg.Hyperparameters:
    env = dict(PRESET="small", VOCAB_SIZE="96", NUM_LAYERS="4", MODEL_DIM="64", EMBEDDING_DIM="64", NUM_HEADS="4",
               NUM_KV_HEADS="2", XSA_LAST_N="4", LOOP_START="1", LOOP_END="2", NUM_LOOPS="1",
               PARALLEL_RESIDUAL_START="2", ROPE_DIMS="8", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="64",
               MICRO_BATCH_TOKENS="64", COMPILE="0")
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters(environ=env, cuda_available=False)


class RandomTokens:
    """Stands in for TrainLoader in collect_hessians: random (inputs, targets) micro-batches."""

    def __init__(self, vocab: int, rows: int, seq: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.rows, self.seq = vocab, rows, seq

    def next(self):
        w = torch.randint(0, self.vocab, (self.rows, self.seq + 1), generator=self.g)
        return w[:, :-1], w[:, 1:]


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(args: list[str], extra_env: dict[str, str] | None = None, timeout: int = 120) -> list[str]:
    """Run `python args...` as ranks 0 and 1 of a 2-process group (the script calls init_process_group
    itself); asserts both exit 0 and returns their outputs (stdout and stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1", **(extra_env or {}))
    procs = [subprocess.Popen([sys.executable, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    return outputs



@pytest.fixture
def captured_log(monkeypatch):
    """What the script logs, as a list of lines, instead of the console (in-process tests)."""
    lines: list[str] = []
    monkeypatch.setattr(tg, "log", lambda msg="", console=True: lines.append(msg))
    return lines
