"""Evaluation: byte accounting on real text, the sliding-window plan, sliding and score-first TTT scoring
on a tiny random GPT (legality recorded through the observer), 1 vs 2 processes, and the EVAL_ONLY path.
CPU only; three tiny script runs plus one 2-process run."""
from __future__ import annotations

import copy
import hashlib
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import SP8192, corpus_texts, run_script, tiny_settings

import train_gpt as tg

RARE_TEXT = "Tokyo 東京 and Kyōto: 🎉🦀 naïve café, 𝄞 ☃ Ωμέγα ﬁnal ½ — ‘quoted’ «guillemets» 한국어 ไทย"


# ------------------------------------------------------------------------------------------------
# byte accounting
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp8192():
    if not SP8192.exists():
        pytest.skip(f"{SP8192} not available")
    return spm.SentencePieceProcessor(model_file=str(SP8192))


@pytest.fixture(scope="module")
def real_docs(sp8192) -> list[list[int]]:
    """Token ids of the first 50 validation documents of the proxy corpus, plus one with rare characters."""
    texts = corpus_texts("val", 50)
    texts.append(RARE_TEXT + " " + texts[0][:200])
    return [sp8192.encode(t) for t in texts]


def decoded_bytes(sp, ids) -> int:
    return len(sp.decode(ids).encode("utf-8"))


def test_real_documents_have_byte_fallback_tokens(sp8192, real_docs):
    fallback = [d for d in real_docs if any(sp8192.is_byte(i) for i in d)]
    assert fallback, "no document exercises byte-fallback tokens"
    rare = real_docs[-1]
    assert sum(sp8192.is_byte(i) for i in rare) >= 20
    assert any(ord(c) > 0xFFFF for c in sp8192.decode(rare)), "4-byte UTF-8 characters survive the round trip"


def test_target_bytes_equal_decoded_utf8_per_document(sp8192, real_docs):
    luts = tg.build_byte_luts(sp8192, 8192)
    for k, ids in enumerate(real_docs):
        stream = np.array([1] + ids, dtype=np.uint16)
        counted = tg.count_target_bytes(stream, luts)
        assert counted[0] == 0
        assert int(counted[1:].sum()) == decoded_bytes(sp8192, ids), f"document {k}"


def test_target_bytes_equal_decoded_utf8_over_a_concatenated_stream(sp8192, real_docs):
    """Documents joined as [BOS]+ids: BOS counts 0 and swallows the leading space of the next piece, so the
    stream's bytes are exactly the sum of the documents' decoded lengths."""
    luts = tg.build_byte_luts(sp8192, 8192)
    stream, starts = [], []
    for ids in real_docs:
        starts.append(len(stream))
        stream += [1] + ids
    counted = tg.count_target_bytes(np.array(stream, dtype=np.uint16), luts)
    assert int(counted.sum()) == sum(decoded_bytes(sp8192, ids) for ids in real_docs)
    for (a, b), ids in zip(zip(starts, starts[1:] + [len(stream)]), real_docs):
        assert int(counted[a + 1:b].sum()) == decoded_bytes(sp8192, ids)
    # the BOS targets themselves count nothing
    assert all(counted[a] == 0 for a in starts)


def test_leading_space_rules(sp8192):
    luts = tg.build_byte_luts(sp8192, 8192)
    the, a = sp8192.piece_to_id("▁the"), sp8192.piece_to_id("a")
    assert the != sp8192.unk_id() and a != sp8192.unk_id()
    cases = [
        ([the], "the"),  # after BOS the space is swallowed
        ([the, the], "the the"),
        ([a, the], "a the"),
    ]
    for ids, text in cases:
        assert sp8192.decode(ids) == text
        counted = tg.count_target_bytes(np.array([1] + ids), luts)
        assert int(counted.sum()) == len(text.encode()), (ids, text)
    # BOS in the middle of a stream: the next document's leading space is not a byte of the text
    counted = tg.count_target_bytes(np.array([1, a, 1, the]), luts)
    assert counted.tolist() == [0, 1, 0, 3]
    base, space, boundary = luts
    assert boundary[[0, 1, 2, 3]].all() and base[[0, 1, 2, 3]].sum() == 0
    byte_ids = [i for i in range(8192) if sp8192.is_byte(i)]
    assert len(byte_ids) == 256 and (base[byte_ids] == 1).all() and not space[byte_ids].any()


