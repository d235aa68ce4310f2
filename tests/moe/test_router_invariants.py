"""Expert masks (R6) against group-limited routing (R3), for every topk_method: a mask is either refused by
`set_expert_mask`, or no token ever selects a disabled or out-of-group expert, misses a forced one, or gets
a NaN gate weight, whatever its scores and the selection bias. Refusals are checked too: each refused mask,
installed anyway, makes some token choose an invalid expert under some bias (the check is not just strict).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

from configs import tiny_moe, tiny_v3_moe
from deepmoe.config import MoEConfig
from deepmoe.moe.router import Router, worst_case_reach
from deepmoe.runtime import debug_checks

CASES = 400


def random_case(rng: random.Random) -> tuple[MoEConfig, list[int], list[int]]:
    method = rng.choice(["greedy", "group_limited_greedy", "noaux_tc"])
    n_group = 1 if method == "greedy" else rng.choice([2, 4, 8])
    per_group = rng.randint(2, 4)
    n = n_group * per_group
    topk_group = rng.choice([1, rng.randint(1, n_group)])
    k = rng.randint(1, min(topk_group * per_group, 6))
    config = tiny_moe(
        n_routed_experts=n, num_experts_per_tok=k, scoring_func=rng.choice(["softmax", "sigmoid"]),
        norm_topk_prob=rng.random() < 0.5, topk_method=method, n_group=n_group, topk_group=topk_group,
        use_expert_bias=rng.random() < 0.7,
    )  # fmt: skip
    forced = rng.sample(range(n), rng.randint(0, k))
    rest = [e for e in range(n) if e not in forced]
    mode = rng.choice(["any", "few", "beside forced", "groups"])
    if mode == "any":
        disabled = rng.sample(rest, rng.randint(0, len(rest)))
    elif mode == "few":
        disabled = rng.sample(rest, rng.randint(0, min(3, len(rest))))
    elif mode == "beside forced":  # the forced experts' group mates, and a few more
        mates = [e for e in rest if e // per_group in {f // per_group for f in forced}]
        others = [e for e in rest if e not in mates]
        disabled = rng.sample(mates, rng.randint(len(mates) // 2, len(mates)))
        disabled += rng.sample(others, rng.randint(0, min(2, len(others))))
    else:  # whole groups, or all but one expert of them (noaux_tc cannot score a group with one expert)
        disabled = []
        for g in rng.sample(range(n_group), rng.randint(1, n_group)):
            members = [e for e in rest if e // per_group == g]
            disabled += members[rng.randint(0, 1) :]
    return config, disabled, forced


def group_scores(choice: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """[T, G] what ranks a token's groups: the best (V2) or the top-2 sum (V3) of s + b, −inf for disabled."""
    grouped = choice.view(choice.shape[0], config.n_group, config.experts_per_group)
    if config.topk_method == "group_limited_greedy":
        return grouped.amax(-1)
    return grouped.topk(2, dim=-1).values.sum(-1)


