"""Document-level score-first LoRA TTT (TTT_MODE=lora): documents, isolation, legality, byte counts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_script, tiny_settings  # noqa: F401
from test_eval import eval_setup

import train_gpt as tg

CPU = torch.device("cpu")


def test_document_spans_cover_every_target_once():
    bos = 1
    toks = np.array([1, 5, 6, 1, 7, 1, 1, 8, 9, 9])
    spans = tg.document_spans(toks, bos)
    assert spans.tolist() == [[0, 3], [3, 5], [5, 6], [6, 9]]
    targets = np.concatenate([np.arange(s + 1, e + 1) for s, e in spans])
    assert targets.tolist() == list(range(1, toks.size))
    # a stream that does not start with BOS still starts a document at 0
    assert tg.document_spans(np.array([4, 4, 1, 3]), bos).tolist() == [[0, 2], [2, 3]]


def doc_setup(tiny_data, tmp_path, lengths, **overrides):
    """eval_setup on a val stream of documents of the given lengths (BOS + text tokens of the tiny val)."""
    h, val, model = eval_setup(tiny_data, tmp_path / "src", 3000, **overrides)
    text = val.tokens_np[val.tokens_np != 1]
    docs, at = [], 0
    for n in lengths:
        docs.append(np.concatenate([[1], text[at:at + n - 1]]))
        at += n - 1
    tg.write_shard(tmp_path / "val" / "fineweb_val_000000.bin", np.concatenate(docs).astype(np.uint16))
    h = tg.Hyperparameters(tiny_settings(tiny_data, VAL_FILES=str(tmp_path / "val" / "fineweb_val_*.bin"), **overrides),
                           cuda_available=False)
    return h, tg.ValidationData(h, CPU), model


LENGTHS = [40, 7, 64, 1, 33, 50, 12, 64, 2, 45, 30, 61]


def doc_reference(model, val, spans) -> float:
    """Sum of NLLs with each document scored alone in one forward (documents shorter than the window)."""
    total = 0.0
    with torch.no_grad():
        for s, e in spans.tolist():
            x = val.tokens[s:e][None]
            y = val.tokens[s + 1:e + 1][None]
            total += float(tg.head_nll(model.forward_hidden(x), model.head_weight(), y, model.logit_softcap).double().sum())
    return total


def run_doc_ttt(h, val, model, global_ttt=False, **cfg):
    hh = h.replace(**{k.upper(): v for k, v in cfg.items()})
    events = []
    global_cfg = tg.TTTConfig.from_settings(hh) if global_ttt else None
    r, legal = tg.evaluate_document_ttt(model, val, hh, CPU, tg.DocTTTConfig.from_settings(hh), global_cfg,
                                        observer=lambda *e: events.append(e))
    return r, legal, events


def check_score_first(events, n):
    """Every trained target had been scored before; no target is scored twice or after it was trained on."""
    scored, trained = np.zeros(n, bool), np.zeros(n, bool)
    for kind, a, b in events:
        if kind == "score":
            assert not trained[a:b].any() and not scored[a:b].any()
            scored[a:b] = True
        else:
            assert scored[a:b].all()
            trained[a:b] = True
    assert scored[1:].all()
    return trained


@pytest.mark.parametrize("chunk", [16, 64])
def test_zero_lr_scores_each_document_alone_with_the_shipped_model(tiny_data, tmp_path, chunk):
    h, val, model = doc_setup(tiny_data, tmp_path, LENGTHS, EVAL_SEQ_LEN="64")
    spans = tg.document_spans(val.tokens_np, val.sp.bos_id())
    assert len(spans) == len(LENGTHS) and (spans[:, 1] - spans[:, 0]).max() <= 64  # the reference sees whole documents
    r, legal, _ = run_doc_ttt(h, val, model, ttt_lora_lr=0.0, ttt_lora_chunk=chunk, ttt_lora_docs=3)
    assert r.tokens == val.n - 1 and r.bytes == val.bytes_of(1, val.n)
    assert r.loss_sum == pytest.approx(doc_reference(model, val, spans), rel=1e-5)
    assert legal["each_token_once"] == 1 and legal["score_first"] == 1 and legal["tokens_scored"] == val.n - 1


def test_training_is_score_first_and_documents_do_not_see_each_other(tiny_data, tmp_path):
    h, val, model = doc_setup(tiny_data, tmp_path, LENGTHS * 3, EVAL_SEQ_LEN="64")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base, _, _ = run_doc_ttt(h, val, model, ttt_lora_lr=0.0, ttt_lora_chunk=8, ttt_lora_docs=4)
    r, legal, events = run_doc_ttt(h, val, model, ttt_lora_lr=0.05, ttt_lora_chunk=8, ttt_lora_docs=4)
    assert r.loss_sum != pytest.approx(base.loss_sum, rel=1e-4)  # the adapters did learn something
    assert legal["score_first"] == 1 and legal["each_token_once"] == 1 and legal["trained_chunks"] > 0
    check_score_first(events, val.n)
    # the shipped weights never change, and no adapter is left on the model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.lora is None for m in model.modules() if isinstance(m, tg.CastedLinear))
    # a document's score does not depend on which documents share its batch: one at a time gives the same
    alone, _, _ = run_doc_ttt(h, val, model, ttt_lora_lr=0.05, ttt_lora_chunk=8, ttt_lora_docs=1)
    assert alone.loss_sum == pytest.approx(r.loss_sum, rel=2e-4)


def test_long_documents_are_scored_with_a_sliding_context(tiny_data, tmp_path):
    h, val, model = doc_setup(tiny_data, tmp_path, LENGTHS, EVAL_SEQ_LEN="16", EVAL_STRIDE="8")
    assert (np.diff(tg.document_spans(val.tokens_np, val.sp.bos_id()), axis=1) > 16).any()
    r, legal, _ = run_doc_ttt(h, val, model, ttt_lora_lr=0.01, ttt_lora_chunk=8, ttt_lora_docs=2)
    assert r.tokens == val.n - 1 and legal["each_token_once"] == 1


def test_bad_lora_settings_are_explained(tiny_data, tmp_path):
    h, _, _ = eval_setup(tiny_data, tmp_path, 500, EVAL_SEQ_LEN="64")
    with pytest.raises(tg.ConfigError, match="TTT_LORA_TARGETS"):
        tg.DocTTTConfig.from_settings(h.replace(TTT_LORA_TARGETS="mlp_in,qkv"))
    with pytest.raises(tg.ConfigError, match="TTT_LORA_CHUNK"):
        tg.DocTTTConfig.from_settings(h.replace(TTT_LORA_CHUNK=128))


def context_reference(model, val, spans, chunk, context, seq_len) -> float:
    """Sum of NLLs, each document chunk scored in one forward over the stream tokens before it: its own
    document's and up to `context` of the documents before, at most seq_len in all."""
    total = 0.0
    with torch.no_grad():
        for s, e in spans.tolist():
            for lo in range(0, e - s, chunk):
                first, end = s + lo, min(s + lo + chunk, e)
                w = max(0, s - context, end - seq_len)
                x, y = val.tokens[w:end][None], val.tokens[w + 1:end + 1][None]
                nll = tg.head_nll(model.forward_hidden(x), model.head_weight(), y, model.logit_softcap)
                total += float(nll[0, first - w:].double().sum())
    return total