def test_tiny_validation_stream_bytes(tiny_data):
    """The same identity on the tiny test data (512-piece tokenizer: lots of byte fallback)."""
    h = tg.Hyperparameters(tiny_settings(tiny_data), cuda_available=False)
    val = tg.ValidationData(h, torch.device("cpu"))
    toks = val.tokens_np
    bos = np.flatnonzero(toks == 1).tolist() + [toks.size]
    assert bos[0] == 0
    expected = sum(len(val.sp.decode(toks[a + 1:b].tolist()).encode()) for a, b in zip(bos[:-1], bos[1:]))
    assert int(val.target_bytes.sum()) == expected
    assert val.bytes_of(1, val.n) == expected
    assert any(val.sp.is_byte(int(t)) for t in toks)


# ------------------------------------------------------------------------------------------------
# the sliding-window plan
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 17, 64, 65, 66, 100, 129, 1000, 1001])
@pytest.mark.parametrize("seq_len,stride", [(1, 1), (8, 3), (16, 16), (64, 32), (64, 64), (64, 1), (128, 48)])
def test_plan_windows(n, seq_len, stride):
    plan = tg.plan_windows(n, seq_len, stride)
    assert plan.dtype == np.int64 and plan.ndim == 2 and plan.shape[1] == 3
    Lw = min(seq_len, n - 1)
    start, a, b = plan[:, 0], plan[:, 1], plan[:, 2]
    covered = np.zeros(n, dtype=np.int64)
    for s_, a_, b_ in plan:
        assert a_ < b_
        covered[a_:b_] += 1
    assert covered[0] == 0 and (covered[1:] == 1).all(), "every target 1..n-1 is scored exactly once"
    assert (a[1:] == b[:-1]).all() and a[0] == 1 and b[-1] == n
    assert (start >= 0).all() and (start + Lw + 1 <= n).all(), "windows stay inside the stream"
    assert (b == start + Lw + 1).all(), "all windows have the same length and score up to their end"
    assert start[0] == 0
    # context of the first scored target of a window = a - start
    assert ((a[1:] - start[1:]) >= Lw - stride).all()
    assert (b[1:] - a[1:] <= stride).all()


# ------------------------------------------------------------------------------------------------
# in-process scoring on a tiny random GPT
# ------------------------------------------------------------------------------------------------


def eval_setup(tiny_data, tmp_path, n: int, **overrides):
    """Hyperparameters, ValidationData of the first n tiny val tokens, and a random (not-zero-init) GPT."""
    src = tg.read_shard(tiny_data / "datasets" / "fineweb10B_sp512" / "fineweb_val_000000.bin")
    assert n <= src.size
    tg.write_shard(tmp_path / "val" / "fineweb_val_000000.bin", src[:n])
    h = tg.Hyperparameters(tiny_settings(tiny_data, VAL_FILES=str(tmp_path / "val" / "fineweb_val_*.bin"), **overrides),
                           cuda_available=False)
    val = tg.ValidationData(h, torch.device("cpu"))
    assert val.n == n
    return h, val, random_model(h)


def random_model(h) -> tg.GPT:
    """A GPT with seeded random weights everywhere (zero-init layers too), looping as the settings say."""
    torch.manual_seed(123)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.looping = h.num_loops > 0
    return model


def reference_sliding(model, val, h) -> float:
    """Independent sum of NLLs: every window on its own, full forward, keep targets in [a, b)."""
    total = 0.0
    with torch.no_grad():
        for start, a, b in tg.plan_windows(val.n, h.eval_seq_len, h.eval_stride).tolist():
            Lw = b - 1 - start
            win = val.tokens[start:start + Lw + 1][None]
            nll = tg.head_nll(model.forward_hidden(win[:, :-1]), model.head_weight(), win[:, 1:], model.logit_softcap)[0]
            targets = torch.arange(start + 1, start + Lw + 1)
            total += float(nll.double()[(targets >= a) & (targets < b)].sum())
    return total


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 64, 32), (1001, 64, 48), (50, 64, 16), (150, 32, 1)])
def test_sliding_scores_every_target_once(tiny_data, tmp_path, n, seq_len, stride):
    h, val, model = eval_setup(tiny_data, tmp_path, n, EVAL_SEQ_LEN=seq_len, EVAL_STRIDE=stride, EVAL_BATCH_SEQS=7)
    seen = []
    r, legal = tg.evaluate_sliding(model, val, h, torch.device("cpu"), observer=lambda *e: seen.append(e))
    assert r.tokens == n - 1 and legal["tokens_scored"] == n - 1 and legal["each_token_once"] == 1
    assert r.bytes == int(val.target_bytes[1:].sum()) == val.bytes_of(1, n)
    assert {e[0] for e in seen} == {"score"} and legal["trained_chunks"] == 0
    ref = reference_sliding(model, val, h)
    assert r.loss_sum == pytest.approx(ref, rel=1e-5)


