"""The MoE layer against Hugging Face transformers' DeepSeek MoE blocks, an independent reference.

Both sides get the same weights (deepmoe's state_dict loaded into the HF module) and the
same input. We compare the output, the gradients (input and every parameter) for a random
upstream gradient, and the routing decision. HF runs with each experts implementation it
offers on CPU; "deepgemm" and "sonicmoe" need a GPU and kernels, so they are left out.

DeepSeek-V3 (`DeepseekV3MoE`): sigmoid scores, noaux_tc group routing, selection bias,
normalise (if `norm_topk_prob`) then scale, the same formula as deepmoe's.

DeepSeek-V2 (`DeepseekV2Moe`): softmax scores, greedy / group_limited_greedy. HF's V2 router
ignores `norm_topk_prob` (it never normalises) and always multiplies by
`routed_scaling_factor`. deepmoe normalises when `norm_topk_prob` is set and then always
scales. DeepSeek's original V2 code normalises *or* scales. All three agree when
`norm_topk_prob=False`, the setting of the released DeepSeek-V2 and V2-Lite configs, so the
V2 cases below use only that. HF's V2 group_limited_greedy fills the dropped groups with 0,
not -inf. That picks the same experts, because softmax scores are > 0 and the config guarantees that the
kept groups hold at least K experts. HF's V2 router has no `e_score_correction_bias`.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

from deepmoe import MoE, MoEConfig  # noqa: E402
from deepmoe.moe.experts import grouped_mm_available  # noqa: E402

# "eager" is the modules' own per-expert loop; the others come from transformers.integrations.moe.
HF_IMPLEMENTATIONS = ["eager", *(name for name in ("batched_mm", "grouped_mm") if name in ALL_EXPERTS_FUNCTIONS)]
IMPLEMENTATIONS = ["grouped_mm", "loop"] if grouped_mm_available("cpu", torch.float32) else ["loop"]

SIZES = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4)

# name -> (HF MoE class, HF config class, kwargs shared by both configs, MoEConfig-only kwargs)
CASES = {
    "v3-groups": (
        DeepseekV3MoE,
        DeepseekV3Config,
        dict(n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", use_expert_bias=True),
    ),
    "v3-one-group-unnormalised": (
        DeepseekV3MoE,
        DeepseekV3Config,
        dict(n_shared_experts=2, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", use_expert_bias=True),
    ),
    "v2-greedy": (
        DeepseekV2Moe,
        DeepseekV2Config,
        dict(
            n_shared_experts=2,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
        dict(scoring_func="softmax"),
    ),
    "v2-group-limited-greedy": (
        DeepseekV2Moe,
        DeepseekV2Config,
        dict(
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
        ),
        dict(scoring_func="softmax"),
    ),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|, or max|a| where b vanishes."""
    scale = b.abs().max()
    return (a - b).abs().max().item() / scale.item() if scale > 1e-6 else a.abs().max().item()


def _build(case: str, seed: int) -> tuple[MoE, torch.nn.Module]:
    """A deepmoe layer and the matching HF MoE module holding the same weights."""
    hf_cls, hf_config_cls, shared, ours = CASES[case]
    cfg = MoEConfig(**SIZES, **shared, **ours)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    if cfg.use_expert_bias:
        with torch.no_grad():  # large enough to change the routing of many tokens
            layer.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))

    hf_config = hf_config_cls(**SIZES, **shared, num_attention_heads=4, hidden_act="silu")
    hf = hf_cls(hf_config)
    ours_state, hf_state = layer.state_dict(), hf.state_dict()
    # Same names and shapes, so one checkpoint loads into either module without remapping.
    assert sorted(ours_state) == sorted(hf_state)
    for name, tensor in ours_state.items():
        assert tensor.shape == hf_state[name].shape, name
    hf.load_state_dict(ours_state, strict=True)
    return layer, hf


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = module(x)
    out = getattr(out, "hidden_states", out)  # deepmoe returns MoEOutput, HF a tensor
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.cpu_only  # transformers' float32 expert paths (grouped_mm, batched_mm) vary by device and build
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("hf_implementation", HF_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_output_and_gradients_match_hf(case, hf_implementation, implementation):
    layer, hf = _build(case, seed=0)
    layer.experts.implementation = implementation
    hf.config._experts_implementation = hf_implementation  # read by the experts module at each forward
    assert hf.experts.config._experts_implementation == hf_implementation
    torch.manual_seed(1)
    x = torch.randn(2, 24, SIZES["hidden_size"])
    upstream = torch.randn_like(x)

    out, x_grad, grads = _forward_backward(layer, x, upstream)
    hf_out, hf_x_grad, hf_grads = _forward_backward(hf, x, upstream)

    assert _rel_err(out, hf_out) < 1e-5
    assert _rel_err(x_grad, hf_x_grad) < 1e-5
    assert sorted(grads) == sorted(hf_grads)
    for name, grad in grads.items():
        assert grad is not None and hf_grads[name] is not None, name
        assert _rel_err(grad, hf_grads[name]) < 1e-5, name


@pytest.mark.parametrize("case", list(CASES))
def test_routing_matches_hf(case):
    layer, hf = _build(case, seed=2)
    torch.manual_seed(3)
    x = torch.randn(48, SIZES["hidden_size"])
    with torch.no_grad():
        hf_logits, hf_weight, hf_idx = hf.gate(x)
        routing = layer.gate(x)

    # Both sides return the K experts in no fixed order: sort each token's experts by id.
    hf_idx, order = hf_idx.sort(-1)
    hf_weight = hf_weight.gather(1, order)
    idx, order = routing.topk_idx.sort(-1)
    weight = routing.topk_weight.gather(1, order)

    assert torch.equal(idx, hf_idx)
    assert _rel_err(weight, hf_weight) < 1e-6
    assert _rel_err(routing.logits, hf_logits) < 1e-6

    # The cases are not trivial: the group limit and the bias change which experts are chosen.
    cfg = layer.config
    if cfg.topk_group < cfg.n_group:
        choice = routing.scores
        if layer.gate.e_score_correction_bias is not None:
            choice = choice + layer.gate.e_score_correction_bias
        ungrouped = choice.topk(cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values
        assert not torch.equal(ungrouped, idx)
    if layer.gate.e_score_correction_bias is not None:
        with torch.no_grad():
            layer.gate.e_score_correction_bias.zero_()
            unbiased = layer.gate(x).topk_idx.sort(-1).values
        assert not torch.equal(unbiased, idx)
