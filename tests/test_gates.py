"""Issue 16, items 6-7 switches: Polar-Express Newton-Schulz (MUON_NS_COEFFS), the sparse attention output
gate (ATTN_GATE), the BOS-safe smear gate (SMEAR_GATE) and two-lane residual blocks (TWO_LANE_START): what
each computes, that they start as the plain model, stay causal, keep documents apart, train, and survive the
artifact."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from conftest import tiny_h  # noqa: E402
from test_model import _stream, randomize, tiny_model  # noqa: E402

GATES = dict(ATTN_GATE=1, SMEAR_GATE=1, ATTN_GATE_DIMS=12, SMEAR_GATE_DIMS=12)


# ---------------------------------------------------------------------------------------- Polar Express


def test_ns_schedule_quintic_repeats_and_polar_steps_through_its_table():
    assert tg.ns_schedule("quintic", 3) == (tg.NS_COEFFS,) * 3
    polar = tg.ns_schedule("polar", 7)
    assert polar[:5] == tg.POLAR_EXPRESS_COEFFS and polar[5:] == (tg.POLAR_EXPRESS_COEFFS[-1],) * 2


@pytest.mark.parametrize("shape", [(1, 64, 256), (3, 32, 48)])
def test_polar_express_orthogonalizes_closer_to_one_than_the_quintic(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    spread = {}
    for kind in ("quintic", "polar"):
        X = tg.newton_schulz(G, tg.ns_schedule(kind, 5)).float()
        sv = torch.linalg.svdvals(X)
        spread[kind] = (sv - 1).abs().mean().item()
        cos = (X * (U @ Vh)).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
        assert (cos > 0.95).all(), kind
        assert sv.max() < 1.2, kind
    assert spread["polar"] < spread["quintic"]  # the quintic stops at ~0.7-1.2; Polar Express lands near 1


def test_muon_uses_the_configured_schedule():
    seen = []

    def spy(X, schedule):
        seen.append(schedule)
        return tg.newton_schulz(X, schedule)

    p = torch.nn.Parameter(torch.randn(8, 16))
    p.grad = torch.randn(8, 16)
    opt = tg.Muon([p], lr=0.01, momentum=0.9, backend_steps=5, weight_decay=0.0, row_normalize=True,
                  orthogonalize=spy, ns_coeffs="polar")
    opt.step()
    assert seen == [tg.POLAR_EXPRESS_COEFFS]


# ---------------------------------------------------------------------------------------- attention gate


def test_attention_gate_scales_each_heads_output_by_its_sigmoid():
    torch.manual_seed(0)
    gated = randomize(tg.GPT(tiny_h(ATTN_GATE=1, ATTN_GATE_DIMS=5))).blocks[0].attn
    plain = tg.Attention(64, 4, 2, 1.0, gated.use_xsa)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate"})
    x, _, cos, sin = _stream(tiny_h(), T=10)
    captured = {}
    plain.proj.register_forward_hook(lambda m, inp, out: captured.__setitem__("y", inp[0]))
    with torch.no_grad():
        plain(x, cos, sin)
        gate = torch.sigmoid(x[..., :5] @ gated.gate.T)  # (B, T, heads)
        y = captured["y"].view(*x.shape[:2], 4, 16) * gate[..., None]
        torch.testing.assert_close(gated(x, cos, sin), gated.proj(y.reshape(x.shape)), rtol=1e-5, atol=1e-5)


def test_gates_start_as_the_plain_model_and_get_gradients():
    torch.manual_seed(3)
    plain = tg.GPT(tiny_h())
    torch.manual_seed(3)
    gated = tg.GPT(tiny_h(**GATES))
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # attention projections start at zero and the smear scale at 0
        torch.testing.assert_close(gated.forward_hidden(ids), plain.forward_hidden(ids))
    gated = randomize(gated)
    gated(ids[:, :-1], ids[:, 1:]).backward()
    for name, p in gated.named_parameters():
        if "gate" in name or name.startswith("smear"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    groups = tg.partition_params(gated)
    gate_params = {id(p) for n, p in gated.named_parameters() if "gate" in n or n.startswith("smear")}
    assert gate_params <= {id(p) for p in groups["scalar"]}  # AdamW scalars, not Muon


# ---------------------------------------------------------------------------------------- smear gate


def test_smear_gate_formula_and_bos_safety():
    smear = tg.SmearGate(3)
    with torch.no_grad():
        smear.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        smear.scale.fill_(0.7)
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 9, tg.BOS_ID, 4, 4, 7]])
    out = smear(x, ids)
    want = x.clone()
    for t in range(1, 6):
        if ids[0, t] != tg.BOS_ID:
            want[0, t] += 0.7 * torch.sigmoid(x[0, t, :3] @ smear.weight[0]) * x[0, t - 1]
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out[0, 2], x[0, 2])  # the BOS took nothing from the previous document


def test_documents_do_not_leak_through_the_smear():
    """With a BOS right after a changed token, the BOS's input to the first block stays the same (causality
    with the gates on is in test_model.py's test_model_is_causal)."""
    model = tiny_model(**GATES)
    ids = torch.randint(5, 96, (2, 24), generator=torch.Generator().manual_seed(5))
    t = 13
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 7) % 96
    model.smear.scale.data.fill_(1.0)
    ids[:, t + 1] = changed[:, t + 1] = tg.BOS_ID
    x_of = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: x_of.update({len(x_of): args[0]}))
    with torch.no_grad():
        model.forward_hidden(ids), model.forward_hidden(changed)
    hook.remove()
    first, second = x_of[0], x_of[1]
    torch.testing.assert_close(first[:, t + 1], second[:, t + 1], rtol=0, atol=0)
    assert (first[:, t] - second[:, t]).abs().amax() > 0


