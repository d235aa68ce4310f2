"""Token dispatchers: move tokens to their experts and back (they never score them).

`Dispatcher` is the seam between the MoE layer and where its experts live: the layer routes, asks its
dispatcher for expert-sorted rows, runs its experts on them and hands the (gate-weighted) results back to
be summed into one output per token. `LocalDispatcher` (here) does this in one process;
`deepmoe.parallel.ExpertParallelDispatcher` implements the same two methods with all-to-all over ranks that
each hold a slice of the experts (`deepmoe.parallel.apply_expert_parallel` installs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from deepmoe.moe.router import RouterOutput, count_ids


class DispatchState(Protocol):
    """What a dispatcher's `dispatch` hands the layer besides the rows: the layer reads `row_weight` (for
    its experts) and gives the whole state back to `combine`."""

    row_weight: Tensor
    """[S] float32, gate weight g_i,t of each expert-sorted row (the experts apply it)."""


StateT = TypeVar("StateT", bound=DispatchState)


class Dispatcher(Protocol[StateT]):
    """What `MoE` asks of its dispatcher (`MoE(config, dispatcher=...)`, or `layer.dispatcher = ...`)."""

    def dispatch(self, x: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, StateT]:
        """x [T, H] → (rows [S, H] sorted by expert, tokens_per_expert [E] for the E experts the layer holds,
        state); a row's gate weight is `state.row_weight`."""
        ...

    def combine(self, expert_out: Tensor, state: StateT) -> Tensor:
        """expert_out [S, H] (the experts' gate-weighted rows) → [T, H], the sum of each token's rows."""
        ...


@dataclass
class LocalDispatchState:
    """What `LocalDispatcher.combine` needs to undo its `dispatch`."""

    token_idx: Tensor
    """[S] int64, source token of each expert-sorted row."""
    row_weight: Tensor
    """[S] float32, gate weight g_i,t of each row (the experts apply it)."""
    n_tokens: int


class LocalDispatcher:
    """Sort the T·K (token, expert) slots by expert.

    Shapes depend on T and K only, never on the routing (no device→host sync, `torch.compile` traces it
    without a graph break): slots dropped by capacity stay in, after every kept row, with gate weight 0, and
    are counted as the last expert's rows, so they add exactly 0 to their token (their product is computed:
    the dropped fraction of the expert FLOPs).
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, LocalDispatchState]:
        """x [T, H] → (rows [S, H] sorted by expert, tokens_per_expert [N_r], state); S = T·K, dropped slots
        (gate weight 0) last, in the last expert's count."""
        n, k = self.n_experts, routing.topk_idx.shape[1]
        flat_expert = routing.topk_idx.reshape(-1)
        if routing.kept is not None:  # dropped slots get a sentinel id that sorts last
            flat_expert = flat_expert.masked_fill(~routing.kept.reshape(-1), n)
            counts = count_ids(flat_expert, n + 1)
            counts = torch.cat([counts[: n - 1], counts[n - 1 :].sum(0, keepdim=True)])  # the last expert takes them
        else:
            counts = count_ids(flat_expert, n)
        order = flat_expert.argsort(stable=True)
        token_idx = order // k
        rows = x.index_select(0, token_idx)
        return rows, counts, LocalDispatchState(token_idx, routing.topk_weight.reshape(-1)[order], x.shape[0])

    def combine(self, expert_out: Tensor, state: LocalDispatchState) -> Tensor:
        """expert_out [S, H] (gate-weighted rows) → [T, H], the sum of each token's rows."""
        out = expert_out.new_zeros(state.n_tokens, expert_out.shape[-1])
        return out.index_add_(0, state.token_idx, expert_out)
