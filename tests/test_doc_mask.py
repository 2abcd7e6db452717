"""Issue 16, item 3: attention that does not cross document boundaries (DOC_MASK). The flex-attention tile
mask is checked against the element mask it summarizes, both kernels against each other, and the model
against the property that matters: with the mask on, a document's hidden states do not depend on what came
before its BOS. Also: the switch survives the artifact, and the compiled (flex) path matches the eager one
without recompiling for each new document layout."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from conftest import tiny_h  # noqa: E402
from test_model import randomize  # noqa: E402

BLOCK = tg.FLEX_BLOCK


def rows_with_documents(starts_per_row: list[list[int]], T: int, seed: int = 0) -> torch.Tensor:
    """Token rows of length T with BOS_ID exactly at the given positions and ordinary tokens elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(tg.BOS_ID + 1, 96, (len(starts_per_row), T), generator=g)
    for row, starts in enumerate(starts_per_row):
        ids[row, starts] = tg.BOS_ID
    return ids


def element_mask(doc: torch.Tensor) -> torch.Tensor:
    T = doc.size(1)
    return torch.ones(T, T, dtype=torch.bool).tril() & (doc[:, :, None] == doc[:, None, :])


def tile_sets(num: torch.Tensor, idx: torch.Tensor) -> list[list[set[int]]]:
    """BlockMask (counts, indices) -> per row, per query tile, the set of key tiles listed."""
    return [[set(idx[b, 0, q, :int(num[b, 0, q])].tolist()) for q in range(num.size(2))] for b in range(num.size(0))]


# Layouts over 4 tiles of 128: documents inside one tile, across tile edges, one covering whole tiles, a
# BOS on a tile edge, and a row with no BOS at all (one document from before the window).
LAYOUTS = [[0, 40, 300, 301, 384], [0, 128, 256], [], [5, 500], [0, 127, 129, 383, 511]]


def test_document_ids_count_bos():
    ids = torch.tensor([[7, tg.BOS_ID, 3, 3, tg.BOS_ID, tg.BOS_ID, 9]])
    assert tg.document_ids(ids).tolist() == [[0, 1, 1, 1, 2, 3, 3]]


def test_tile_mask_lists_exactly_the_tiles_the_element_mask_touches():
    T = 4 * BLOCK
    ids = rows_with_documents(LAYOUTS, T)
    doc = tg.document_ids(ids)
    bm = tg.document_block_mask(doc)
    allowed = element_mask(doc).view(len(LAYOUTS), 4, BLOCK, 4, BLOCK).sum((2, 4))  # allowed pairs per tile pair
    partial = tile_sets(bm.kv_num_blocks, bm.kv_indices)
    whole = tile_sets(bm.full_kv_num_blocks, bm.full_kv_indices)
    for b in range(len(LAYOUTS)):
        for q in range(4):
            want_whole = {k for k in range(4) if allowed[b, q, k] == BLOCK * BLOCK}
            want_partial = {k for k in range(4) if 0 < allowed[b, q, k] < BLOCK * BLOCK}
            assert whole[b][q] == want_whole, (LAYOUTS[b], q)
            # a tile listed as partial may hold no allowed pair only on the diagonal, which always has some
            assert partial[b][q] == want_partial, (LAYOUTS[b], q)
    assert whole[1][1] == set() and whole[2][3] == {0, 1, 2}  # row 2: one document, so all earlier tiles whole


@pytest.mark.parametrize("T", [4 * BLOCK, 100])
def test_flex_and_masked_sdpa_agree_with_the_reference(T):
    """The two kernels of document_attention against a plain masked softmax, with GQA (4 query heads, 2 KV)."""
    g = torch.Generator().manual_seed(1)
    layouts = [[s for s in row if s < T] for row in LAYOUTS]
    doc = tg.document_ids(rows_with_documents(layouts, T))
    B = len(layouts)
    q, k, v = (torch.randn(B, T, h, 16, generator=g) for h in (4, 2, 2))
    mask = element_mask(doc)[:, None]
    kr, vr = (t.transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
    scores = (q.transpose(1, 2) @ kr.transpose(-1, -2)) / 4.0
    want = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vr).transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is slow; this test wants its numbers
        tiles = tg.document_block_mask(doc) if T % BLOCK == 0 else None  # T=100: no tile mask, SDPA
        for flex in (False, True):
            got = tg.document_attention(q, k, v, tg.Documents(doc, tiles), flex=flex)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_tile_mask_is_built_only_for_what_can_use_it():
    """documents(): a tile mask for compiled runtimes and lengths that are multiples of the tile, not for CPU
    training (flex has no CPU backward); the document indices always."""
    ids = rows_with_documents([[0, 60]], 2 * BLOCK)
    with torch.no_grad():
        assert tg.documents(ids, True, None, flex=True).tiles is not None
        assert tg.documents(ids, True, None, flex=False).tiles is None
        assert tg.documents(ids[:, :100], True, None, flex=True).tiles is None
    made = tg.documents(ids, True, None, flex=True)  # gradients on, CPU
    assert made.tiles is None and torch.equal(made.ids, tg.document_ids(ids))


