"""The network: layer order, parameter count, block formulas, attention details, causality, compile."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from conftest import tiny_h  # noqa: E402

CPU = torch.device("cpu")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3):
    """Zero-initialized projections and unit gains would hide most of the computation: perturb everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_model(seed=0, **overrides) -> tg.GPT:
    torch.manual_seed(seed)
    return randomize(tg.GPT(tiny_h(**overrides)), seed)


# ---------------------------------------------------------------------------------------- layer order


def test_layer_order_record_with_and_without_looping():
    enc, dec = tg.layer_order(11, 2, 3, 5, looping=True)
    assert enc == [0, 1, 2, 3, 4, 5, 3, 4]
    assert dec == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert len(enc + dec) == 17
    enc, dec = tg.layer_order(11, 2, 3, 5, looping=False)
    assert enc == [0, 1, 2, 3, 4] and dec == [5, 6, 7, 8, 9, 10]
    assert tg.layer_order(11, 0, 3, 5, looping=True) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert tg.layer_order(4, 1, 1, 2, looping=True) == ([0, 1, 2], [1, 2, 3])


def test_model_layer_order_follows_the_looping_switch():
    h = tg.Hyperparameters(environ={"PRESET": "record"}, cuda_available=True)
    model = tg.GPT.__new__(tg.GPT)  # layer_order needs only h and looping
    torch.nn.Module.__init__(model)
    model.h, model.looping = h, False
    assert model.layer_order() == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    model.looping = True
    assert model.layer_order() == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])


def test_record_model_parameter_count_and_layout():
    h = tg.Hyperparameters(environ={"PRESET": "record"}, cuda_available=True)
    torch.manual_seed(0)
    model = tg.GPT(h)
    # the record's 35,944,536 (SPEC §4), plus the gates kept in issue 16: 8 x 12 per layer's attention, 12 + 1 smear
    assert sum(p.numel() for p in model.parameters()) == 35_944_536 + 11 * 8 * 12 + 13
    plain = tg.GPT(tg.Hyperparameters(environ={"PRESET": "record", "ATTN_GATE": "0", "SMEAR_GATE": "0"}, cuda_available=True))
    assert sum(p.numel() for p in plain.parameters()) == 35_944_536
    assert model.tok_emb.weight.shape == (8192, 512) and model.lm_head is None
    assert model.embed_proj is None and model.head_proj is None
    b = model.blocks[0]
    assert b.attn.c_q.weight.shape == (512, 512) and b.attn.c_k.weight.shape == (256, 512)
    assert b.mlp.fc.weight.shape == (2048, 512) and b.mlp.proj.weight.shape == (512, 2048)
    assert model.skip_weights.shape == (8, 512) and model.skip_gates.shape == (8, 512)
    assert [blk.parallel for blk in model.blocks] == [False] * 7 + [True] * 4
    assert all(blk.attn.use_xsa for blk in model.blocks)
    assert [round(float(blk.ln_scale), 6) for blk in model.blocks] == [round(1 / math.sqrt(i + 1), 6) for i in range(11)]
    # init: embedding std 0.005, output projections zero, other matrices orthogonal, q gain 5.25
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 2e-4
    assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()
    q = b.attn.c_q.weight
    assert torch.allclose(q @ q.T, torch.eye(512), atol=1e-4)
    fc = b.mlp.fc.weight  # 2048 x 512: orthonormal columns
    assert torch.allclose(fc.T @ fc, torch.eye(512), atol=1e-4)
    assert torch.all(b.attn.q_gain == 5.25)


# ---------------------------------------------------------------------------------------- blocks


def _stream(h, seed=1, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, h.model_dim, generator=g)
    x0 = torch.randn(B, T, h.model_dim, generator=g)
    cos, sin = tg.rope_tables(T, h.rope_dims, h.rope_base, CPU)
    return x, x0, cos, sin