# ---------------------------------------------------------------------------------------- artifact


def test_gated_model_survives_the_artifact_and_old_configs_load_without_gates(tmp_path):
    h = tiny_h(**GATES, QUANT_MIN_NUMEL=0)
    torch.manual_seed(0)
    model = randomize(tg.GPT(h))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    qt = [tg.QuantizedTensor(n, tuple(t.shape), 16, values=t.half().numpy()) for n, t in state.items()]
    blob = tg.serialize_artifact(qt, h.model_config(), "brotli", h.eval_config())
    path = tmp_path / "gated.ptz"
    path.write_bytes(blob)
    loaded, hh = tg.load_eval_model(path, tiny_h(ATTN_GATE=0, SMEAR_GATE=0), torch.device("cpu"))  # the artifact's config wins
    assert hh.attn_gate and hh.smear_gate and loaded.smear is not None and loaded.blocks[0].attn.gate is not None
    torch.testing.assert_close(loaded.smear.weight, state["smear.weight"].half().float())
    # An artifact written before the switches existed: its config has no ATTN_GATE / SMEAR_GATE keys.
    plain_h = tiny_h(ATTN_GATE=0, SMEAR_GATE=0)
    old_config = {k: v for k, v in plain_h.model_config().items() if k not in ("ATTN_GATE", "ATTN_GATE_DIMS", "SMEAR_GATE", "SMEAR_GATE_DIMS")}
    plain = tg.GPT(plain_h)
    qt = [tg.QuantizedTensor(n, tuple(t.shape), 16, values=t.detach().half().numpy()) for n, t in plain.state_dict().items()]
    path.write_bytes(tg.serialize_artifact(qt, old_config, "brotli", plain_h.eval_config()))
    loaded, hh = tg.load_eval_model(path, tiny_h(**GATES), torch.device("cpu"))
    assert not hh.attn_gate and not hh.smear_gate and loaded.smear is None


# ---------------------------------------------------------------------------------------- two lanes


def test_two_lane_block_formula():
    model = tiny_model(TWO_LANE_START=3)
    block = model.blocks[3]
    assert block.two_lane and not any(b.two_lane for b in model.blocks[:3])
    with torch.no_grad():
        block.lane_keep.copy_(torch.tensor([0.9, 1.2]))
        block.lane_mix.copy_(torch.tensor([[0.5, 1.5], [2.0, -0.5]]))
    h = model.h
    x, x0, cos, sin = _stream(h, T=10)
    lanes = torch.stack((x, 0.7 * x0 + 0.3 * x))
    with torch.no_grad():
        out = block(lanes, x0, cos, sin)
        s = block.ln_scale
        lane0 = block.resid_mix[0] * lanes[0] + block.resid_mix[1] * x0
        attn = block.attn(tg.rms_norm(lane0) * s, cos, sin, block.attn_scale)
        mlp = block.mlp(tg.rms_norm(lanes[1]) * s, block.mlp_scale)
        torch.testing.assert_close(out[0], 0.9 * lane0 + 0.5 * attn + 2.0 * mlp)
        torch.testing.assert_close(out[1], 1.2 * lanes[1] + 1.5 * attn - 0.5 * mlp)


def test_two_lanes_start_as_the_parallel_block_and_train():
    plain = tiny_model(seed=4)
    lanes = tg.GPT(tiny_h(TWO_LANE_START=3))
    state = {k: v for k, v in lanes.state_dict().items() if "lane_" in k}
    lanes.load_state_dict({**plain.state_dict(), **state}, strict=True)
    # Unit mixing, a block that reads the stream as is, and skips that pass the stream through (a skip feeds
    # lane 0 only, so it would set the lanes apart): both lanes then stay the parallel block's stream.
    with torch.no_grad():
        for m in (plain, lanes):
            m.blocks[3].resid_mix.copy_(torch.stack((torch.ones(64), torch.zeros(64))))
            m.skip_gates.fill_(60.0)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    for looping in (False, True):
        plain.looping = lanes.looping = looping
        with torch.no_grad():
            torch.testing.assert_close(lanes.forward_hidden(ids), plain.forward_hidden(ids))
    lanes(ids[:, :-1], ids[:, 1:]).backward()
    assert lanes.blocks[3].lane_mix.grad.abs().sum() > 0 and lanes.blocks[3].lane_keep.grad.abs().sum() > 0
    assert {id(lanes.blocks[3].lane_mix), id(lanes.blocks[3].lane_keep)} <= {id(p) for p in tg.partition_params(lanes)["scalar"]}


@pytest.mark.parametrize("start", [0, 1, 2])
def test_two_lanes_refused_where_a_block_runs_before_the_decoder_end(start):
    with pytest.raises(tg.ConfigError, match="TWO_LANE_START"):
        tiny_h(TWO_LANE_START=start)  # the tiny model loops blocks 1-2 and its decoder is [1, 2, 3] when looping


def test_two_lane_model_compiles_to_the_eager_result():
    """COMPILE=1 on CPU (inductor): the two-lane block is one more graph kind and gives the eager numbers."""
    h = tiny_h(NUM_LAYERS=3, MODEL_DIM=32, EMBEDDING_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, XSA_LAST_N=3, NUM_LOOPS=0,
               PARALLEL_RESIDUAL_START=1, TWO_LANE_START=2, ROPE_DIMS=8, COMPILE=1)
    model = randomize(tg.GPT(h), seed=1)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model.forward_hidden(ids)
            model.use_runtime(tg.build_runtime(h, torch.device("cpu")))
            compiled = model.forward_hidden(ids)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