def test_a_documents_states_do_not_depend_on_the_text_before_it():
    """With DOC_MASK the model sees only the document itself: the hidden states of a document that follows
    another equal those of the document alone (RoPE is relative, the smear gate stops at BOS). Without the
    mask they differ. Looping on, so the repeated blocks are covered too."""
    torch.manual_seed(0)
    h = tiny_h(DOC_MASK=1, ATTN_GATE=1, SMEAR_GATE=1)
    masked = randomize(tg.GPT(h), seed=2)
    plain = tg.GPT(tiny_h(ATTN_GATE=1, SMEAR_GATE=1))
    plain.load_state_dict(masked.state_dict())
    g = torch.Generator().manual_seed(3)
    first, second = torch.randint(2, 96, (1, 13), generator=g), torch.randint(2, 96, (1, 11), generator=g)
    first[0, 0] = second[0, 0] = tg.BOS_ID
    both = torch.cat((first, second), dim=1)
    for model in (masked, plain):
        model.looping = True
    with torch.no_grad():
        alone = masked.forward_hidden(second)
        after = masked.forward_hidden(both)[:, first.size(1):]
        torch.testing.assert_close(after, alone, rtol=1e-5, atol=1e-5)
        leaked = plain.forward_hidden(both)[:, first.size(1):]
        assert (leaked - alone).abs().amax() > 1e-3


def test_doc_mask_trains_and_survives_the_artifact(tmp_path):
    h = tiny_h(DOC_MASK=1, QUANT_MIN_NUMEL=0)
    model = randomize(tg.GPT(h), seed=4)
    ids = rows_with_documents([[0, 9], [3]], 20)
    model(ids[:, :-1], ids[:, 1:]).backward()
    assert model.blocks[0].attn.c_q.weight.grad.abs().sum() > 0
    state = {k: v.detach() for k, v in model.state_dict().items()}
    qt = [tg.QuantizedTensor(n, tuple(t.shape), 16, values=t.half().numpy()) for n, t in state.items()]
    path = tmp_path / "doc_mask.ptz"
    path.write_bytes(tg.serialize_artifact(qt, h.model_config(), "brotli", h.eval_config()))
    loaded, hh = tg.load_eval_model(path, tiny_h(), torch.device("cpu"))  # the artifact's DOC_MASK wins
    assert hh.doc_mask
    # An artifact written before the switch existed has no DOC_MASK key: it was made without the mask.
    old_config = {k: v for k, v in tiny_h().model_config().items() if k != "DOC_MASK"}
    plain = tg.GPT(tiny_h())
    qt = [tg.QuantizedTensor(n, tuple(t.shape), 16, values=t.detach().half().numpy()) for n, t in plain.state_dict().items()]
    path.write_bytes(tg.serialize_artifact(qt, old_config, "brotli", tiny_h().eval_config()))
    _, hh = tg.load_eval_model(path, tiny_h(DOC_MASK=1), torch.device("cpu"))
    assert not hh.doc_mask


