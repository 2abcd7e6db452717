"""Quantization: SDClip grid, GPTQ (error feedback, batching, degenerate Hessians) and quantize_model on a
tiny GPT. CPU only, a few seconds."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RandomTokens, tiny_settings

import train_gpt as tg

QMAX = {b: 2 ** (b - 1) - 1 for b in range(2, 9)}


def correlated_layer(rows: int, cols: int, n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs X = Z @ A with a random mixing A plus a strong shared component (so the columns of X are
    strongly correlated), and a weight matrix W (rows, cols)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, cols, generator=g)
    A = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    A = A + 0.9 * torch.randn(1, cols, generator=g).expand(cols, cols)
    W = 0.05 * torch.randn(rows, cols, generator=g)
    return Z @ A, W


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.size(0)


def dequant(Q: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    return Q.float() * S[..., None]


def output_error(X: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor) -> float:
    return float((X @ W.T - X @ Wq.T).norm())


# The row scales are stored as (one float32 top scale per matrix, one uint8 log code per row); these two
# adapters turn what the script returns into plain float32 scale tensors.


def grid_scales(W: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Row scales of a batch of matrices (n, rows, cols) -> (scales (n, rows), top (n,), codes (n, rows))."""
    top, codes = tg.sdclip_scales(W, bits, clip)
    return torch.from_numpy(tg.scales_from_codes(top, codes)), top, codes


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, clip: float, **kwargs):
    """gptq_quantize -> (int8 codes (n, rows, cols), float32 row scales (n, rows), (top, scale codes))."""
    Q, top, codes = tg.gptq_quantize(W, H, bits, clip, **kwargs)
    return Q, torch.from_numpy(tg.scales_from_codes(top, codes)), (top, codes)


# ------------------------------------------------------------------------------------------------
# The SDClip grid and round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_round_trip_error_bound(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 512, generator=g) * torch.linspace(0.01, 2.0, 24)[:, None]  # rows of very different scale
    # a few outliers: with 512 values per row one outlier sits ~22 std out, beyond even k = 12.85
    W[0, 0], W[5, 7], W[23, 511] = 40.0, -50.0, 400.0
    clip = 2.5 if bits <= 3 else 12.85  # small k at low bits puts plenty of entries outside the range
    qmax = QMAX[bits]
    scales, top, codes = grid_scales(W[None], bits, clip)
    scale = scales[0]
    assert scale.shape == (24,) and scale.dtype == torch.float32
    assert top.dtype == np.float32 and codes.dtype == np.uint8 and codes.shape == (1, 24)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    # stored exactly: the top scale survives float32 storage, and the row scales follow from (top, codes)
    assert np.float32(float(top[0])) == top[0]
    assert torch.equal(scale, torch.from_numpy(tg.scales_from_codes(np.array([float(top[0])], np.float32), codes))[0])
    # ... and they are SDClip's k * std / qmax, up to half a step of the log grid
    sdclip = clip * W.double().std(dim=-1) / qmax
    assert float(scale.max()) == pytest.approx(float(sdclip.max()), rel=1e-6)
    step = 2 ** (1 / tg.SCALE_STEPS_PER_OCTAVE)
    assert ((scale.double() / sdclip - 1).abs() <= (step ** 0.5 - 1) * 1.0001).all()

    q = tg.round_to_grid(W, scale, bits)
    assert torch.equal(q, q.round()) and q.abs().max() <= qmax
    deq = q * scale[:, None]
    inside = W.abs() <= qmax * scale[:, None]
    assert inside.float().mean() > 0.5 and (~inside).any()
    err = (W - deq).abs()
    bound = (scale[:, None] / 2).expand_as(W)
    assert (err[inside] <= bound[inside] * (1 + 1e-6)).all(), float((err - bound)[inside].max())
    # entries outside the clip range land on the extreme grid point of their sign
    assert torch.equal(deq[~inside], (torch.sign(W) * qmax * scale[:, None])[~inside])

    # GPTQ with a diagonal Hessian has no error to feed back: it is round-to-nearest on the same grid
    H = torch.diag(torch.rand(512, generator=g) + 0.5)
    Q, S, (top2, codes2) = gptq(W[None], H[None], bits, clip)
    assert Q.dtype == torch.int8 and Q.shape == (1, 24, 512) and S.shape == (1, 24)
    assert torch.equal(S[0], scale) and np.array_equal(codes2, codes) and np.array_equal(top2, top)
    assert torch.equal(Q[0].float(), q)

    # what the artifact stores (int8 codes, top scale, uint8 scale codes) dequantizes to exactly the same values
    qt = tg.QuantizedTensor("w", (24, 512), bits, codes=Q[0].numpy(), scale_top=float(top2[0]), scale_codes=codes2[0])
    assert torch.equal(qt.dequantize(), deq)