def test_stride_equal_to_seq_len_is_non_overlapping_scoring(tiny_data, tmp_path):
    L = 64
    h, val, model = eval_setup(tiny_data, tmp_path, 20 * L + 1, EVAL_SEQ_LEN=L, EVAL_STRIDE=L)
    loss, bpb, tokens, nbytes = tg.evaluate_plain(model, val, h, torch.device("cpu"))
    r, _ = tg.evaluate_sliding(model, val, h, torch.device("cpu"))
    assert (r.tokens, r.bytes) == (tokens, nbytes) == (20 * L, val.bytes_of(1, 20 * L + 1))
    assert r.loss == pytest.approx(loss, rel=1e-6)
    assert r.bpb == pytest.approx(bpb, rel=1e-6)
    plan = tg.plan_windows(val.n, L, L)
    assert plan[:, 0].tolist() == list(range(0, 20 * L, L))


def weights_digest(model) -> str:
    hsh = hashlib.sha256()
    for p in model.parameters():
        hsh.update(p.detach().numpy().tobytes())
    return hsh.hexdigest()


def test_ttt_is_score_first(tiny_data, tmp_path, monkeypatch):
    n, C = 1500, 256
    h, val, model = eval_setup(tiny_data, tmp_path, n, EVAL_SEQ_LEN=64, EVAL_STRIDE=32, TTT_CHUNK_TOKENS=C)
    events = []  # (kind, a, b, weights digest when the event was reported)
    reads = []  # (lo, hi) of every TTT training call, checked with poisoned tokens
    real_train = tg.ttt_train_chunk

    def guarded_train(model_, val_, lo, hi, *args, **kwargs):
        """Tokens the chunk may not use (not yet scored, or not its own) are replaced by an invalid id, so
        any read of them fails in the embedding lookup."""
        original = val_.tokens.clone()
        val_.tokens[hi:] = -1
        val_.tokens[:lo - 1] = -1
        try:
            out = real_train(model_, val_, lo, hi, *args, **kwargs)
        finally:
            val_.tokens.copy_(original)
        reads.append((lo, hi))
        return out

    monkeypatch.setattr(tg, "ttt_train_chunk", guarded_train)
    cfg = tg.TTTConfig.from_settings(h, lr=0.05, epochs=2, momentum=0.9, grad_clip=1.0, batch_seqs=3)
    r, legal = tg.evaluate_sliding(model, val, h, torch.device("cpu"), ttt=cfg,
                                   observer=lambda kind, a, b: events.append((kind, a, b, weights_digest(model))))
    n_chunks = (n - 2) // C + 1
    assert legal == dict(score_first=1, chunks=n_chunks, trained_chunks=n_chunks - 1, updates_before_score=0,
                         tokens_scored=n - 1, each_token_once=1)
    assert r.tokens == n - 1 and r.bytes == val.bytes_of(1, n)

    scored = np.zeros(n, dtype=np.int64)
    trained = np.zeros(n, dtype=bool)
    trains = [e for e in events if e[0] == "train"]
    assert len(trains) == n_chunks - 1
    assert events[-1][0] == "score", "no training after the last chunk"
    for kind, a, b, digest in events:
        assert 1 <= a < b <= n
        if kind == "score":
            assert not trained[a:b].any(), f"targets {a}..{b - 1} scored after training on them"
            scored[a:b] += 1
        else:
            assert (scored[a:b] == 1).all(), f"training on {a}..{b - 1} before all of them were scored"
            trained[a:b] = True
    assert scored[0] == 0 and (scored[1:] == 1).all(), "each target scored exactly once"
    # chunks are the target ranges [c*C+1, (c+1)*C+1), trained in order
    assert [(a, b) for _, a, b, _ in trains] == [(c * C + 1, (c + 1) * C + 1) for c in range(n_chunks - 1)]
    assert reads == [(a, b) for _, a, b, _ in trains]
    # the weights: fixed while a chunk is scored, changed by every training step in between
    digests_per_phase = [[]]
    for kind, _, _, digest in events:
        if kind == "train":
            digests_per_phase.append([])
        else:
            digests_per_phase[-1].append(digest)
    assert all(len(set(d)) == 1 for d in digests_per_phase), "weights changed while a chunk was being scored"
    firsts = [d[0] for d in digests_per_phase]
    assert len(set(firsts)) == len(firsts), "every TTT phase must update the weights"