def test_compiled_flex_path_matches_eager_and_compiles_once_for_any_layout():
    """COMPILE=1 on CPU (inductor): the blocks take the flex kernel, give the eager (masked SDPA) numbers, and
    a new document layout of the same shape reuses the compiled graphs (no recompilation every step)."""
    h = tiny_h(NUM_LAYERS=2, MODEL_DIM=32, EMBEDDING_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, XSA_LAST_N=2, NUM_LOOPS=0,
               PARALLEL_RESIDUAL_START=1, ROPE_DIMS=8, DOC_MASK=1, COMPILE=1)
    model = randomize(tg.GPT(h), seed=1)
    rows = [rows_with_documents([[0, 60, 200]], 2 * BLOCK, seed=0), rows_with_documents([[7, 128, 129]], 2 * BLOCK, seed=1)]
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = [model.forward_hidden(ids) for ids in rows]
            model.use_runtime(tg.build_runtime(h, torch.device("cpu")))
            compiled = [model.forward_hidden(rows[0])]
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert frames > 0  # the counter does count this model's compiled graphs
            compiled.append(model.forward_hidden(rows[1]))
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # the second layout compiled nothing
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # the compiled block's one graph holds the flex kernel; eager calls take the masked SDPA path
        x = torch.randn(1, 2 * BLOCK, 32)
        cos, sin = model._rope(2 * BLOCK, "cpu")
        with torch.no_grad():
            doc = tg.documents(rows[0], True, None, flex=True)
            traced = torch._dynamo.explain(tg.run_block)(model.blocks[0], x, x.clone(), cos, sin, doc)
        code = traced.graphs[0].code
        assert traced.graph_count == 1 and "flex_attention" in code
        # the tile mask enters as an input: no sort in the block's graph (inductor's Triton sort kernel made
        # wrong tile lists on the H200, bench/flex_check.py)
        assert "sort" not in code
    finally:
        torch._dynamo.reset()


def test_eager_blocks_never_take_flex(monkeypatch):
    """GPTQ's hooks and document TTT run the blocks eagerly inside a compiled runtime: they must get masked SDPA
    (eager flex is a slow reference that builds the whole score matrix)."""
    def refuse(*args, **kwargs):
        raise AssertionError("flex attention called eagerly")

    monkeypatch.setattr(tg, "flex_attention", refuse)
    h = tiny_h(DOC_MASK=1, COMPILE=1)
    model = randomize(tg.GPT(h), seed=1)
    model.use_runtime(tg.Runtime(compiled=True))  # compiled flag, eager functions: what those two paths use
    with torch.no_grad():
        model.forward_hidden(rows_with_documents([[0, 100]], 2 * BLOCK))


# ---------------------------------------------------------------------------------------- span schedule


def test_span_schedule_parses_and_steps():
    spans = tg.parse_span_schedule("1024@0.1, 2048@0.7", 3072)
    assert spans == [(1024, 0.1), (2048, 0.7)]
    assert [tg.span_at(f, spans, 3072) for f in (0.0, 0.0999, 0.1, 0.69, 0.7, 1.0)] == [1024, 1024, 2048, 2048, 3072, 3072]
    assert tg.parse_span_schedule("", 2048) == [] and tg.span_at(0.5, [], 2048) == 2048
    assert tiny_h(TRAIN_SPAN_SCHEDULE="8@0.5").train_spans == [(8, 0.5)]


@pytest.mark.parametrize("text", ["1024", "1024@x", "2048@0.1,1024@0.7", "1024@0.7,2048@0.1", "4096@0.1", "1024@0", "1024@1.5"])
def test_span_schedule_refuses_what_it_cannot_mean(text):
    with pytest.raises(tg.ConfigError, match="TRAIN_SPAN_SCHEDULE"):
        tg.parse_span_schedule(text, 3072)


def test_document_ids_cut_at_every_span():
    ids = torch.tensor([[5, 5, tg.BOS_ID, 5, 5, 5, 5, 5]])
    assert tg.document_ids(ids, documents=False, span=3).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]
    assert tg.document_ids(ids, documents=True, span=3).tolist() == [[0, 0, 1, 2, 2, 2, 3, 3]]
    assert tg.document_ids(ids, documents=False, span=8).tolist() == [[0] * 8]


@pytest.mark.parametrize("doc_mask", [0, 1])
def test_a_span_sees_only_itself(doc_mask):
    """With attention_span s, the second span of a row computes what it computes alone (smear gate off: it
    reads the one token before the cut, which is not attention)."""
    h = tiny_h(DOC_MASK=doc_mask, SMEAR_GATE=0)
    model = randomize(tg.GPT(h), seed=5)
    ids = torch.randint(2, 96, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole = model.forward_hidden(ids)
        model.attention_span = 12
        cut = model.forward_hidden(ids)
        model.attention_span = None
        second = model.forward_hidden(ids[:, 12:])
    torch.testing.assert_close(cut[:, 12:], second, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cut[:, :12], whole[:, :12], rtol=1e-5, atol=1e-5)
    assert (cut[:, 12:] - whole[:, 12:]).abs().amax() > 1e-3
