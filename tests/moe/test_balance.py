"""Balance losses (B1–B5) and metrics (B6) against loops over experts, devices and tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import tiny_moe
from deepmoe import MoE, MoEConfig
from deepmoe.moe.balance import (
    balance_losses,
    coefficient_of_variation,
    expert_balance_loss,
    max_violation,
    routing_entropy,
    z_loss,
)
from deepmoe.moe.router import RouterOutput
from reference import communication_loss, device_loss, expert_loss, normalised, sequence_loss
from strategies import moe_configs

ALPHAS = dict(
    aux_loss_alpha=0.003,
    device_aux_loss_alpha=0.05,
    comm_aux_loss_alpha=0.02,
    seq_aux_loss_alpha=1e-4,
    z_loss_coef=1e-3,
    entropy_loss_coef=0.01,
)


@settings(max_examples=60, deadline=None)
@given(cfg=moe_configs(), batch=st.integers(1, 3), seq=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_each_loss_matches_its_formula(cfg, batch, seq, seed):
    cfg = MoEConfig(**{**cfg.to_dict(), **ALPHAS})
    torch.manual_seed(seed)
    layer = MoE(cfg)
    x = torch.randn(batch, seq, cfg.hidden_size)
    out = layer(x)
    r = out.routing
    scores, chosen = r.scores.tolist(), [row.tolist() for row in r.topk_idx]
    n, k, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_devices
    expected = {
        "expert": 0.003 * expert_loss(normalised(scores), chosen, n, k),
        "device": 0.05 * device_loss(normalised(scores), chosen, n, k, d),
        "communication": 0.02 * communication_loss(normalised(scores), chosen, n, d, cfg.max_devices_per_token),
        "sequence": 1e-4 * sequence_loss(scores, chosen, n, k, batch),
    }
    for name, value in expected.items():
        assert out.losses[name].item() == pytest.approx(value, rel=1e-5), name
    lse = [math.log(sum(math.exp(v) for v in row)) for row in r.logits.tolist()]
    assert out.losses["z"].item() == pytest.approx(1e-3 * sum(v * v for v in lse) / len(lse), rel=1e-5)
    entropies = [-sum(s / sum(row) * math.log(s / sum(row)) for s in row if s > 0) for row in scores]
    assert out.losses["entropy"].item() == pytest.approx(0.01 * sum(entropies) / len(entropies), rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()), rel=1e-6)


def test_balanced_routing_gives_the_loss_minimum_of_one():
    """Uniform load and uniform scores: f_i = 1, P_i = 1/N, so Σ f_i P_i = 1 (the papers' normalisation)."""
    n, t = 8, 16
    scores = torch.full((t, n), 1 / n)
    idx = torch.stack([torch.arange(t) % n, (torch.arange(t) + 4) % n], 1)  # K = 2, every expert 4 times
    assert expert_balance_loss(scores, idx).item() == pytest.approx(1.0)


@pytest.mark.parametrize("score", [0.02, 0.5, 0.98])
def test_sigmoid_expert_loss_cannot_fall_by_shrinking_every_score(score):
    """With sigmoid affinities B1 averages s / Σ_j s_j: balanced routing gives the minimum 1 whatever the scale of
    the scores (with raw scores it would be N·score, and training would shrink all scores instead of balancing)."""
    n, t = 8, 16
    cfg = tiny_moe(
        n_routed_experts=n, n_shared_experts=2, scoring_func="sigmoid", aux_loss_alpha=1.0, device_aux_loss_alpha=1.0,
        n_devices=2,
    )  # fmt: skip
    idx = torch.stack([torch.arange(t) % n, (torch.arange(t) + 4) % n], 1)
    scores = torch.full((t, n), score)
    routing = RouterOutput(scores.logit(), scores, idx, scores.gather(1, idx), None, 1)
    losses = balance_losses(routing, cfg)
    assert losses["expert"].item() == pytest.approx(1.0) and losses["device"].item() == pytest.approx(1.0)


def test_zero_weights_give_no_terms_and_a_zero_aux_loss():
    layer = MoE(tiny_moe(n_routed_experts=4, n_shared_experts=2))
    out = layer(torch.randn(5, 8))
    assert out.losses == {} and out.aux_loss.item() == 0


def test_aux_loss_gradient_reaches_the_router_only_through_p():
    cfg = tiny_moe(n_routed_experts=4, n_shared_experts=2, aux_loss_alpha=1.0)
    layer = MoE(cfg)
    out = layer(torch.randn(10, 8))
    out.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad is None


def test_metrics():
    load = torch.tensor([10, 30, 20, 0])
    assert max_violation(load).item() == pytest.approx((30 - 15) / 15)
    assert coefficient_of_variation(load).item() == pytest.approx(math.sqrt(125) / 15)
    uniform = torch.full((3, 4), 0.25)
    assert routing_entropy(uniform).item() == pytest.approx(math.log(4))
    assert z_loss(torch.zeros(2, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_routing_stats_count_dead_experts_and_drops():
    cfg = tiny_moe(capacity_factor=0.5)
    layer = MoE(cfg).train()
    layer.gate.set_expert_mask(disabled=[6, 7])
    stats = layer(torch.randn(64, 8)).stats
    assert stats.tokens_per_expert.sum() == 128
    assert stats.tokens_per_expert[6:].sum() == 0 and stats.dead_experts.item() >= 2
    # capacity 0.5 × 128 / 8 = 8 slots per expert: at least half of the 128 slots are dropped
    assert stats.kept_per_expert.max() <= 8
    assert stats.dropped_fraction.item() == pytest.approx(1 - stats.kept_per_expert.sum().item() / 128)
    assert stats.max_vio.item() == pytest.approx(max_violation(stats.tokens_per_expert).item())
