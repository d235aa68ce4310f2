"""PESC adapter experts (docs/design.md#pesc-adapter-experts): the layer against a plain per-token loop over the
paper's formula, the dense function at initialisation, and the config's errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from configs import tiny_moe
from deepmoe.config import MoEConfig
from deepmoe.moe import MoE

PESC = dict(hidden_size=8, moe_intermediate_size=12, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            expert_adapter_rank=3)  # fmt: skip


def per_token_reference(layer: MoE, x: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """Σ_{i ∈ TopK(x)} g_i (y + W_up,i silu(W_down,i y)), y = F(x), one token at a time, from the weights alone:
    softmax or sigmoid scores of x·e_i, the greedy top-k, gates normalised to sum 1 when norm_topk_prob (in float64;
    `detach=False`: differentiable in x and the layer's weights)."""
    cfg = layer.config
    w = {name: (p.detach() if detach else p).double() for name, p in layer.named_parameters()}
    out = []
    for token in x.double():
        logits = w["gate.weight"] @ token
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        chosen = scores.topk(cfg.num_experts_per_tok).indices
        gates = scores[chosen] / (scores[chosen].sum() if cfg.norm_topk_prob else 1.0)
        gate_proj, up_proj = w["shared_experts.gate_proj.weight"], w["shared_experts.up_proj.weight"]
        y = w["shared_experts.down_proj.weight"] @ (F.silu(gate_proj @ token) * (up_proj @ token))
        total = torch.zeros_like(y)
        for g, i in zip(gates, chosen, strict=True):
            total += g * (y + w["experts.adapter_up"][i] @ F.silu(w["experts.adapter_down"][i] @ y))
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
@pytest.mark.parametrize("routing", [dict(norm_topk_prob=True), dict(scoring_func="sigmoid")])
def test_pesc_layer_matches_a_per_token_loop(implementation, routing):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(**PESC, experts_implementation=implementation, **routing))
    with torch.no_grad():  # trained adapters: W_up ≠ 0
        layer.experts.adapter_up.normal_(0.0, 0.5)
    x = torch.randn(3, 5, 8)
    got = layer(x).hidden_states
    torch.testing.assert_close(got.double(), per_token_reference(layer, x.reshape(-1, 8)).view(3, 5, 8),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_pesc_layer_gradients_match_the_reference():
    """The grouped products' backward against autograd through the per-token loop (the same top-k)."""
    torch.manual_seed(1)
    layer = MoE(MoEConfig(**PESC, norm_topk_prob=True, experts_implementation="grouped_mm"))
    with torch.no_grad():
        layer.experts.adapter_up.normal_(0.0, 0.5)
    x = torch.randn(6, 8, requires_grad=True)
    inputs = [x, *layer.parameters()]
    got = torch.autograd.grad(layer(x).hidden_states.square().sum(), inputs)
    want = torch.autograd.grad(per_token_reference(layer, x, detach=False).square().sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fresh_pesc_layer_computes_its_shared_ffn():
    """W_up = 0 and gates summing to 1: Σ g_i (y + 0) = y = F(x), whichever experts are chosen."""
    torch.manual_seed(2)
    layer = MoE(MoEConfig(**PESC, norm_topk_prob=True))
    x = torch.randn(4, 7, 8)
    torch.testing.assert_close(layer(x).hidden_states, layer.shared_experts(x))
    assert not torch.equal(layer.experts.adapter_down, torch.zeros_like(layer.experts.adapter_down))


def test_pesc_layer_shapes_and_names():
    layer = MoE(MoEConfig(**PESC))
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {
        "gate.weight": (4, 8), "experts.adapter_down": (4, 3, 8), "experts.adapter_up": (4, 8, 3),
        "shared_experts.gate_proj.weight": (12, 8), "shared_experts.up_proj.weight": (12, 8),
        "shared_experts.down_proj.weight": (8, 12),
    }  # fmt: skip
    with pytest.raises(ValueError, match="MoEConfig.expert_adapter_rank=4 is invalid for this layer"):
        layer.config = dataclasses.replace(layer.config, expert_adapter_rank=4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(expert_adapter_rank=0), "MoEConfig.expert_adapter_rank=0 is invalid: must be None or an integer >= 1"),
        (dict(expert_adapter_rank=2.0), "MoEConfig.expert_adapter_rank=2.0 is invalid"),
        (dict(expert_adapter_rank=2, n_shared_experts=0), "MoEConfig.n_shared_experts=0 is invalid: must be 1 with"),
        (dict(expert_adapter_rank=2, n_shared_experts=1, fp8_experts=True), "MoEConfig.fp8_experts=True is invalid"),
    ],
)
def test_bad_adapter_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        tiny_moe(**overrides)