def test_sliding_and_ttt_report_progress_with_running_bpb_and_eta(tiny_data, tmp_path, monkeypatch):
    h, val, model = eval_setup(tiny_data, tmp_path, 1500, TTT_CHUNK_TOKENS=128)
    lines = []
    monkeypatch.setattr(tg, "log", lambda msg="", console=True: lines.append(msg))
    plain, _ = tg.evaluate_sliding(copy.deepcopy(model), val, h, torch.device("cpu"))
    ttt, _ = tg.evaluate_sliding(model, val, h, torch.device("cpu"), ttt=tg.TTTConfig.from_settings(h, epochs=1))
    n_chunks = (1500 - 2) // 128 + 1
    for name, result in (("sliding", plain), ("ttt", ttt)):
        mine = [l for l in lines if l.startswith(f"eval_progress: {name} ")]
        # about every 10 % of the chunks, never after the last one (the stage line follows)
        assert 5 <= len(mine) < n_chunks, mine
        last = dict(kv.split(":", 1) for kv in mine[-1].split()[2:])
        done, total = map(int, last["chunk"].split("/"))
        assert total == n_chunks and done < total and float(last["eta"].rstrip("s")) >= 0
        assert 0 < int(last["rank0_tokens"]) < result.tokens
        assert abs(float(last["rank0_running_bpb"]) - result.bpb) < 0.5


def test_ttt_with_zero_lr_is_exactly_sliding(tiny_data, tmp_path):
    h, val, model = eval_setup(tiny_data, tmp_path, 1200, TTT_CHUNK_TOKENS=300)
    before = copy.deepcopy(model.state_dict())
    plain, _ = tg.evaluate_sliding(copy.deepcopy(model), val, h, torch.device("cpu"))
    m0 = copy.deepcopy(model)
    zero, legal = tg.evaluate_sliding(m0, val, h, torch.device("cpu"),
                                      ttt=tg.TTTConfig.from_settings(h, lr=0.0, epochs=2, momentum=0.9, grad_clip=1.0, batch_seqs=4))
    assert legal["trained_chunks"] == legal["chunks"] - 1 >= 2
    assert (zero.loss_sum, zero.tokens, zero.bytes) == (plain.loss_sum, plain.tokens, plain.bytes)
    assert all(torch.equal(before[k], v) for k, v in m0.state_dict().items())

    m1 = copy.deepcopy(model)
    ttt, _ = tg.evaluate_sliding(m1, val, h, torch.device("cpu"),
                                 ttt=tg.TTTConfig.from_settings(h, lr=0.05, epochs=2, momentum=0.9, grad_clip=1.0, batch_seqs=4))
    assert (ttt.tokens, ttt.bytes) == (plain.tokens, plain.bytes)
    assert ttt.loss_sum != plain.loss_sum
    changed = [k for k, v in m1.state_dict().items() if not torch.equal(before[k], v)]
    assert "tok_emb.weight" in changed and len(changed) > len(before) // 2
    assert all(p.grad is None for p in m1.parameters())


# ------------------------------------------------------------------------------------------------
# script runs: EVAL_ONLY, 1 vs 2 processes
# ------------------------------------------------------------------------------------------------

STAGE = re.compile(r"^(\S+(?: post-ema)?) val_loss:([\d.]+) val_bpb:([\d.]+) eval_time:\d+ms$", re.M)
COUNTS = re.compile(r"^(\S+(?: post-ema)?) val_tokens:(\d+) val_bytes:(\d+)$", re.M)


