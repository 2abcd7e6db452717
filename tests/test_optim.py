"""Muon (Newton-Schulz, the update, the rank split), schedules, EMA and the parameter groups."""
from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from conftest import run_two_ranks, tiny_h  # noqa: E402


# ---------------------------------------------------------------------------------------- Newton-Schulz


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# The implementation runs Newton-Schulz in bf16 (as the record does): it differs from float32 by ~3-4 %.
BF16_NS_TOL = 0.07


@pytest.mark.parametrize("shape", [(32, 96), (64, 256), (3, 16, 48), (48, 64)])
def test_newton_schulz_singular_values_near_one(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g)
    batched = G if G.ndim == 3 else G[None]
    X = tg.newton_schulz(batched, tg.ns_schedule("quintic", 5))
    assert X.dtype == torch.bfloat16 and X.shape == batched.shape
    sv = torch.linalg.svdvals(X.float())
    assert sv.min() > 0.6 and sv.max() < 1.3, (sv.min().item(), sv.max().item())
    # the same directions as the exact orthogonal factor U V^T
    U, _, Vh = torch.linalg.svd(batched, full_matrices=False)
    cos = (X.float() * (U @ Vh)).sum((-2, -1)) / (X.float().norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert (cos > 0.95).all()


def test_newton_schulz_is_scale_invariant():
    G = torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(1))
    quintic = tg.ns_schedule("quintic", 5)
    a, b = tg.newton_schulz(G, quintic).float(), tg.newton_schulz(G * 1000, quintic).float()
    assert rel_err(b, a) < BF16_NS_TOL  # only bf16 rounding differs


# ---------------------------------------------------------------------------------------- Muon update


def ns_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz written out, in float32: X <- aX + (bA + cA^2)X with A = XX^T, X0 = G/|G|."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def muon_reference_update(g: torch.Tensor, buf: torch.Tensor, momentum: float, row_normalize=True):
    """Returns (update, new momentum buffer) for one matrix."""
    buf = momentum * buf + g
    u = g + momentum * buf  # Nesterov
    if row_normalize:
        u = u / u.norm(dim=-1, keepdim=True)
    tall = u.size(0) > u.size(1)
    o = ns_reference(u.T if tall else u)
    o = o.T if tall else o
    return o * max(1.0, u.size(0) / u.size(1)) ** 0.5, buf


@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_steps_equal_the_hand_computed_update(row_normalize):
    g = torch.Generator().manual_seed(2)
    shapes = [(16, 48), (48, 16), (16, 48), (24, 24)]
    init = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    lr, mom, wd = 0.05, 0.9, 0.1
    opt = tg.Muon(params, lr=lr, momentum=mom, backend_steps=5, weight_decay=wd, row_normalize=row_normalize)
    bufs = [torch.zeros_like(p) for p in init]
    for step, step_grads in enumerate(grads):
        before = [p.detach().clone() for p in params]
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(step_grads):
            plain_momentum_u, _ = muon_reference_update(mom * bufs[i] + gr, torch.zeros_like(gr), 0.0, row_normalize)
            want, bufs[i] = muon_reference_update(gr, bufs[i], mom, row_normalize)
            # decoupled weight decay: p <- p (1 - lr wd) - lr u
            got = (before[i] * (1 - lr * wd) - params[i].detach()) / lr
            assert rel_err(got, want) < BF16_NS_TOL, (step, i, rel_err(got, want))
            if step > 0:  # Nesterov is measurably not plain momentum
                assert rel_err(got, plain_momentum_u) > 3 * BF16_NS_TOL
            torch.testing.assert_close(opt.state[params[i]]["momentum_buffer"], bufs[i], rtol=1e-6, atol=1e-6)


def test_muon_first_step_on_a_fresh_param():
    """Fresh momentum: the update is orthogonalize(rownorm(g)) (the (1+m) factor cancels), times
    sqrt(rows/cols) = 2 for a 64x16 matrix."""
    g = torch.Generator().manual_seed(3)
    tall = torch.nn.Parameter(torch.randn(64, 16, generator=g))
    before = tall.detach().clone()
    grad = torch.randn(64, 16, generator=g)
    tall.grad = grad.clone()
    lr, wd = 0.02, 0.095
    tg.Muon([tall], lr=lr, momentum=0.99, backend_steps=5, weight_decay=wd, row_normalize=True).step()
    u = (before * (1 - lr * wd) - tall.detach()) / lr
    rows = grad / grad.norm(dim=-1, keepdim=True)
    want = ns_reference(rows.T).T * 2.0
    assert rel_err(u, want) < BF16_NS_TOL
    sv = torch.linalg.svdvals(u)
    assert sv.min() > 2 * 0.6 and sv.max() < 2 * 1.3
    # the same matrix wide: no extra scale
    wide = torch.nn.Parameter(before.T.clone())
    wide.grad = grad.T.clone()
    tg.Muon([wide], lr=lr, momentum=0.99, backend_steps=5, weight_decay=0.0, row_normalize=False).step()
    u_wide = (before.T - wide.detach()) / lr
    assert rel_err(u_wide, ns_reference(grad.T)) < BF16_NS_TOL