def test_parallel_block_is_the_gpt_j_formula():
    model = tiny_model()
    h = model.h
    block = model.blocks[3]
    assert block.parallel
    x, x0, cos, sin = _stream(h)
    with torch.no_grad():
        out = block(x, x0, cos, sin)
        xm = block.resid_mix[0] * x + block.resid_mix[1] * x0
        n = F.rms_norm(xm, (h.model_dim,)) / math.sqrt(3 + 1)
        want = xm + block.attn_scale * block.attn(n, cos, sin) + block.mlp_scale * block.mlp(n)
        # and it is not the sequential formula
        x1 = xm + block.attn_scale * block.attn(n, cos, sin)
        seq = x1 + block.mlp_scale * block.mlp(F.rms_norm(x1, (h.model_dim,)) / 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)  # fp32: scale on the weight, not the output
    assert (out - seq).abs().max() > 1e-3


def test_sequential_block_is_the_pre_norm_formula():
    model = tiny_model()
    h = model.h
    block = model.blocks[1]
    assert not block.parallel
    x, x0, cos, sin = _stream(h)
    s = 1 / math.sqrt(1 + 1)
    with torch.no_grad():
        out = block(x, x0, cos, sin)
        xm = block.resid_mix[0] * x + block.resid_mix[1] * x0
        x1 = xm + block.attn_scale * block.attn(F.rms_norm(xm, (h.model_dim,)) * s, cos, sin)
        want = x1 + block.mlp_scale * block.mlp(F.rms_norm(x1, (h.model_dim,)) * s)
        n = F.rms_norm(xm, (h.model_dim,)) * s
        par = xm + block.attn_scale * block.attn(n, cos, sin) + block.mlp_scale * block.mlp(n)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)  # fp32: scale on the weight, not the output
    assert (out - par).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [1, 3])
def test_scales_folded_into_projections_give_the_gradients_of_scaling_outputs(layer):
    """attn_scale and mlp_scale multiply the projections' weight rows (CastedLinear's out_scale) instead
    of the outputs: the block's output and every parameter's gradient must be those of the plain formula."""
    model = tiny_model(seed=7)
    h, block = model.h, model.blocks[layer]
    x, x0, cos, sin = _stream(h)
    s = 1 / math.sqrt(layer + 1)

    def plain(x, x0):
        xm = block.resid_mix[0] * x + block.resid_mix[1] * x0
        n = F.rms_norm(xm, (h.model_dim,)) * s
        if block.parallel:
            return xm + block.attn_scale * block.attn(n, cos, sin) + block.mlp_scale * block.mlp(n)
        x1 = xm + block.attn_scale * block.attn(n, cos, sin)
        return x1 + block.mlp_scale * block.mlp(F.rms_norm(x1, (h.model_dim,)) * s)

    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (block, plain):
        block.zero_grad(set_to_none=True)
        xi, x0i = x.clone().requires_grad_(), x0.clone().requires_grad_()
        out = fn(xi, x0i) if fn is plain else fn(xi, x0i, cos, sin)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        results.append((out.detach(), xi.grad, x0i.grad, grads))
    (out_f, dx_f, dx0_f, g_f), (out_p, dx_p, dx0_p, g_p) = results
    assert block.parallel == (layer >= h.parallel_residual_start)
    assert g_f.keys() == g_p.keys() and {"attn_scale", "mlp_scale", "attn.proj.weight", "mlp.proj.weight"} <= g_f.keys()
    pairs = {"output": (out_f, out_p), "x": (dx_f, dx_p), "x0": (dx0_f, dx0_p)} | {n: (g_f[n], g_p[n]) for n in g_p}
    for name, (got, want) in pairs.items():  # fp32 sums in another order: compare relative to the largest entry
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
    assert g_p["attn_scale"].abs().max() > 1e-3 and g_p["mlp_scale"].abs().max() > 1e-3


def test_mlp_is_leaky_relu_half_squared():
    model = tiny_model()
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        hid = x @ mlp.fc.weight.T
        act = torch.where(hid > 0, hid, 0.5 * hid) ** 2
        want = act @ mlp.proj.weight.T
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    assert mlp.fc.weight.shape == (256, 64)