def test_stream_context_reaches_into_the_documents_before(tiny_data, tmp_path):
    h, val, model = doc_setup(tiny_data, tmp_path, LENGTHS, EVAL_SEQ_LEN="64")
    spans = tg.document_spans(val.tokens_np, val.sp.bos_id())
    alone, _, _ = run_doc_ttt(h, val, model, ttt_lora_lr=0.0, ttt_lora_chunk=16, ttt_lora_docs=3)
    r, legal, _ = run_doc_ttt(h, val, model, ttt_lora_lr=0.0, ttt_lora_chunk=16, ttt_lora_docs=3, ttt_lora_context=20)
    assert r.loss_sum == pytest.approx(context_reference(model, val, spans, 16, 20, 64), rel=1e-5)
    assert r.loss_sum != pytest.approx(alone.loss_sum, rel=1e-4) and legal["each_token_once"] == 1


def test_both_modes_adapt_documents_inside_global_chunks_score_first(tiny_data, tmp_path):
    h, val, model = doc_setup(tiny_data, tmp_path, LENGTHS * 3, EVAL_SEQ_LEN="64", TTT_CHUNK_TOKENS="256")
    spans = tg.document_spans(val.tokens_np, val.sp.bos_id())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # with both LRs at 0 it is the documents scored alone
    r0, _, _ = run_doc_ttt(h, val, model, global_ttt=True, ttt_lora_lr=0.0, ttt_lr=0.0, ttt_lora_chunk=16)
    assert r0.loss_sum == pytest.approx(doc_reference(model, val, spans), rel=1e-5)
    r, legal, events = run_doc_ttt(h, val, model, global_ttt=True, ttt_lora_lr=0.05, ttt_lr=0.05, ttt_lora_chunk=16)
    trained = check_score_first(events, val.n)
    assert legal["score_first"] == 1 and legal["each_token_once"] == 1 and r.tokens == val.n - 1
    # the global steps trained the base weights on whole groups of documents, all but the last group
    global_steps = [(a, b) for kind, a, b in events if kind == "train" and b - a > 16]
    assert len(global_steps) >= 2 and all(a - 1 in spans[:, 0] for a, _ in global_steps)
    assert not trained[global_steps[-1][1]:].all()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