def test_muon_without_grad_only_decays():
    p = torch.nn.Parameter(torch.ones(8, 8))
    tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5, row_normalize=True).step()
    torch.testing.assert_close(p.detach(), torch.full((8, 8), 0.95))


def test_muon_buckets_and_rank_shares():
    shapes = [(16, 48), (48, 16), (16, 48), (24, 24), (16, 48)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    owned = []
    for rank in range(2):
        opt = tg.Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, row_normalize=True,
                      rank=rank, world_size=2)
        # two buckets: the 16x48 / 48x16 matrices (transposes share one) and the 24x24 one
        assert len(opt.plan) == 2
        # bucket members sit together in the flat buffer, buckets in order of their sorted shape key
        flat_order = sorted(range(5), key=opt.offsets.get)
        assert set(flat_order[:4]) == {0, 1, 2, 4} and flat_order[4] == 3
        mine = [i for runs in opt.plan for idx, _, _ in runs for i in idx]
        for runs in opt.plan:  # a run holds same-shape matrices, laid out contiguously in the flat buffer
            for idx, start, end in runs:
                assert len({tuple(params[i].shape) for i in idx}) == 1
                assert end - start == sum(params[i].numel() for i in idx)
        owned.append(sorted(mine))
    assert sorted(owned[0] + owned[1]) == list(range(5))  # every matrix exactly once
    assert not set(owned[0]) & set(owned[1])


