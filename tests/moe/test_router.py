"""Router (R1–R6) against the per-token reference in tests/reference.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import tiny_moe, tiny_v3_moe
from deepmoe import MoE, MoEConfig
from deepmoe.moe.router import Router
from reference import capacity_keep, route
from strategies import moe_configs, random_bias


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(torch.get_default_device()).manual_seed(seed)


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
    x = torch.randn(n_tokens, cfg.hidden_size, generator=_generator(seed))
    _assert_matches_reference(layer, x, layer.gate(x))


@settings(max_examples=40, deadline=None)
@given(cfg=moe_configs(topk_method="noaux_tc"), n_tokens=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_group_limit_keeps_tokens_inside_their_groups(cfg, n_tokens, seed):
    layer = _layer(cfg, seed)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=_generator(seed))
    groups = layer.gate(x).topk_idx // cfg.experts_per_group
    for t in range(n_tokens):
        assert len(set(groups[t].tolist())) <= cfg.topk_group


def test_masked_groups_use_minus_infinity_not_zero():
    """With a large negative bias, 0-filling out-of-group experts would let them win; −inf must not."""
    cfg = tiny_v3_moe(topk_group=1)
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
    x = torch.randn(n_tokens, cfg.hidden_size, generator=_generator(seed))
    routing = layer.gate(x)
    for t in range(n_tokens):
        chosen = set(routing.topk_idx[t].tolist())
        assert not chosen & set(disabled)
        assert set(forced) <= chosen
    _assert_matches_reference(layer, x, routing, disabled, forced)


def test_forced_expert_outside_the_best_groups_is_still_chosen():
    cfg = tiny_v3_moe(n_routed_experts=16, n_group=8, topk_group=1)
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
    cfg = tiny_moe()
    layer = MoE(cfg)
    with pytest.raises(ValueError, match=message):
        layer.gate.set_expert_mask(disabled=disabled, forced=forced)


def test_bias_changes_selection_but_not_weights():
    cfg = tiny_moe(scoring_func="sigmoid", use_expert_bias=True)
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
    cfg = tiny_moe(n_routed_experts=4, num_experts_per_tok=1, use_expert_bias=True, bias_update_speed=0.01)
    layer = MoE(cfg)
    layer.update_bias(torch.tensor([10, 2, 4, 4]))  # mean 5
    assert layer.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    with pytest.raises(ValueError, match="shape"):
        layer.update_bias(torch.ones(3))
    with pytest.raises(ValueError, match="use_expert_bias"):
        MoE(tiny_moe(n_routed_experts=4, num_experts_per_tok=1)).update_bias(torch.ones(4))


def test_bias_is_saved_in_the_state_dict_under_its_hf_name():
    layer = MoE(tiny_moe(n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=1, use_expert_bias=True))
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
    x = torch.randn(batch * seq, cfg.hidden_size, generator=_generator(seed))
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
    cfg = tiny_moe(n_routed_experts=4, n_shared_experts=2, capacity_factor=0.1)
    layer = MoE(cfg).eval()
    assert layer.gate(torch.randn(16, 8)).kept is None
    assert layer.train().gate(torch.randn(16, 8)).kept is not None


def test_forced_experts_in_more_groups_than_topk_group_are_all_chosen():
    cfg = tiny_moe(
        n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=1
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
    cfg = tiny_moe(hidden_size=16, scoring_func=scoring, aux_loss_alpha=0.0)
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
    cfg = tiny_moe()
    gate = MoE(cfg).gate
    with pytest.raises(ValueError, match="leaves 1 experts"):
        gate.set_expert_mask(disable_top=7)
    with pytest.raises(ValueError, match="integer >= 0"):
        gate.set_expert_mask(disable_top=-1)
    with pytest.raises(ValueError, match="cannot be combined"):
        gate.set_expert_mask(disabled=[1], disable_top=1)


# ---- masks given as bool masks or ids (finding 9) -------------------------------------------------------------
def _gate(**fields) -> Router:
    return Router(tiny_moe(**fields))


@pytest.mark.cpu_only  # numpy masks
@pytest.mark.parametrize(
    "make", [lambda m: m, lambda m: m.tolist(), lambda m: m.numpy(), lambda m: list(m.numpy())], ids=str
)
def test_a_bool_mask_is_a_mask_not_ids(make):
    gate = _gate()
    mask = torch.zeros(8, dtype=torch.bool)
    mask[5] = True
    gate.set_expert_mask(disabled=make(mask))
    assert gate.disabled_experts.tolist() == mask.tolist()
    gate.set_expert_mask(forced=make(mask))
    assert gate.forced_experts.tolist() == mask.tolist() and not gate.disabled_experts.any()
    gate.set_expert_mask(disabled=make(torch.zeros(8, dtype=torch.bool)))  # all False: nothing disabled
    assert not gate.disabled_experts.any() and not gate.has_expert_mask
    x = torch.randn(32, 8)
    gate.set_expert_mask(disabled=make(mask), forced=make(torch.arange(8) == 2))
    idx = gate(x).topk_idx
    assert not (idx == 5).any() and (idx == 2).any(-1).all()


@pytest.mark.parametrize(
    "ids", [[5, 3], (5, 3), range(3, 6, 2), torch.tensor([5, 3]), np.array([5, 3]), [np.int64(5), torch.tensor(3)]]
)
def test_integer_ids_are_accepted(ids):
    gate = _gate()
    gate.set_expert_mask(disabled=ids)
    assert gate.disabled_experts.nonzero().flatten().tolist() == [3, 5]


@pytest.mark.parametrize(
    "what, value, message",
    [
        ("disabled", [2.9], "disabled expert ids must be integers"),
        ("disabled", [2.0], "disabled expert ids must be integers"),
        ("forced", torch.tensor([1.0]), "forced expert ids must be integers"),
        ("disabled", np.array([2.5]), "disabled expert ids must be integers"),
        ("forced", ["1"], "forced expert ids must be integers"),
        ("disabled", [True, 3], "disabled mixes bools and expert ids"),
        ("disabled", torch.zeros(7, dtype=torch.bool), r"disabled is a bool mask of shape \(7,\)"),
        ("forced", [True] * 9, r"forced is a bool mask of shape \(9,\)"),
        ("disabled", torch.zeros(2, 8, dtype=torch.bool), "disabled is a bool mask of shape"),
        ("forced", torch.tensor([[1, 2]]), "forced expert ids must be a flat list"),
        ("disabled", [-1], "out of range"),
        ("disabled", 1.0, "disabled must be expert ids or a bool mask"),
    ],
)
def test_bad_expert_selections_are_refused(what, value, message):
    gate = _gate()
    gate.set_expert_mask(disabled=[7])
    with pytest.raises(ValueError, match=message):
        gate.set_expert_mask(**{what: value})
    assert gate.disabled_experts.nonzero().flatten().tolist() == [7]  # a refused mask changes nothing


# ---- forced experts and group limits (finding 10) --------------------------------------------------------------
def test_groups_without_a_score_fill_the_slots_in_index_order_as_the_reference():
    """noaux_tc: groups 0–2 keep one enabled expert each, so they tie at −inf; the token takes group 3 and the
    first of them (group 0), so expert 0 is reachable, 2 and 4 are not, and every choice is an enabled expert."""
    cfg = tiny_v3_moe()
    layer = _layer(cfg, 3)
    layer.gate.set_expert_mask(disabled=[1, 3, 5])
    layer.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.7, 0.0, 0.0, 0.0]))
    x = torch.randn(32, 8)
    routing = layer.gate(x)
    assert set(routing.topk_idx.flatten().tolist()) <= {0, 6, 7}
    assert (routing.topk_idx == 0).any(-1).all()  # its bias makes it the best of the reachable experts
    _assert_matches_reference(layer, x, routing, disabled=[1, 3, 5])


# ---- meta-device init (finding 11) -----------------------------------------------------------------------------
@pytest.mark.cpu_only  # to_empty(device="cpu")
def test_reset_parameters_initialises_a_meta_router():
    cfg = tiny_v3_moe()
    torch.manual_seed(0)
    eager = Router(cfg)
    eager.e_score_correction_bias.copy_(torch.randn(8))
    with torch.device("meta"):
        lazy = Router(cfg)
    for _ in range(3):  # whatever memory to_empty hands out
        lazy.to_empty(device="cpu")
        lazy.e_score_correction_bias.fill_(float("nan"))
        lazy.disabled_experts.fill_(True)
        lazy.reset_parameters()
        assert torch.equal(lazy.e_score_correction_bias, torch.zeros(8))
        assert not lazy.disabled_experts.any() and not lazy.forced_experts.any() and not lazy.has_expert_mask
        assert torch.isfinite(lazy.weight).all() and lazy.weight.abs().max() <= 1 / 8**0.5
    lazy.load_state_dict(eager.state_dict())
    x = torch.randn(16, 8)
    a, b = eager(x), lazy(x)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.topk_weight, b.topk_weight)


# ---- the bias stays float32 (finding 12) -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        pytest.param(lambda m: m.to("cpu", torch.bfloat16), marks=pytest.mark.cpu_only),  # moves to the CPU
        lambda m: m.double(),
        lambda m: torch.nn.Sequential(m).to(torch.bfloat16)[0],
    ],
    ids=["to", "half", "bfloat16", "to device and dtype", "double", "parent"],
)
def test_module_casts_keep_the_bias_float32(cast):
    cfg = tiny_moe(n_routed_experts=4, num_experts_per_tok=1, use_expert_bias=True, bias_update_speed=1e-3)
    gate = Router(cfg)
    gate.e_score_correction_bias.copy_(torch.tensor([0.1234567, -0.5, 0.0, 1e-4]))
    before = gate.e_score_correction_bias.clone()
    gate = cast(gate)
    assert gate.weight.dtype != torch.float32
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, before)
    gate.e_score_correction_bias.zero_()
    for _ in range(1000):
        gate.update_bias(torch.tensor([0, 10, 0, 10]))
    assert gate.e_score_correction_bias.tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-4)
    assert gate.e_score_correction_bias.dtype == torch.float32


def test_load_state_dict_assign_keeps_the_bias_float32():
    cfg = tiny_moe(n_routed_experts=4, num_experts_per_tok=1, use_expert_bias=True)
    gate = Router(cfg)
    state = {k: v.to(torch.bfloat16) for k, v in gate.state_dict().items()}
    gate.load_state_dict(state, assign=True)
    assert gate.e_score_correction_bias.dtype == torch.float32


def test_a_bf16_router_selects_as_float32_math_on_its_weights():
    """Scores differ by ~1e-5, the bias by 1e-3 (finer than bf16 resolves near 1.0): the bias decides."""
    cfg = tiny_moe(
        hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, scoring_func="sigmoid", use_expert_bias=True,
        norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(0)
    gate = Router(cfg)
    with torch.no_grad():
        gate.weight.mul_(1e-4)
        gate.e_score_correction_bias.copy_(1.0 + 1e-3 * torch.randperm(16).float())
    reference = Router(cfg)
    half = Router(cfg)
    half.load_state_dict(gate.state_dict())
    half.to(torch.bfloat16)
    reference.load_state_dict({**gate.state_dict(), "weight": half.weight.float()})
    x = torch.randn(32, 16)
    got, want = half(x.bfloat16()), reference(x.bfloat16().float())
    assert torch.equal(got.topk_idx, want.topk_idx)
    assert torch.equal(got.topk_weight, want.topk_weight)
    assert set(got.topk_idx.flatten().tolist()) == set(gate.e_score_correction_bias.topk(4).indices.tolist())


# ---- data-parallel bias updates (finding 16) -------------------------------------------------------------------
BIAS_STEPS, BIAS_EXPERTS = 4, 8


def _rank_load(rank: int, step: int) -> torch.Tensor:
    load = torch.randint(0, 20, (BIAS_EXPERTS,), generator=torch.Generator().manual_seed(100 * step + rank))
    return load.float() / 7 if step == BIAS_STEPS - 1 else load  # the last step: a float load


def _bias_router() -> Router:
    cfg = tiny_moe(n_routed_experts=BIAS_EXPERTS, use_expert_bias=True, bias_update_speed=0.01)
    return Router(cfg)


def bias_worker(out: str) -> None:
    import torch.distributed as dist

    from deepmoe.parallel import init_from_env
    from distributed import write_result

    torch.set_num_threads(1)
    rank, world = init_from_env("cpu")
    synced, local = _bias_router(), _bias_router()
    for step in range(BIAS_STEPS):
        load = _rank_load(rank, step)
        synced.update_bias(load, process_group=dist.group.WORLD)
        local.update_bias(load)
        assert torch.equal(load, _rank_load(rank, step))  # the caller's load is not summed in place
    result = {"synced": synced.e_score_correction_bias.tolist(), "local": local.e_score_correction_bias.tolist()}
    write_result(out, rank, result)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.cpu_only  # gloo process group in subprocesses
def test_update_bias_over_a_process_group_sums_the_load(tmp_path):
    from distributed import launch

    ranks = launch(2, __file__, ["bias"], tmp_path)
    single = _bias_router()
    for step in range(BIAS_STEPS):
        single.update_bias(_rank_load(0, step) + _rank_load(1, step))
    assert ranks[0]["synced"] == ranks[1]["synced"] == single.e_score_correction_bias.tolist()
    assert ranks[0]["local"] != ranks[1]["local"]  # without the group each rank follows its own load


if __name__ == "__main__":
    if sys.argv[1] == "bias":
        bias_worker(sys.argv[2])
