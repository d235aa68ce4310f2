"""Token dispatchers: move tokens to their experts and back (they never score them).

A dispatcher turns (tokens, routing) into expert-sorted rows, per-expert
counts and each row's gate weight, and sums the experts' (already gate-
weighted) rows back into one output per token. The local dispatcher does this
in one process; an expert-parallel one implements the same two methods with
all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepmoe.moe.router import RouterOutput


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`."""

    token_idx: Tensor
    """[S] int64, source token of each expert-sorted row."""
    row_weight: Tensor
    """[S] float32, gate weight g_i,t of each row (the experts apply it)."""
    n_tokens: int


class LocalDispatcher:
    """Sort the T·K (token, expert) slots by expert; dropped slots are left out."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, DispatchState]:
        """x [T, H] → (rows [S, H] sorted by expert, tokens_per_expert [N_r], state); S ≤ T·K."""
        n, k = self.n_experts, routing.topk_idx.shape[1]
        flat_expert = routing.topk_idx.reshape(-1)
        n_rows = flat_expert.numel()
        if routing.kept is not None:  # dropped slots get a sentinel id that sorts last
            flat_expert = flat_expert.masked_fill(~routing.kept.reshape(-1), n)
        counts = torch.bincount(flat_expert, minlength=n + 1)[:n]
        order = flat_expert.argsort(stable=True)
        if routing.kept is not None:
            n_rows = int(counts.sum())
            order = order[:n_rows]
        token_idx = order // k
        rows = x.index_select(0, token_idx)
        return rows, counts, DispatchState(token_idx, routing.topk_weight.reshape(-1)[order], x.shape[0])

    def combine(self, expert_out: Tensor, state: DispatchState) -> Tensor:
        """expert_out [S, H] (gate-weighted rows) → [T, H], the sum of each token's rows."""
        out = expert_out.new_zeros(state.n_tokens, expert_out.shape[-1])
        return out.index_add_(0, state.token_idx, expert_out)
