"""The `Dispatcher` protocol is the MoE layer's real seam: a reference dispatcher written here (a Python loop
over the experts, nothing shared with `LocalDispatcher`) plugged into `MoE` computes the same outputs, losses
and gradients as the local one."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from configs import tiny_moe
from deepmoe import MoE
from deepmoe.moe.dispatch import Dispatcher, LocalDispatcher
from deepmoe.moe.router import RouterOutput


@dataclass
class LoopState:
    row_weight: Tensor
    token_idx: Tensor
    n_tokens: int


class LoopDispatcher:
    """For each expert in turn, the kept (token, slot) pairs routed to it; combine sums each token's rows."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, LoopState]:
        kept = routing.kept if routing.kept is not None else torch.ones_like(routing.topk_idx, dtype=torch.bool)
        tokens, weights, counts = [], [], []
        for expert in range(self.n_experts):
            token, slot = ((routing.topk_idx == expert) & kept).nonzero(as_tuple=True)
            tokens.append(token)
            weights.append(routing.topk_weight[token, slot])
            counts.append(len(token))
        token_idx = torch.cat(tokens)
        return x[token_idx], torch.tensor(counts), LoopState(torch.cat(weights), token_idx, x.shape[0])

    def combine(self, expert_out: Tensor, state: LoopState) -> Tensor:
        return torch.stack([expert_out[state.token_idx == t].sum(0) for t in range(state.n_tokens)])


CASES = {
    "greedy": dict(aux_loss_alpha=0.01),
    "dropping": dict(capacity_factor=0.6, drop_policy="position", seq_aux_loss_alpha=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
def test_custom_dispatcher_matches_local(case):
    config = tiny_moe(hidden_size=16, moe_intermediate_size=8, n_shared_experts=1, **CASES[case])
    torch.manual_seed(0)
    local = MoE(config).train()
    custom = copy.deepcopy(local)
    custom.dispatcher = LoopDispatcher(config.n_routed_experts)
    assert isinstance(local.dispatcher, LocalDispatcher) and not custom.expert_parallel
    x = torch.randn(2, 12, 16)
    upstream = torch.randn_like(x)

    grads, outs = [], []
    for layer in (local, custom):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        ((out.hidden_states * upstream).sum() + out.aux_loss).backward()
        outs.append(out)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}})

    if case == "dropping":
        assert not outs[0].routing.kept.all()  # some slots dropped: the custom one must leave them out
    torch.testing.assert_close(outs[1].hidden_states, outs[0].hidden_states)
    torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=lambda m, name=name: f"{name} grad: {m}")


def test_dispatcher_given_to_the_constructor():
    config = tiny_moe(hidden_size=16, moe_intermediate_size=8, n_shared_experts=2)
    dispatcher: Dispatcher = LoopDispatcher(config.n_routed_experts)
    layer = MoE(config, dispatcher=dispatcher)
    assert layer.dispatcher is dispatcher
    assert isinstance(MoE(config).dispatcher, LocalDispatcher)
    assert layer(torch.randn(5, 16)).hidden_states.shape == (5, 16)