WORKER = """
import json, os, sys
from pathlib import Path
repo, data, val_glob = sys.argv[1:4]
sys.path[:0] = [repo, repo + "/tests"]
import torch
import train_gpt as tg
from conftest import tiny_settings
from test_eval import random_model
h = tg.Hyperparameters(tiny_settings(Path(data), VAL_FILES=val_glob, **json.loads(sys.argv[4])), cuda_available=False)
device = tg.setup_device(h)
model = random_model(h)
val = tg.ValidationData(h, device)
r, legal = tg.evaluate_document_ttt(model, val, h, device, tg.DocTTTConfig.from_settings(h), tg.TTTConfig.from_settings(h))
print("RESULT " + json.dumps(dict(loss_sum=r.loss_sum, tokens=r.tokens, bytes=r.bytes, legal=legal)))
# Leave without interpreter finalization, as train_gpt.py does for gloo (SKIP_FINALIZATION): gloo's threads
# can abort it ("terminate called without an active exception").
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow  # two processes
def test_two_ranks_share_the_documents_and_score_like_one(tiny_data, tmp_path):
    from conftest import REPO, run_two_ranks
    settings = dict(EVAL_SEQ_LEN="64", TTT_CHUNK_TOKENS="256", TTT_LORA_CHUNK="16", TTT_LORA_LR="0.05",
                    TTT_LR="0.05", TTT_LORA_DOCS="4", TTT_LORA_CONTEXT="8")
    h, val, model = doc_setup(tiny_data, tmp_path, LENGTHS * 3, **settings)
    one, legal_one, _ = run_doc_ttt(h, val, model, global_ttt=True)
    outputs = run_two_ranks(["-c", WORKER, str(REPO), str(tiny_data), str(tmp_path / "val" / "fineweb_val_*.bin"),
                             json.dumps(settings)])
    rows = [json.loads(line.split("RESULT ", 1)[1]) for text in outputs for line in text.splitlines() if line.startswith("RESULT ")]
    assert len(rows) == 2 and rows[0] == rows[1]  # all-reduced: both ranks report the whole pass
    assert (rows[0]["tokens"], rows[0]["bytes"]) == (one.tokens, one.bytes)
    assert rows[0]["loss_sum"] == pytest.approx(one.loss_sum, rel=1e-5)
    assert rows[0]["legal"] == legal_one and legal_one["each_token_once"] == 1
