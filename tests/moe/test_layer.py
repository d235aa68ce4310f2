"""The MoE layer's output and gradients against the per-token reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import tiny_moe
from deepmoe import MoE, MoEConfig
from deepmoe.moe.experts import grouped_mm_available
from reference import capacity_keep, moe_forward, route
from strategies import moe_configs, random_bias


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max(max|b|, 0.1).

    Relative to the tensor's scale, floored at 0.1: gradients that nearly cancel (router grads with
    K=1 are O(1e-3), or vanish when normalised) are compared at float32's absolute precision, ~1e-7
    of their O(1) terms, instead of relative to their own tiny size."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(0.1)).item()


def _grads(layer, x):
    return [x.grad] + [p.grad for p in layer.parameters()]


def _compare(cfg: MoEConfig, batch: int, seq: int, seed: int, implementation: str, dropping: bool = False):
    torch.manual_seed(seed)
    layer = MoE(cfg)
    layer.experts.implementation = implementation
    random_bias(layer, seed)
    layer.train(dropping)
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    upstream = torch.randn(batch, seq, cfg.hidden_size)

    out = layer(x)
    (out.hidden_states * upstream).sum().backward()
    grads = _grads(layer, x)

    flat = x.detach().reshape(-1, cfg.hidden_size)
    routes = route(flat, layer.gate.weight, layer.gate.e_score_correction_bias, cfg)
    kept = None
    if dropping:
        kept = capacity_keep([r[0] for r in routes], [r[2] for r in routes], cfg, batch)
    layer.zero_grad()
    x_ref = x.detach().clone().requires_grad_()
    ref = moe_forward(layer, x_ref.reshape(-1, cfg.hidden_size), kept, routes).view_as(x_ref)
    (ref * upstream).sum().backward()
    ref_grads = _grads(layer, x_ref)

    assert _rel_err(out.hidden_states.detach(), ref.detach()) < 1e-5
    for got, want in zip(grads, ref_grads, strict=False):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            assert _rel_err(got, want) < 1e-5


IMPLEMENTATIONS = ["grouped_mm", "loop"] if grouped_mm_available("cpu", torch.float32) else ["loop"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=25, deadline=None)
@given(cfg=moe_configs(), batch=st.integers(1, 2), seq=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_output_and_gradients_match_reference(implementation, cfg, batch, seq, seed):
    _compare(cfg, batch, seq, seed, implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=25, deadline=None)
@given(
    cfg=moe_configs(),
    batch=st.integers(1, 2),
    seq=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    capacity_factor=st.sampled_from([0.3, 0.7, 1.2]),
)
def test_dropped_slots_contribute_nothing(implementation, cfg, batch, seq, seed, capacity_factor):
    cfg = MoEConfig(**{**cfg.to_dict(), "capacity_factor": capacity_factor})
    _compare(cfg, batch, seq, seed, implementation, dropping=True)


def test_grouped_and_loop_paths_agree_on_a_realistic_shape():
    cfg = MoEConfig(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4
    )
    torch.manual_seed(0)
    layer = MoE(cfg)
    x = torch.randn(4, 32, 64)
    outs = []
    for implementation in ("grouped_mm", "loop"):
        layer.experts.implementation = implementation
        outs.append(layer(x).hidden_states)
    assert _rel_err(outs[0], outs[1]) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["bfloat16 weights", "autocast"])
def test_bfloat16_forward_and_backward(mode, implementation):
    """bf16 against float32 on the same (bf16-representable) weights and input: same routing, bf16 rounding."""
    cfg = MoEConfig(
        hidden_size=64,
        moe_intermediate_size=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        use_expert_bias=True,
    )
    torch.manual_seed(0)
    reference = MoE(cfg).bfloat16().float()
    x = torch.randn(2, 16, 64).bfloat16().float()
    reference(x.clone().requires_grad_()).hidden_states.sum().backward()
    layer = MoE(cfg)
    layer.load_state_dict(reference.state_dict())
    layer.experts.implementation = implementation
    xin = x.clone().requires_grad_()
    if mode == "bfloat16 weights":
        layer = layer.bfloat16()
        got = layer(xin.bfloat16()).hidden_states
        assert got.dtype == torch.bfloat16
    else:
        with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
            got = layer(xin).hidden_states
    got.float().sum().backward()
    assert _rel_err(got.float().detach(), reference(x).hidden_states.detach()) < 3e-2
    assert xin.grad is not None and torch.isfinite(xin.grad).all()
    for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters(), strict=False):
        assert _rel_err(p.grad.float(), p_ref.grad) < 5e-2, name


def test_input_shapes_are_kept():
    cfg = tiny_moe(n_routed_experts=4, n_shared_experts=2)
    layer = MoE(cfg)
    assert layer(torch.randn(3, 8)).hidden_states.shape == (3, 8)
    assert layer(torch.randn(2, 5, 8)).hidden_states.shape == (2, 5, 8)


@pytest.mark.parametrize(
    "make_input, error, message",
    [
        (lambda: torch.randn(4, 7), ValueError, "shape"),
        (lambda: torch.randn(4), ValueError, "shape"),
        (lambda: torch.randn(2, 2, 2, 8), ValueError, "shape"),
        (lambda: torch.full((4, 8), float("nan")), ValueError, "NaN"),
        (lambda: torch.tensor([[float("inf")] * 8]), ValueError, "NaN or inf"),
        (lambda: torch.ones(4, 8, dtype=torch.long), ValueError, "floating-point"),
        (lambda: torch.randn(4, 8, dtype=torch.float64), ValueError, "dtype"),
        (lambda: torch.randn(0, 8), ValueError, "empty"),
        (lambda: [[0.0] * 8], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_one_clear_error(make_input, error, message):
    layer = MoE(tiny_moe(n_routed_experts=4, n_shared_experts=2))
    with pytest.raises(error, match=message):
        layer(make_input())


@pytest.mark.cpu_only  # run_balance_demo draws with a CPU generator
def test_aux_loss_free_balancing_brings_maxvio_below_0_1():
    from deepmoe.tools.balance_demo import run_balance_demo

    run = run_balance_demo(steps=300, n_tokens=16384, seed=1)
    assert run.max_vio_before > 2.0  # the skewed router really is collapsed
    assert run.max_vio_after < 0.1


def test_expert_weight_gradients_come_in_the_parameters_layout():
    """The grouped product's weight gradient is computed as [N_r, out, in], the experts' storage, so autograd
    hands it to the parameter as it is, not as a transposed view that costs a copy of every expert per step."""
    layer = MoE(tiny_moe())
    x = torch.randn(2, 5, layer.config.hidden_size)
    weights = (layer.experts.gate_up_proj, layer.experts.down_proj)
    for grad in torch.autograd.grad(layer(x).hidden_states.square().sum(), weights):
        assert grad.is_contiguous()
