"""Document-level score-first LoRA TTT (TTT_MODE=lora): documents, isolation, legality, byte counts."""
from __future__ import annotations

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


def run_doc_ttt(h, val, model, **cfg):
    hh = h.replace(**{k.upper(): v for k, v in cfg.items()})
    events = []
    r, legal = tg.evaluate_document_ttt(model, val, hh, CPU, tg.DocTTTConfig.from_settings(hh),
                                        observer=lambda *e: events.append(e))
    return r, legal, events


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
    # every trained target had been scored before; no target is scored after it was trained on
    scored, trained = np.zeros(val.n, bool), np.zeros(val.n, bool)
    for kind, a, b in events:
        if kind == "score":
            assert not trained[a:b].any() and not scored[a:b].any()
            scored[a:b] = True
        else:
            assert scored[a:b].all()
            trained[a:b] = True
    assert scored[1:].all()
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