def reference_attention(attn: tg.Attention, x, cos, sin):
    """Straight from the description: per-head RMS-norm of q and k, partial RoPE, q gain, causal softmax
    attention with GQA (query head i reads KV head i // group), XSA, the output gate, output projection."""
    B, T, D = x.shape
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.c_q.weight.T).view(B, T, H, hd)
    k = (x @ attn.c_k.weight.T).view(B, T, Hkv, hd)
    v = (x @ attn.c_v.weight.T).view(B, T, Hkv, hd)
    q = q / q.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
    k = k / k.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
    half = cos.size(-1)

    def rope(t):
        out = t.clone()
        for pos in range(T):
            for i in range(half):
                a, b = t[:, pos, :, i], t[:, pos, :, i + half]
                out[:, pos, :, i] = a * cos[pos, i] - b * sin[pos, i]
                out[:, pos, :, i + half] = a * sin[pos, i] + b * cos[pos, i]
        return out

    q, k = rope(q), rope(k)
    q = q * attn.q_gain[None, None, :, None]
    group = H // Hkv
    y = torch.zeros(B, T, H, hd)
    mask = torch.ones(T, T).tril().bool()
    for head in range(H):
        kv = head // group
        scores = (q[:, :, head] @ k[:, :, kv].transpose(1, 2)) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        y[:, :, head] = scores.softmax(-1) @ v[:, :, kv]
        if attn.use_xsa:
            vn = v[:, :, kv] / v[:, :, kv].norm(dim=-1, keepdim=True)
            y[:, :, head] -= (y[:, :, head] * vn).sum(-1, keepdim=True) * vn
        if attn.gate is not None:  # ATTN_GATE: the head's output times sigmoid(w_head . x[:dims])
            y[:, :, head] *= torch.sigmoid(x[..., :attn.gate.size(1)] @ attn.gate[head])[..., None]
    return y.reshape(B, T, D) @ attn.proj.weight.T


@pytest.mark.parametrize("xsa", [True, False])
def test_attention_matches_a_reference_implementation(xsa):
    model = tiny_model(XSA_LAST_N=4 if xsa else 0)
    attn = model.blocks[0].attn
    assert attn.use_xsa is xsa
    x, _, cos, sin = _stream(model.h, T=12)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), rtol=1e-4, atol=1e-4)


def test_xsa_only_on_the_last_n_layers():
    model = tiny_model(XSA_LAST_N=2)
    assert [b.attn.use_xsa for b in model.blocks] == [False, False, True, True]