def check_routing(router: Router, x: torch.Tensor, disabled: list[int], forced: list[int]) -> None:
    config = router.config
    routing = router(x)
    k = config.num_experts_per_tok
    assert not torch.isnan(routing.topk_weight).any()
    choice = routing.scores
    if router.e_score_correction_bias is not None:
        choice = choice + router.e_score_correction_bias
    choice = choice.masked_fill(torch.isin(torch.arange(config.n_routed_experts), torch.tensor(disabled)), -math.inf)
    grouped = config.topk_method != "greedy" and config.topk_group < config.n_group
    per_group = config.experts_per_group
    forced_groups = {e // per_group for e in forced}
    slots = max(0, config.topk_group - len(forced_groups))
    scores = group_scores(choice, config).tolist() if grouped else None
    for t, row in enumerate(routing.topk_idx.tolist()):
        assert len(set(row)) == k, f"token {t} chose {row}"
        assert not set(row) & set(disabled), f"token {t} chose disabled experts {set(row) & set(disabled)}"
        assert set(forced) <= set(row), f"token {t} chose {row} without all forced {forced}"
        if not grouped:
            continue
        others = [g for g in range(config.n_group) if g not in forced_groups]
        for e in row:
            g = e // per_group
            if g in forced_groups:
                continue
            better = sum(1 for h in others if scores[t][h] > scores[t][g])
            assert better < slots, f"token {t} chose expert {e} of group {g}, which is not among its best groups"


def install_anyway(router: Router, disabled: list[int], forced: list[int]) -> None:
    n = router.config.n_routed_experts
    router.disabled_experts.copy_(torch.isin(torch.arange(n), torch.tensor(disabled, dtype=torch.long)))
    router.forced_experts.copy_(torch.isin(torch.arange(n), torch.tensor(forced, dtype=torch.long)))
    router.has_expert_mask = True


def refusal_is_needed(config: MoEConfig, disabled: list[int], forced: list[int]) -> bool:
    """Some bias (favouring some choice of a token's free groups) makes a token short of valid experts."""
    config = dataclasses.replace(config, use_expert_bias=True)
    torch.manual_seed(0)
    router = Router(config)
    install_anyway(router, disabled, forced)
    x = torch.randn(4, config.hidden_size)
    per_group = config.experts_per_group
    forced_groups = {e // per_group for e in forced}
    free = [g for g in range(config.n_group) if g not in forced_groups]
    slots = max(0, config.topk_group - len(forced_groups))
    for favoured in itertools.combinations(free, min(slots, len(free))):
        bias = torch.zeros(config.n_routed_experts)
        for g in favoured:
            bias[g * per_group : (g + 1) * per_group] = 10.0
        router.e_score_correction_bias.copy_(bias)
        try:
            with debug_checks():  # the router asserts a valid choice only under the debug switch (a host sync)
                router(x)
        except RuntimeError as error:
            assert "disabled or out-of-group" in str(error)
            return True
    return False


def test_every_mask_is_refused_or_routes_validly():
    rng = random.Random(1234)
    accepted = refused = 0
    for case in range(CASES):
        config, disabled, forced = random_case(rng)
        torch.manual_seed(case)
        router = Router(config)
        try:
            router.set_expert_mask(disabled=disabled, forced=forced)
        except ValueError as error:
            assert "reachable" in str(error), (config, disabled, forced, error)
            assert refusal_is_needed(config, disabled, forced), f"needless refusal: {config}, {disabled}, {forced}"
            refused += 1
            continue
        accepted += 1
        for draw in range(3):
            if router.e_score_correction_bias is not None:
                scale = [0.3, 3.0, 0.0][draw]
                router.e_score_correction_bias.copy_(scale * torch.randn(config.n_routed_experts))
            x = torch.randn(16, config.hidden_size) * [1.0, 5.0, 0.1][draw]
            check_routing(router, x, disabled, forced)
        if router.e_score_correction_bias is not None:  # and after balancing steps
            for _ in range(5):
                router.update_bias(torch.bincount(router(x).topk_idx.flatten(), minlength=config.n_routed_experts))
            check_routing(router, x, disabled, forced)
    assert accepted > CASES // 4 and refused > CASES // 10, (accepted, refused)


@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
def test_forced_groups_count_against_topk_group(method):
    """The issue's case: the forced expert's group is the token's only group, and its partner is disabled."""
    config = tiny_v3_moe(hidden_size=32, moe_intermediate_size=16, n_shared_experts=2, topk_method=method, topk_group=1)
    router = Router(config)
    for disabled in ([1, 6, 7], [1]):
        with pytest.raises(ValueError, match="reachable"):
            router.set_expert_mask(forced=[0], disabled=disabled)
        assert not router.has_expert_mask
        assert worst_case_reach(config, torch.isin(torch.arange(8), torch.tensor(disabled)), torch.arange(8) == 0) == 1
    if method == "group_limited_greedy":  # group 0 still competes (its best expert scores it) with 1 expert
        with pytest.raises(ValueError, match="reachable"):
            router.set_expert_mask(disabled=[1])
        return
    router.set_expert_mask(disabled=[1])  # noaux_tc: a lone expert gives its group no top-2 score, so never chosen
    idx = router(torch.randn(64, 32)).topk_idx
    assert not ((idx == 0) | (idx == 1)).any()
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()
