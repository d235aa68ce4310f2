"""Router (R1–R6) against the per-token reference in tests/reference.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmoe import MoE, MoEConfig
from reference import capacity_keep, route
from strategies import moe_configs, random_bias


def _layer(cfg: MoEConfig, seed: int) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(cfg)
    random_bias(layer, seed)
    return layer


def _assert_matches_reference(layer, x, routing, disabled=(), forced=()):
    ref = route(x, layer.gate.weight, layer.gate.e_score_correction_bias, layer.config, disabled, forced)
    for t, (chosen, weights, scores) in enumerate(ref):
        got = routing.topk_idx[t].tolist()
        assert sorted(got) == sorted(chosen), f"token {t}: chose {sorted(got)}, reference {sorted(chosen)}"
        for j, e in enumerate(got):
            assert routing.topk_weight[t, j].item() == pytest.approx(weights[e], rel=1e-5, abs=1e-7)
        assert routing.scores[t].tolist() == pytest.approx(scores, rel=1e-5, abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(cfg=moe_configs(), n_tokens=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_routing_matches_reference(cfg, n_tokens, seed):
    layer = _layer(cfg, seed)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    _assert_matches_reference(layer, x, layer.gate(x))


@settings(max_examples=40, deadline=None)
@given(cfg=moe_configs(topk_method="noaux_tc"), n_tokens=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_group_limit_keeps_tokens_inside_their_groups(cfg, n_tokens, seed):
    layer = _layer(cfg, seed)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    groups = layer.gate(x).topk_idx // cfg.experts_per_group
    for t in range(n_tokens):
        assert len(set(groups[t].tolist())) <= cfg.topk_group


def test_masked_groups_use_minus_infinity_not_zero():
    """With a large negative bias, 0-filling out-of-group experts would let them win; −inf must not."""
    cfg = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=4,
        n_routed_experts=8,
        n_shared_experts=0,
        num_experts_per_tok=2,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=1,
        use_expert_bias=True,
    )
    layer = MoE(cfg)
    layer.gate.e_score_correction_bias.fill_(-5.0)
    x = torch.randn(32, 8)
    idx = layer.gate(x).topk_idx
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()


@settings(max_examples=40, deadline=None)
@given(cfg=moe_configs(), n_tokens=st.integers(1, 12), seed=st.integers(0, 2**16), data=st.data())
def test_masks_never_choose_disabled_and_always_choose_forced(cfg, n_tokens, seed, data):
    layer = _layer(cfg, seed)
    n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    forced = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=k))
    disabled = data.draw(
        st.lists(
            st.sampled_from([i for i in range(n) if i not in forced]) if len(forced) < n else st.nothing(),
            unique=True,
            max_size=n - k,
        )
    )
    try:
        layer.gate.set_expert_mask(disabled=disabled, forced=forced)
    except ValueError as error:  # only the "too few reachable experts" refusal is allowed here
        assert "reachable" in str(error)
        return
    x = torch.randn(n_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    routing = layer.gate(x)
    for t in range(n_tokens):
        chosen = set(routing.topk_idx[t].tolist())
        assert not chosen & set(disabled)
        assert set(forced) <= chosen
    _assert_matches_reference(layer, x, routing, disabled, forced)


def test_forced_expert_outside_the_best_groups_is_still_chosen():
    cfg = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=4,
        n_routed_experts=16,
        n_shared_experts=0,
        num_experts_per_tok=2,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=8,
        topk_group=1,
        use_expert_bias=True,
    )
    layer = MoE(cfg)
    layer.gate.e_score_correction_bias.copy_(torch.arange(16.0))  # group 7 always wins
    layer.gate.set_expert_mask(forced=[0])
    idx = layer.gate(torch.randn(20, 8)).topk_idx
    assert (idx == 0).any(-1).all()
    assert set((idx // 2).flatten().tolist()) <= {0, 7}


@pytest.mark.parametrize(
    "disabled, forced, message",
    [
        ([99], [], "out of range"),
        ([1], [1], "both disabled and forced"),
        ([], [0, 1, 2], "exceed num_experts_per_tok"),
        ([0, 1, 2, 3, 4, 5, 6], [], "reachable"),
    ],
)
def test_bad_masks_are_refused(disabled, forced, message):
    cfg = MoEConfig(
        hidden_size=8, moe_intermediate_size=4, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2
    )
    layer = MoE(cfg)
    with pytest.raises(ValueError, match=message):
        layer.gate.set_expert_mask(disabled=disabled, forced=forced)


def test_bias_changes_selection_but_not_weights():
    cfg = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=4,
        n_routed_experts=8,
        n_shared_experts=0,
        num_experts_per_tok=2,
        scoring_func="sigmoid",
        use_expert_bias=True,
    )
    layer = MoE(cfg)
    x = torch.randn(16, 8)
    layer.gate.e_score_correction_bias[3] = 10.0  # expert 3 is always selected ...
    routing = layer.gate(x)
    assert (routing.topk_idx == 3).any(-1).all()
    # ... but weighted by its unbiased sigmoid score
    j = (routing.topk_idx == 3).int().argmax(-1)
    weight = routing.topk_weight.gather(1, j[:, None]).squeeze(1)
    assert torch.allclose(weight, torch.sigmoid(x @ layer.gate.weight[3]), rtol=1e-6)


def test_update_bias_follows_the_sign_rule():
    cfg = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=4,
        n_routed_experts=4,
        n_shared_experts=0,
        num_experts_per_tok=1,
        use_expert_bias=True,
        bias_update_speed=0.01,
    )
    layer = MoE(cfg)
    layer.update_bias(torch.tensor([10, 2, 4, 4]))  # mean 5
    assert layer.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    with pytest.raises(ValueError, match="shape"):
        layer.update_bias(torch.ones(3))
    with pytest.raises(ValueError, match="use_expert_bias"):
        MoE(
            MoEConfig(
                hidden_size=8, moe_intermediate_size=4, n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=1
            )
        ).update_bias(torch.ones(4))


def test_bias_is_saved_in_the_state_dict_under_its_hf_name():
    layer = MoE(
        MoEConfig(
            hidden_size=8, moe_intermediate_size=4, n_routed_experts=4, num_experts_per_tok=1, use_expert_bias=True
        )
    )
    state = layer.state_dict()
    assert "gate.e_score_correction_bias" in state
    assert "gate.disabled_experts" not in state  # masks are run-time steering, not weights


@settings(max_examples=60, deadline=None)
@given(
    cfg=moe_configs(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 1.5]),
    scope=st.sampled_from(["expert", "device"]),
    policy=st.sampled_from(["probs", "position"]),
    no_drop=st.sampled_from([0.0, 0.5]),
)
def test_capacity_drops_the_lowest_priority_slots(cfg, batch, seq, seed, capacity_factor, scope, policy, no_drop):
    cfg = MoEConfig(
        **{
            **cfg.to_dict(),
            "capacity_factor": capacity_factor,
            "capacity_scope": scope,
            "drop_policy": policy,
            "no_drop_fraction": no_drop,
        }
    )
    layer = _layer(cfg, seed).train()
    x = torch.randn(batch * seq, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    routing = layer.gate(x, batch_size=batch)
    chosen = [row.tolist() for row in routing.topk_idx]
    kept = capacity_keep(chosen, routing.scores.tolist(), cfg, batch)
    for t in range(batch * seq):
        got = {e for e, keep in zip(chosen[t], routing.kept[t].tolist(), strict=False) if keep}
        assert got == kept[t], f"token {t}"
        for j, e in enumerate(chosen[t]):
            if e not in kept[t]:
                assert routing.topk_weight[t, j] == 0


def test_no_dropping_at_inference():
    cfg = MoEConfig(
        hidden_size=8, moe_intermediate_size=4, n_routed_experts=4, num_experts_per_tok=2, capacity_factor=0.1
    )
    layer = MoE(cfg).eval()
    assert layer.gate(torch.randn(16, 8)).kept is None
    assert layer.train().gate(torch.randn(16, 8)).kept is not None


def test_forced_experts_in_more_groups_than_topk_group_are_all_chosen():
    cfg = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=4,
        n_routed_experts=16,
        n_shared_experts=0,
        num_experts_per_tok=3,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=1,
    )
    layer = MoE(cfg)
    layer.gate.set_expert_mask(forced=[0, 15])
    x = torch.randn(20, 8)
    routing = layer.gate(x)
    assert ((routing.topk_idx == 0).any(-1) & (routing.topk_idx == 15).any(-1)).all()
    _assert_matches_reference(layer, x, routing, forced=[0, 15])


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("disable_top", [1, 3])
def test_disable_top_takes_top_k_from_the_remaining_experts(scoring, disable_top):
    """DeepSeekMoE §4.5: per token, mask its `disable_top` best experts, choose top-K among the rest;
    the gate weights stay the token's own affinities."""
    cfg = MoEConfig(
        hidden_size=16, moe_intermediate_size=4, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2,
        scoring_func=scoring, aux_loss_alpha=0.0,
    )  # fmt: skip
    layer = _layer(cfg, 0)
    x = torch.randn(20, 16)
    layer.gate.set_expert_mask(disable_top=disable_top)
    routing = layer.gate(x)
    for t in range(20):
        ranked = routing.scores[t].argsort(descending=True).tolist()
        assert sorted(routing.topk_idx[t].tolist()) == sorted(ranked[disable_top : disable_top + 2])
        assert torch.equal(routing.topk_weight[t], routing.scores[t, routing.topk_idx[t]])
    layer.gate.clear_expert_mask()
    assert sorted(layer.gate(x).topk_idx[0].tolist()) == sorted(routing.scores[0].argsort(descending=True)[:2].tolist())


def test_bad_disable_top_is_refused():
    cfg = MoEConfig(
        hidden_size=8, moe_intermediate_size=4, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2
    )
    gate = MoE(cfg).gate
    with pytest.raises(ValueError, match="leaves 1 experts"):
        gate.set_expert_mask(disable_top=7)
    with pytest.raises(ValueError, match="integer >= 0"):
        gate.set_expert_mask(disable_top=-1)
    with pytest.raises(ValueError, match="cannot be combined"):
        gate.set_expert_mask(disabled=[1], disable_top=1)
