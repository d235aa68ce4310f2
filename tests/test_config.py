"""MoEConfig validation: every impossible setting raises one ValueError naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmoe import MoE, MoEConfig

BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=16.0), "hidden_size"),
        (dict(moe_intermediate_size=-1), "moe_intermediate_size"),
        (dict(n_routed_experts=0), "n_routed_experts"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
        (dict(topk_method="best"), "topk_method"),
        (dict(topk_method="group_limited_greedy", n_group=3), "n_group"),
        (dict(n_group=2, topk_group=1), "n_group"),  # groups need a group-limited method
        (dict(topk_method="noaux_tc", n_group=2, topk_group=3), "topk_group"),
        (dict(topk_method="noaux_tc", n_group=4, topk_group=0), "topk_group"),
        (dict(topk_method="noaux_tc", n_group=8, topk_group=2, num_experts_per_tok=1), "n_group"),  # no top-2
        (dict(topk_method="group_limited_greedy", n_group=8, topk_group=1), "topk_group"),  # 1 expert < K=2
        (dict(bias_update_speed=-0.1), "bias_update_speed"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_scope="node"), "capacity_scope"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(no_drop_fraction=1.5), "no_drop_fraction"),
        (dict(n_devices=3), "n_devices"),
        (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"),
        (dict(device_aux_loss_alpha=float("inf")), "device_aux_loss_alpha"),
        (dict(comm_aux_loss_alpha=-0.1), "comm_aux_loss_alpha"),
        (dict(seq_aux_loss_alpha=-0.1), "seq_aux_loss_alpha"),
        (dict(z_loss_coef=-1.0), "z_loss_coef"),
        (dict(entropy_loss_coef=float("nan")), "entropy_loss_coef"),
        (dict(experts_implementation="cuda"), "experts_implementation"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^MoEConfig\.{field}="):
        MoEConfig(**{**BASE, **overrides})


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(-1, 12),
    k=st.integers(-1, 12),
    n_group=st.integers(0, 6),
    topk_group=st.integers(0, 6),
    method=st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc", "x"]),
    n_devices=st.integers(0, 5),
    capacity=st.sampled_from([None, -1.0, 0.5, 2.0]),
)
def test_any_config_either_builds_a_working_layer_or_names_a_field(
    n, k, n_group, topk_group, method, n_devices, capacity
):
    import torch

    try:
        cfg = MoEConfig(
            hidden_size=8,
            moe_intermediate_size=4,
            n_routed_experts=n,
            num_experts_per_tok=k,
            n_group=n_group,
            topk_group=topk_group,
            topk_method=method,
            n_devices=n_devices,
            capacity_factor=capacity,
        )
    except ValueError as error:
        assert str(error).startswith("MoEConfig.")
        return
    layer = MoE(cfg).train()
    out = layer(torch.randn(2, 3, 8))
    assert out.hidden_states.shape == (2, 3, 8) and torch.isfinite(out.hidden_states).all()
    assert out.routing.topk_idx.shape == (6, k)