WORKER = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    import train_gpt as tg
    from muon_case import make_case, run_case
    dist.init_process_group("gloo")
    params, grads = make_case()
    run_case(params, grads, rank=dist.get_rank(), world_size=dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save([p.detach() for p in params], sys.argv[2])
    else:
        torch.save([p.detach() for p in params], sys.argv[2] + ".rank1")
    dist.destroy_process_group()
    # Leave without interpreter finalization, as train_gpt.py does for gloo (SKIP_FINALIZATION): gloo's threads
    # can abort it ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)
""")

CASE = textwrap.dedent("""
    import torch
    import train_gpt as tg
    SHAPES = [(16, 48), (48, 16), (16, 48), (24, 24), (16, 48), (32, 8)]

    def make_case():
        g = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
        grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
        return params, grads

    def run_case(params, grads, rank, world_size):
        opt = tg.Muon(params, lr=0.05, momentum=0.95, backend_steps=5, weight_decay=0.1, row_normalize=True,
                      rank=rank, world_size=world_size)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
""")


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_muon_split_over_two_gloo_ranks_equals_one_process(tmp_path, monkeypatch):
    (tmp_path / "muon_case.py").write_text(CASE)
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "params.pt"
    run_two_ranks([str(tmp_path / "worker.py"), str(REPO), str(out)], {"PYTHONPATH": str(tmp_path)})
    monkeypatch.syspath_prepend(str(tmp_path))
    import muon_case
    params, grads = muon_case.make_case()
    muon_case.run_case(params, grads, rank=0, world_size=1)
    split = torch.load(out)
    split1 = torch.load(str(out) + ".rank1")
    for p, a, b in zip(params, split, split1):
        assert torch.equal(a, b)  # both ranks hold the same weights
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("frac,want", [(0.0, 1.0), (0.27, 1.0), (0.28, 1.0), (0.46, 0.75), (0.64, 0.5), (0.82, 0.25),
                                       (1.0, 0.0)])
def test_lr_scale_constant_then_linear_warmdown(frac, want):
    assert tg.lr_scale_at(frac, 0.72, 0.0) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("frac,want", [(0.0, 1.0), (0.28, 1.0), (0.64, 0.5), (0.93, 0.1), (0.99, 0.1), (1.0, 0.1)])
def test_lr_scale_min_lr_floor(frac, want):
    assert tg.lr_scale_at(frac, 0.72, 0.1) == pytest.approx(want, abs=1e-9)


def test_lr_scale_without_warmdown_and_past_the_end():
    assert tg.lr_scale_at(0.99, 0.0, 0.0) == 1.0
    assert tg.lr_scale_at(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert tg.lr_scale_at(1.2, 0.72, 0.0) == 0.0  # a step that starts after the cap never gets a negative LR
    values = [tg.lr_scale_at(f / 100, 0.72, 0.0) for f in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("step,want", [(0, 0.92), (750, 0.955), (1500, 0.99), (3000, 0.99)])
def test_muon_momentum_warmup(step, want):
    h = types.SimpleNamespace(muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500)
    assert tg.muon_momentum_at(step, h) == pytest.approx(want, abs=1e-12)


def test_muon_momentum_without_warmup():
    h = types.SimpleNamespace(muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=0)
    assert tg.muon_momentum_at(0, h) == 0.99


def test_set_schedule_scales_every_group_from_its_base_lr():
    model = tg.GPT(tiny_h())
    opts = tg.Optimizers(tiny_h(), model)
    opts.set_schedule(0.5, 0.93)
    assert opts.embed.param_groups[0]["lr"] == pytest.approx(0.015)
    assert opts.scalar.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opts.muon.param_groups[0]["lr"] == pytest.approx(tiny_h().matrix_lr / 2)
    assert opts.muon.param_groups[0]["momentum"] == 0.93
    opts.set_schedule(1.0, 0.99)
    assert opts.embed.param_groups[0]["lr"] == pytest.approx(0.03)
    assert opts.embed.param_groups[0]["weight_decay"] == 0.085 and opts.scalar.param_groups[0]["weight_decay"] == 0.02
    assert opts.embed.param_groups[0]["betas"] == (0.9, 0.95) and opts.embed.param_groups[0]["eps"] == 1e-8
    assert opts.muon.param_groups[0]["weight_decay"] == 0.095


# ---------------------------------------------------------------------------------------- EMA


def test_ema_after_k_updates_is_the_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    d = 0.9
    p0 = [p.detach().clone() for p in model.parameters()]
    ema = tg.EMA(model, d)
    history = []
    k = 7
    for i in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        history.append([p.detach().clone() for p in model.parameters()])
        ema.update()
    for j, s in enumerate(ema.shadow):
        want = d ** k * p0[j] + sum((1 - d) * d ** (k - 1 - i) * history[i][j] for i in range(k))
        torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-6)
    ema.copy_to(model)
    for p, s in zip(model.parameters(), ema.shadow):
        assert torch.equal(p.detach(), s)


def test_ema_of_constant_weights_converges_geometrically():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = tg.EMA(model, 0.9965)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.full((2, 2), 1 - 0.9965 ** 100), rtol=1e-5, atol=1e-6)
    assert ema.shadow[0].dtype == torch.float32


# ---------------------------------------------------------------------------------------- groups


def test_partition_params():
    model = tg.GPT(tiny_h())
    groups = tg.partition_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: sorted(names[id(p)] for p in v) for k, v in groups.items()}
    assert by_group["embed"] == ["tok_emb.weight"]
    assert by_group["head"] == []
    assert all(n.startswith("blocks.") and n.endswith(".weight") and p.ndim == 2
               for n, p in model.named_parameters() if n in by_group["matrix"])
    assert len(by_group["matrix"]) == 4 * 6  # c_q, c_k, c_v, proj, fc, mlp.proj per block
    control = {n.split(".")[-1] for n in by_group["scalar"]}
    # attn.gate (ATTN_GATE) and smear.weight / smear.scale (SMEAR_GATE) are control tensors too
    assert control == {"attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates", "gate", "weight", "scale"}
    assert len(by_group["scalar"]) == 4 * 5 + 2 + 2
    all_names = sorted(n for n, _ in model.named_parameters())
    assert sorted(sum(by_group.values(), [])) == all_names  # every parameter in exactly one group


def test_partition_params_untied_head_and_projections():
    model = tg.GPT(tiny_h(TIE_EMBEDDINGS=0, EMBEDDING_DIM=32, SKIP_GATES_ENABLED=0))
    groups = tg.partition_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups["head"]] == ["lm_head.weight"]
    matrix = {names[id(p)] for p in groups["matrix"]}
    assert {"embed_proj.weight", "head_proj.weight"} <= matrix
    assert "skip_gates" not in {names[id(p)] for p in groups["scalar"]}
    opts = tg.Optimizers(tiny_h(TIE_EMBEDDINGS=0, EMBEDDING_DIM=32), model)
    assert opts.head in opts.all and opts.embed.param_groups[0]["lr"] == 0.6