def stages(log: str) -> dict[str, tuple[str, str, int, int]]:
    """stage -> (val_loss text, val_bpb text, val_tokens, val_bytes)."""
    losses = {m[0]: (m[1], m[2]) for m in STAGE.findall(log)}
    counts = {m[0]: (int(m[1]), int(m[2])) for m in COUNTS.findall(log)}
    assert set(losses) == set(counts), (losses, counts)
    return {k: losses[k] + counts[k] for k in losses}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("eval_run")
    env = tiny_settings(tiny_data, TTT_ENABLED="1", RUN_ID="train")
    proc, log = run_script(env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, env, log


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_training_log_reports_every_stage(trained, tiny_data):
    _, env, log = trained
    s = stages(log)
    assert list(s) == ["pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt"]
    h = tg.Hyperparameters(env, cuda_available=False)
    val = tg.ValidationData(h, torch.device("cpu"))
    L = h.eval_seq_len
    plain_tokens = (val.n - 1) // L * L
    for stage in ("pre-quantization post-ema", "quantized"):
        assert s[stage][2:] == (plain_tokens, val.bytes_of(1, 1 + plain_tokens))
    for stage in ("quantized_sliding_window", "quantized_ttt"):
        assert s[stage][2:] == (val.n - 1, val.bytes_of(1, val.n))
    assert re.search(r"^ttt:legality score_first:1 chunks:3 trained_chunks:2 updates_before_score:0 tokens_scored:\d+ each_token_once:1$", log, re.M)
    assert re.search(r"^eval_total: time:\d+ms limit:600000ms$", log, re.M)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_eval_only_reproduces_the_training_run(trained, tmp_path):
    cwd, env, log = trained
    artifact = cwd / "final_model.int6.ptz"
    before = artifact.read_bytes()
    eval_env = dict(env, EVAL_ONLY="1", RUN_ID="eval_only", TRAIN_FILES=str(tmp_path / "no_such_dir" / "train_*.bin"))
    proc, elog = run_script(eval_env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EVAL_ONLY: training data not read" in elog
    assert "train_loss" not in elog and "pre-quantization" not in elog and "gptq:" not in elog
    s, e = stages(log), stages(elog)
    assert list(e) == ["quantized", "quantized_sliding_window", "quantized_ttt"]
    for stage in e:
        assert e[stage] == s[stage], stage
    assert re.search(r"^eval_total: time:\d+ms limit:600000ms$", elog, re.M)
    assert elog.rstrip().endswith("run_complete")
    assert artifact.read_bytes() == before


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_eval_only_without_artifact_fails_clearly(trained, tmp_path):
    _, env, _ = trained
    missing = tmp_path / "nowhere" / "model.ptz"
    proc, elog = run_script(dict(env, EVAL_ONLY="1", RUN_ID="missing", ARTIFACT_PATH=str(missing)), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in elog.splitlines() if l.startswith("error:")]
    assert errors, elog[-2000:]
    assert "ARTIFACT_PATH" in errors[0] and str(missing) in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_process_eval(trained):
    """EVAL_ONLY of the training run's artifact with 2 processes (gloo): windows and TTT sequences are
    split over ranks, sums all-reduced."""
    cwd, env, log = trained
    return run_script(dict(env, EVAL_ONLY="1", RUN_ID="two_procs"), cwd, torchrun_procs=2)


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_two_processes_score_like_one(trained, two_process_eval):
    _, _, log = trained
    proc, dlog = two_process_eval
    assert "world_size:2" in dlog
    one, two = stages(log), stages(dlog)
    for stage in ("quantized", "quantized_sliding_window"):
        assert stage in two, (proc.stdout + proc.stderr)[-3000:]
        assert two[stage][2:] == one[stage][2:], stage  # val_tokens, val_bytes
        assert abs(float(two[stage][0]) - float(one[stage][0])) <= 1e-6, (stage, one[stage], two[stage])


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_two_processes_ttt_like_one(trained, two_process_eval):
    _, _, log = trained
    proc, dlog = two_process_eval
    assert proc.returncode == 0, (dlog + proc.stderr)[-3000:]
    one, two = stages(log), stages(dlog)
    assert two["quantized_ttt"][2:] == one["quantized_ttt"][2:]
    assert abs(float(two["quantized_ttt"][0]) - float(one["quantized_ttt"][0])) <= 1e-5, (one, two)
    assert re.search(r"^ttt:legality score_first:1 chunks:3 trained_chunks:2 updates_before_score:0 tokens_scored:\d+ each_token_once:1$", dlog, re.M)