def test_xsa_output_is_orthogonal_to_its_groups_value():
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 2, 7, 8, 2, 16
    y = torch.randn(B, T, H, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    out = tg.remove_self_value(y, v)
    group = H // Hkv
    for head in range(H):
        vn = F.normalize(v[:, :, head // group], dim=-1)
        assert (out[:, :, head] * vn).sum(-1).abs().max() < 1e-5
        # only the component along vn was removed
        removed = y[:, :, head] - out[:, :, head]
        torch.testing.assert_close(removed, (y[:, :, head] * vn).sum(-1, keepdim=True) * vn, rtol=1e-5, atol=1e-5)
        # and not orthogonal to the other groups' values in general
        other = F.normalize(v[:, :, (head // group + 1) % Hkv], dim=-1)
        assert (out[:, :, head] * other).sum(-1).abs().max() > 1e-2


def test_xsa_inside_attention_uses_the_heads_own_value():
    model = tiny_model(XSA_LAST_N=4)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(64))  # expose the per-head outputs
        x, _, cos, sin = _stream(model.h, T=10)
        y = attn(x, cos, sin).view(2, 10, 4, 16)
        v = (x @ attn.c_v.weight.T).view(2, 10, 2, 16)
    for head in range(4):
        vn = F.normalize(v[:, :, head // 2], dim=-1)
        assert (y[:, :, head] * vn).sum(-1).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------- RoPE


def test_partial_rope_rotates_only_the_first_dims_and_keeps_pair_norms():
    T, rope_dims, D = 20, 16, 64
    cos, sin = tg.rope_tables(T, rope_dims, 10000.0, CPU)
    assert cos.shape == (T, rope_dims // 2)
    x = torch.randn(3, T, 4, D)
    out = tg.apply_partial_rope(x, cos, sin)
    assert torch.equal(out[..., rope_dims:], x[..., rope_dims:])
    half = rope_dims // 2
    for i in range(half):
        n_in = torch.hypot(x[..., i], x[..., i + half])
        n_out = torch.hypot(out[..., i], out[..., i + half])
        torch.testing.assert_close(n_out, n_in, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: angle 0
    assert (out[:, 1:, :, :rope_dims] - x[:, 1:, :, :rope_dims]).abs().max() > 1e-2
    # frequencies: base^(-2i/rope_dims), first pair turns one radian per position
    inv = 1.0 / 10000.0 ** (torch.arange(0, rope_dims, 2).float() / rope_dims)
    torch.testing.assert_close(cos, torch.cos(torch.arange(T).float()[:, None] * inv))


def test_rope_scores_depend_only_on_relative_position():
    T = 12
    cos, sin = tg.rope_tables(T, 16, 10000.0, CPU)
    q = torch.randn(1, 1, 1, 32).expand(1, T, 1, 32)
    k = torch.randn(1, 1, 1, 32).expand(1, T, 1, 32)
    rq, rk = tg.apply_partial_rope(q, cos, sin)[0, :, 0], tg.apply_partial_rope(k, cos, sin)[0, :, 0]
    scores = rq @ rk.T
    for d in range(-3, 4):
        diag = torch.diagonal(scores, d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)


def test_model_rope_dims_default_to_the_full_head():
    assert tiny_model(ROPE_DIMS=0).rope_dims == 16
    assert tiny_model(ROPE_DIMS=8).rope_dims == 8


# ---------------------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("looping,gates", [(False, False), (True, False), (True, True)])
def test_model_is_causal(looping, gates):
    # gates: the smear reads t-1 only; and the last block carries two lanes
    model = tiny_model(**(dict(ATTN_GATE=1, SMEAR_GATE=1, TWO_LANE_START=3) if gates else dict(ATTN_GATE=0, SMEAR_GATE=0)))
    model.looping = looping
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    t = 13
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 7) % 96
    with torch.no_grad():
        a, b = model.forward_hidden(ids), model.forward_hidden(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_looping_changes_the_computation_and_uses_all_skips():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.forward_hidden(ids)
        model.looping = True
        looped = model.forward_hidden(ids)
    assert (plain - looped).abs().max() > 1e-3
    enc, dec = model.layer_order()
    assert model.skip_weights.size(0) == min(len(enc), len(dec)) == 3
    # every skip weight gets a gradient with looping on
    model.zero_grad()
    model(ids[:, :-1], ids[:, 1:]).backward()
    assert (model.skip_weights.grad.abs().sum(-1) > 0).all()
    assert (model.skip_gates.grad.abs().sum(-1) > 0).all()


def test_loss_is_softcapped_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.forward_hidden(ids[:, :-1])
        z = hidden @ model.tok_emb.weight.T  # tied head
        logits = 30 * torch.tanh(z / 30)
        want = F.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(model(ids[:, :-1], ids[:, 1:]), want, rtol=1e-5, atol=1e-5)
        nll = tg.head_nll(hidden, model.head_weight(), ids[:, 1:], 30.0)
        torch.testing.assert_close(nll.mean(), want, rtol=1e-5, atol=1e-5)


def test_gqa_native_and_repeat_agree():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 9, 8, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g)
    native = tg.causal_attention(q, k, v, "sdpa", native_gqa=True)
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 16), generator=g)
    with torch.no_grad():
        out_native = model.forward_hidden(ids)
    repeat = tg.causal_attention(q, k, v, "sdpa", native_gqa=False)
    model.use_runtime(tg.build_runtime(tiny_h(SDPA_GQA="repeat"), CPU))
    with torch.no_grad():
        out_repeat = model.forward_hidden(ids)
    torch.testing.assert_close(native, repeat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_native, out_repeat, rtol=1e-5, atol=1e-5)
    # both equal attention with K/V copied per query head
    full = tg.causal_attention(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2))
    torch.testing.assert_close(native, full, rtol=1e-5, atol=1e-6)


def test_runtime_sets_gqa_mode_and_reaches_every_attention_module():
    model = tiny_model()
    assert model.runtime is tg.EAGER
    runtime = tg.build_runtime(tiny_h(SDPA_GQA="repeat"), CPU)
    desc = runtime.describe()
    assert "attention:sdpa" in desc and "gqa:repeat" in desc and "compile:0" in desc and runtime.native_gqa is False
    assert runtime.block is tg.run_block and runtime.head_loss is tg.head_loss
    model.use_runtime(runtime)
    assert all(block.attn.runtime is runtime for block in model.blocks)
    assert tg.build_runtime(tiny_h(), CPU).native_gqa is True
    assert tg.EAGER.native_gqa is True  # building a runtime changes no shared state


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's compile stack
def test_compiled_blocks_match_eager_and_share_graphs(monkeypatch):
    """COMPILE=1 on CPU (inductor): one graph per block kind (sequential, parallel), reused by every block of
    that kind and by the looped order; results equal eager."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    h = tiny_h(NUM_LAYERS=2, MODEL_DIM=32, EMBEDDING_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, XSA_LAST_N=2,
               LOOP_START=0, LOOP_END=1, NUM_LOOPS=1, PARALLEL_RESIDUAL_START=1, ROPE_DIMS=8, COMPILE=1)
    torch.manual_seed(0)
    model = randomize(tg.GPT(h))
    assert [b.parallel for b in model.blocks] == [False, True]
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            eager = model.forward_hidden(ids)
            model.looping = True
            eager_loop = model.forward_hidden(ids)
            model.looping = False
            runtime = tg.build_runtime(h, CPU)
            assert "compile:1" in runtime.describe()
            model.use_runtime(runtime)
            assert model.runtime.block is not tg.run_block
            compiled = model.forward_hidden(ids)
            graphs_plain = counters["stats"]["unique_graphs"]
            model.looping = True
            compiled_loop = model.forward_hidden(ids)
            graphs_loop = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_loop, eager_loop, rtol=1e-5, atol=1e-5)
        # one graph per block kind (sequential, parallel) and one for the U-Net skip merge
        assert graphs_plain <= 3, f"{graphs_plain} graphs for one sequential block, one parallel block and the skip merge"
        assert graphs_loop == graphs_plain, f"looping added {graphs_loop - graphs_plain} graph(s)"
    finally:
        torch._dynamo.reset()


def test_fan_out_of_x0_gives_the_gradients_of_plain_reuse(monkeypatch):
    """x0 feeds every block through FanOut, whose backward sums the blocks' gradients in one pass; the
    loss and every gradient must equal those of handing x0 itself to each block (autograd's own sums)."""
    model = tiny_model(seed=5)
    model.looping = True
    ids = torch.randint(0, model.h.vocab_size, (2, model.h.train_seq_len + 1), generator=torch.Generator().manual_seed(5))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fanned = loss_and_grads()
    calls = []
    monkeypatch.setattr(tg.FanOut, "apply", lambda x, n, sum_fn: calls.append(n) or [x] * n)
    plain = loss_and_grads()
    assert calls == [len(sum(model.layer_order(), []))]  # one fan-out per forward, one use per virtual layer
    assert fanned[0] == plain[0]
    for name, grad in plain[1].items():
        torch.testing.assert_close(fanned[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
