"""Hypothesis strategies for random but valid MoE configurations and inputs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from deepmoe.config import MoEConfig


@st.composite
def moe_configs(draw, **fixed) -> MoEConfig:
    """A small valid MoEConfig covering every routing variant; `fixed` pins fields."""
    method = fixed.pop("topk_method", None) or draw(st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"]))
    n_group = 1 if method == "greedy" else draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 4))
    n = n_group * per_group
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * per_group))
    fields = dict(
        hidden_size=draw(st.sampled_from([8, 12, 16])),
        moe_intermediate_size=draw(st.sampled_from([4, 8])),
        n_routed_experts=n,
        n_shared_experts=draw(st.integers(0, 2)),
        num_experts_per_tok=k,
        scoring_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        use_expert_bias=draw(st.booleans()),
        n_devices=draw(st.sampled_from([d for d in (1, 2, 4) if n % d == 0])),
    )
    fields.update(fixed)
    return MoEConfig(**fields)


def random_bias(layer, seed: int) -> None:
    """Give the selection bias (if any) values large enough to change choices."""
    if layer.gate.e_score_correction_bias is not None:
        g = torch.Generator(torch.get_default_device()).manual_seed(seed)
        layer.gate.e_score_correction_bias.copy_(0.3 * torch.randn(layer.config.n_routed_experts, generator=g))
