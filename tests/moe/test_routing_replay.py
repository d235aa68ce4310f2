"""Routing replay (`Router.replay`): the router takes given experts instead of choosing, with gate weights from
its current scores — what RL needs to re-score sampled tokens through the experts that produced them."""

from __future__ import annotations

import pytest
import torch

from configs import tiny_moe
from deepmoe import MoE


def _v3_layer() -> MoE:
    torch.manual_seed(0)
    config = tiny_moe(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5, use_expert_bias=True)  # fmt: skip
    layer = MoE(config).eval()
    layer.gate.e_score_correction_bias.normal_()
    return layer


def test_replaying_the_routers_own_choice_changes_nothing():
    layer = _v3_layer()
    x = torch.randn(9, layer.config.hidden_size)
    chosen = layer(x)
    layer.gate.replay = chosen.routing.topk_idx
    replayed = layer(x)
    torch.testing.assert_close(replayed.hidden_states, chosen.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(replayed.routing.topk_weight, chosen.routing.topk_weight, rtol=0, atol=0)


def test_replayed_experts_get_the_current_scores_as_gate_weights():
    """Other experts than the router would take: g = s at those experts, normalised and scaled (R2)."""
    layer = _v3_layer()
    cfg = layer.config
    x = torch.randn(6, cfg.hidden_size)
    replay = torch.stack([torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok] for _ in range(6)])
    layer.gate.replay = replay
    routing = layer(x).routing
    scores = torch.sigmoid(x @ layer.gate.weight.t())
    want = scores.gather(1, replay)
    want = want / want.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.equal(routing.topk_idx, replay)
    torch.testing.assert_close(routing.topk_weight, want)


def test_replay_must_fit_the_tokens():
    layer = _v3_layer()
    layer.gate.replay = torch.zeros(3, layer.config.num_experts_per_tok, dtype=torch.long)
    with pytest.raises(ValueError, match="routing replay must be int64"):
        layer(torch.randn(4, layer.config.hidden_size))