@pytest.mark.parametrize("bits", range(2, 9))
def test_gptq_codes_stay_on_the_grid(bits):
    X, W = correlated_layer(40, 72, n=1024, seed=10 + bits)
    Q, S, _ = gptq(W[None], hessian_of(X)[None], bits, 12.85)
    assert Q.dtype == torch.int8
    assert int(Q.abs().max()) <= QMAX[bits]
    assert (S > 0).all() and torch.isfinite(dequant(Q, S)).all()


def test_fp16_plain_tensor_round_trip():
    v = torch.randn(3, 5)
    qt = tg.QuantizedTensor("x", (3, 5), 16, values=v.half().numpy())
    assert torch.equal(qt.dequantize(), v.half().float())
    assert qt.dequantize().shape == (3, 5)


def test_zero_rows_and_zero_matrices_get_usable_scales():
    """A row of zeros, or a whole zero matrix (a zero-initialized projection that was never trained), must
    not produce a zero scale: GPTQ divides by the scale, and 0/0 NaNs would decide the codes (NaN -> int8
    is undefined behaviour that merely happens to give 0 on x86)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 6, 32, generator=g)
    W[0, 2] = 0.0
    W[1] = 0.0
    scales, _, _ = grid_scales(W, 6, 12.85)
    assert (scales > 0).all() and torch.isfinite(scales).all(), scales
    X = torch.randn(256, 32, generator=g)
    H = hessian_of(X)[None].expand(2, 32, 32)
    Q, S, _ = gptq(W, H, 6, 12.85)
    assert (Q[0, 2] == 0).all() and (Q[1] == 0).all()
    deq = dequant(Q, S)
    assert torch.isfinite(deq).all() and (deq[0, 2] == 0).all() and (deq[1] == 0).all()


# ------------------------------------------------------------------------------------------------
# GPTQ proper
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    X, W = correlated_layer(64, 96, seed=bits)
    H = hessian_of(X)
    Q, S, _ = gptq(W[None], H[None], bits, 12.85)
    rtn = tg.round_to_grid(W, S[0], bits) * S[0][:, None]  # same scales, no error feedback
    e_gptq = output_error(X, W, dequant(Q, S)[0])
    e_rtn = output_error(X, W, rtn)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def test_gptq_block_size_does_not_change_the_objective_much():
    """Blocking is an implementation detail (lazy batch updates): any block size gives a GPTQ-quality
    result, far better than round-to-nearest."""
    X, W = correlated_layer(32, 80, seed=3)
    H = hessian_of(X)
    errs = []
    for block in (1, 16, 128):
        Q, S, _ = gptq(W[None], H[None], 4, 12.85, block=block)
        errs.append(output_error(X, W, dequant(Q, S)[0]))
    rtn = output_error(X, W, tg.round_to_grid(W, S[0], 4) * S[0][:, None])
    assert max(errs) < 0.5 * rtn
    assert max(errs) < 1.05 * min(errs)


def test_batched_gptq_equals_per_matrix_calls():
    g = torch.Generator().manual_seed(1)
    n, rows, cols = 3, 48, 80
    W = torch.randn(n, rows, cols, generator=g) * torch.tensor([0.02, 1.0, 0.3])[:, None, None]
    Hs = []
    for i in range(n):
        X = torch.randn(300, cols, generator=g) @ torch.randn(cols, cols, generator=g)
        if i == 2:
            X[:, [4, 9, 77]] = 0.0  # this one has dead inputs, the others don't
        Hs.append(hessian_of(X))
    H = torch.stack(Hs)
    notes_b: list[str] = []
    Qb, Sb, (top_b, codes_b) = gptq(W, H, 5, 12.85, block=32, notes=notes_b)
    assert Qb.shape == (n, rows, cols) and Sb.shape == (n, rows) and top_b.shape == (n,) and codes_b.shape == (n, rows)
    for i in range(n):
        Q1, S1, (top1, codes1) = gptq(W[i:i + 1], H[i:i + 1], 5, 12.85, block=32)
        assert torch.equal(Q1[0], Qb[i]), f"matrix {i}: {(Q1[0] != Qb[i]).sum()} codes differ"
        assert torch.equal(S1[0], Sb[i]) and top1[0] == top_b[i] and np.array_equal(codes1[0], codes_b[i])
    assert (Qb[2][:, [4, 9, 77]] == 0).all()
    assert any("dead" in note for note in notes_b)


def test_dead_columns_are_handled():
    X, W = correlated_layer(32, 64, n=2048, seed=5)
    dead = [0, 13, 14, 63]
    X[:, dead] = 0.0
    H = hessian_of(X)
    assert (torch.diagonal(H)[dead] == 0).all()
    notes: list[str] = []
    Q, S, _ = gptq(W[None], H[None], 6, 12.85, notes=notes)
    deq = dequant(Q, S)[0]
    assert torch.isfinite(deq).all()
    assert (Q[0][:, dead] == 0).all(), "weights of inputs that never fire are stored as zero"
    assert any("dead" in note and "4" in note for note in notes), notes
    assert torch.equal(S, grid_scales(W[None], 6, 12.85)[0]), "dead columns must not change the row scales"
    # the live part is still quantized GPTQ-style (the dead columns contribute nothing to X @ W^T)
    rtn = tg.round_to_grid(W, S[0], 6) * S[0][:, None]
    assert output_error(X, W, deq) < 0.5 * output_error(X, W, rtn)


def test_all_dead_hessian():
    W = torch.randn(1, 8, 16)
    notes: list[str] = []
    Q, S, _ = gptq(W, torch.zeros(1, 16, 16), 6, 12.85, notes=notes)
    assert (Q == 0).all() and torch.isfinite(S).all()
    assert any("16 dead" in note for note in notes), notes


def test_rank_deficient_hessian():
    """Fewer calibration rows than inputs: H = X^T X is singular (but PSD). Dampening makes it usable."""
    g = torch.Generator().manual_seed(7)
    cols = 64
    X = torch.randn(12, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    H = hessian_of(X)
    assert torch.linalg.matrix_rank(H) <= 12
    W = 0.1 * torch.randn(16, cols, generator=g)
    Q, S, _ = gptq(W[None], H[None], 4, 12.85)
    deq = dequant(Q, S)[0]
    assert torch.isfinite(deq).all() and int(Q.abs().max()) <= QMAX[4]
    rtn = tg.round_to_grid(W, S[0], 4) * S[0][:, None]
    assert output_error(X, W, deq) < output_error(X, W, rtn)


def test_indefinite_hessian_is_damped_until_cholesky_works():
    """A numerically broken H (symmetric, positive diagonal, a negative eigenvalue) must not crash:
    GPTQ raises the dampening, says so in its notes, and still returns codes on the grid."""
    cols = 32
    H = 2.0 * torch.ones(cols, cols) - torch.eye(cols)  # eigenvalues 2*cols-1 and -1, diagonal 1
    assert torch.linalg.eigvalsh(H).min() < 0
    W = torch.randn(1, 8, cols)
    notes: list[str] = []
    Q, S, _ = gptq(W, H[None], 6, 12.85, notes=notes)
    assert torch.isfinite(dequant(Q, S)).all() and int(Q.abs().max()) <= QMAX[6]
    assert any("Cholesky" in note for note in notes), notes


# ------------------------------------------------------------------------------------------------
# quantize_model on a tiny GPT
# ------------------------------------------------------------------------------------------------



def tiny_model(**overrides) -> tuple[tg.GPT, tg.Hyperparameters]:
    h = tg.Hyperparameters(tiny_settings(Path("/nonexistent"), **overrides), cuda_available=False)
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():  # a "trained" model: no zero-initialized matrices left
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    return model, h


def stored_scales(t: tg.QuantizedTensor) -> np.ndarray:
    """The float32 row scales a QuantizedTensor stands for."""
    return tg.scales_from_codes(np.array([t.scale_top], dtype=np.float32), t.scale_codes[None])[0]


@pytest.fixture(scope="module")
def quantized_tiny():
    model, h = tiny_model()
    hessians = tg.collect_hessians(model, RandomTokens(h.vocab_size, 4, h.train_seq_len), h, torch.device("cpu"))
    tensors, notes = tg.quantize_model(model, hessians, h)
    return model, h, hessians, tensors, notes


def test_hessians_cover_every_quantized_input(quantized_tiny):
    model, h, hessians, _, _ = quantized_tiny
    names = tg.quantized_weight_names(model, h.quant_min_numel)
    expected = {tg.hessian_key(n) for n in names if n != "tok_emb.weight"} | {"head"}
    assert set(hessians) == expected
    assert not any(".attn.c_k." in k or ".attn.c_v." in k for k in hessians), "k and v read the same input as q"
    params = dict(model.named_parameters())
    for key, H in hessians.items():
        cols = h.embedding_dim if key == "head" else params[key].size(1)
        assert H.shape == (cols, cols)
        assert torch.allclose(H, H.T, atol=1e-5)
        ev = torch.linalg.eigvalsh(H.double())
        assert ev.min() > -1e-5 * ev.max() and ev.max() > 0


def test_quantize_model_covers_the_right_tensors(quantized_tiny):
    model, h, _, tensors, notes = quantized_tiny
    params = dict(model.named_parameters())
    assert [t.name for t in tensors] == list(params), "one entry per parameter, in parameter order"
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, tg.CastedLinear)}
    large = {n for n in linear if params[n].numel() > h.quant_min_numel}
    assert len(large) >= 6 * h.num_layers - 1  # q, k, v, proj, fc, mlp.proj of every block
    by_name = {t.name: t for t in tensors}
    assert by_name["tok_emb.weight"].bits == h.embed_bits == 8
    for name in large:
        assert by_name[name].bits == h.matrix_bits == 6, name
    for name, t in by_name.items():
        p = params[name].detach()
        assert t.shape == tuple(p.shape)
        if name in large or name == "tok_emb.weight":
            qmax = QMAX[t.bits]
            assert t.codes.dtype == np.int8 and t.codes.shape == tuple(p.shape)
            assert t.scale_codes.dtype == np.uint8 and t.scale_codes.shape == (p.size(0),)
            assert isinstance(t.scale_top, float) and np.float32(t.scale_top) == t.scale_top and t.scale_top > 0
            scales = stored_scales(t)
            assert np.abs(t.codes).max() <= qmax and (scales > 0).all()
            assert torch.equal(t.dequantize(), torch.from_numpy(t.codes.astype(np.float32) * scales[:, None]))
            # quantized, but close: nothing moves by more than the clip range
            err = (t.dequantize() - p).abs().max().item()
            assert err < float(scales.max()) * qmax
        else:
            assert t.bits == 16, f"{name} ({p.numel()} values) should be kept as fp16"
            assert t.values.dtype == np.float16
            assert torch.equal(t.dequantize(), p.half().float())
    assert not any("dead" in n for n in notes)


def test_qkv_share_one_hessian(quantized_tiny):
    """q, k and v of a block are stacked into one (rows_q+rows_k+rows_v, dim) matrix and quantized with
    the Hessian of their common input, exactly as if GPTQ were called on the stacked matrix."""
    model, h, hessians, tensors, _ = quantized_tiny
    params = dict(model.named_parameters())
    by_name = {t.name: t for t in tensors}
    for i in range(h.num_layers):
        names = [f"blocks.{i}.attn.c_{x}.weight" for x in "qkv"]
        W = torch.cat([params[n].detach().float() for n in names], 0)
        Q, S, _ = gptq(W[None], hessians[names[0]][None], h.matrix_bits, h.matrix_clip_sigmas)
        start = 0
        for n in names:
            r = params[n].size(0)
            assert np.array_equal(by_name[n].codes, Q[0, start:start + r].numpy()), n
            assert np.array_equal(stored_scales(by_name[n]), S[0, start:start + r].numpy()), n
            start += r
    emb = params["tok_emb.weight"].detach().float()
    Q, S, _ = gptq(emb[None], hessians["head"][None], h.embed_bits, h.embed_clip_sigmas)
    assert np.array_equal(by_name["tok_emb.weight"].codes, Q[0].numpy())
    assert np.array_equal(stored_scales(by_name["tok_emb.weight"]), S[0].numpy())


def test_quant_min_numel_threshold_is_strict():
    """'Larger than QUANT_MIN_NUMEL': a 32x64 k/v matrix (2048 values) stays fp16 at a threshold of 2048;
    q (4096 values) is then quantized alone with the shared Hessian."""
    model, h = tiny_model(QUANT_MIN_NUMEL="2048")
    hessians = tg.collect_hessians(model, RandomTokens(h.vocab_size, 2, h.train_seq_len), h, torch.device("cpu"))
    tensors, _ = tg.quantize_model(model, hessians, h)
    by_name = {t.name: t for t in tensors}
    assert by_name["blocks.0.attn.c_k.weight"].bits == 16
    assert by_name["blocks.0.attn.c_v.weight"].bits == 16
    assert by_name["blocks.0.attn.c_q.weight"].bits == 6
    Wq = dict(model.named_parameters())["blocks.0.attn.c_q.weight"].detach()
    Q, _, _ = gptq(Wq[None], hessians["blocks.0.attn.c_q.weight"][None], 6, h.matrix_clip_sigmas)
    assert np.array_equal(by_name["blocks.0.attn.c_q.weight"].codes, Q[0].numpy())


def test_quantized_model_stays_close_to_float(quantized_tiny):
    """The dequantized model predicts nearly what the float model predicts (6-bit GPTQ, 8-bit embedding)."""
    model, h, _, tensors, _ = quantized_tiny
    qmodel = tg.GPT(h)
    qmodel.load_state_dict({t.name: t.dequantize() for t in tensors}, strict=True)
    ids = RandomTokens(h.vocab_size, 2, h.train_seq_len, seed=9).next()
    with torch.no_grad():
        lf, lq = model(*ids).item(), qmodel(*ids).item()
    assert math.isfinite(lq) and abs(lf - lq) < 0.05 * abs(lf), (lf, lq)


def test_qkv_hessian_is_the_second_moment_of_the_attention_input():
    """q, k and v share one Hessian, taken from a pre-hook on the attention module: it must equal X^T X / rows
    of what c_q itself reads."""
    model, h = tiny_model()
    seen: dict[int, list] = {}
    hooks = [b.attn.c_q.register_forward_hook(lambda m, inp, out, i=i: seen.setdefault(i, []).append(inp[0].reshape(-1, inp[0].size(-1)).float()))
             for i, b in enumerate(model.blocks)]
    try:
        hessians = tg.collect_hessians(model, RandomTokens(h.vocab_size, 2, h.train_seq_len, seed=3), h, torch.device("cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    assert not any(k.endswith((".c_k.weight", ".c_v.weight")) for k in hessians)
    for i, inputs in seen.items():
        x = torch.cat(inputs)
        torch.testing.assert_close(hessians[f"blocks.{i}.attn.c_q.weight"], x.T @ x / x.size(0), rtol=1e-5, atol=1e-6)
