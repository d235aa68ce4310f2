"""The expert-parallel dispatcher: `deepmoe.moe.dispatch.Dispatcher` over the ranks of a process group, with
all-to-all (docs/design.md#d1-expert-parallelism). `apply_expert_parallel` installs it in the MoE layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from deepmoe.moe.router import RouterOutput


class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` with uneven splits: the gradient goes back by the inverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


@dataclass
class Traffic:
    """What one rank sent to the other ranks in one layer's forward (and, when training, backward)."""

    rows_sent: int = 0
    """Token rows dispatched to other ranks: one per unique (token, remote rank) pair."""
    rows_received: int = 0
    """Token rows other ranks dispatched to this one."""
    forward_bytes: int = 0
    """Dispatch (hidden rows + gate weights + local expert ids + counts) and combine (result rows)."""
    backward_bytes: int = 0
    """The gradients of the two differentiable exchanges (0 without autograd)."""

    def __iadd__(self, other: Traffic) -> Traffic:
        self.rows_sent += other.rows_sent
        self.rows_received += other.rows_received
        self.forward_bytes += other.forward_bytes
        self.backward_bytes += other.backward_bytes
        return self

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes


@dataclass
class ExpertParallelState:
    """What `ExpertParallelDispatcher.combine` needs to undo its `dispatch`."""

    row_weight: Tensor
    """[S] float32, gate weight of each expert-sorted slot (the experts apply it)."""
    slot_row: Tensor
    """[S] int64, the received row each slot came from."""
    n_received: int
    """R, rows received from all ranks."""
    pair_token: Tensor
    """[P] int64, the local token of each row sent (sorted by destination rank)."""
    n_tokens: int
    """T, this rank's tokens."""
    send_counts: list[int]
    """Rows sent to each rank: the dispatch's input splits, the combine's output splits."""
    recv_counts: list[int]
    """Rows received from each rank."""


class ExpertParallelDispatcher:
    """Expert parallelism over a process group of D ranks: rank r holds routed experts
    [r·N_r/D, (r+1)·N_r/D) and the tokens of its own batch shard.

    dispatch: every token goes once to each rank holding one of its chosen (kept) experts — one row per
    unique (token, rank) pair, with its K gate weights packed alongside (the ones for other ranks'
    experts are 0) and, in a separate integer exchange, its K local expert ids (N_r/D where unused).
    The receiving rank expands rows into (row, local expert) slots sorted by expert for the grouped
    product. combine: each received row's weighted expert outputs are summed, sent back by the inverse
    exchange and added into the tokens. Counts are exchanged first; the row exchanges are differentiable.
    """

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.world:
            raise ValueError(f"n_routed_experts={n_experts} must be divisible by the expert-parallel size {self.world}")
        self.n_experts = n_experts
        self.n_local = n_experts // self.world
        self.traffic = Traffic()
        """Accumulated over forwards until `reset_traffic` (the trainer reads it once per step)."""

    @property
    def local_experts(self) -> slice:
        """The routed experts this rank holds, [r·N_r/D, (r+1)·N_r/D)."""
        return slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def reset_traffic(self) -> Traffic:
        """The traffic counted since the last reset; counting starts again from 0."""
        traffic, self.traffic = self.traffic, Traffic()
        return traffic

    def _exchange_counts(self, send_counts: Tensor) -> list[int]:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        return recv_counts.tolist()

    def dispatch(self, x: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, ExpertParallelState]:
        """x [T, H] (this rank's tokens) → (rows [S, H] for the local experts sorted by expert,
        tokens_per_expert [N_r/D], state); S = the received (row, local expert) slots that were kept."""
        t, k = routing.topk_idx.shape
        n_local, world = self.n_local, self.world
        rank_of = routing.topk_idx // n_local  # [T, K], the rank owning each chosen expert
        valid = routing.kept if routing.kept is not None else torch.ones_like(rank_of, dtype=torch.bool)
        sent = torch.zeros(t, world, dtype=torch.bool, device=x.device)
        sent[torch.arange(t, device=x.device).unsqueeze(1).expand(t, k)[valid], rank_of[valid]] = True
        pair_rank, pair_token = sent.t().nonzero(as_tuple=True)  # unique (rank, token) pairs, sorted by rank
        send_counts = torch.bincount(pair_rank, minlength=world)
        send, recv = send_counts.tolist(), self._exchange_counts(send_counts)

        mine = (rank_of[pair_token] == pair_rank.unsqueeze(1)) & valid[pair_token]  # [P, K] slots for that rank
        local_ids = torch.where(mine, routing.topk_idx[pair_token] % n_local, n_local).to(torch.int32)
        weights = torch.where(mine, routing.topk_weight[pair_token], 0.0)
        payload = torch.cat([x.index_select(0, pair_token), weights.to(x.dtype)], dim=1)  # [P, H + K]
        received = _AllToAll.apply(payload, send, recv, self.group)  # [R, H + K]
        recv_ids = local_ids.new_empty((sum(recv), k))
        dist.all_to_all_single(recv_ids, local_ids, output_split_sizes=recv, input_split_sizes=send, group=self.group)

        h = x.shape[1]
        flat_ids = recv_ids.reshape(-1).long()
        counts = torch.bincount(flat_ids, minlength=n_local + 1)[:n_local]
        order = flat_ids.argsort(stable=True)[: int(counts.sum())]  # unused slots (id n_local) sort last
        row_idx = order // k
        rows = received[:, :h].index_select(0, row_idx)
        row_weight = received[:, h:].reshape(-1)[order].float()
        remote_sent, remote_recv = self._remote(send), self._remote(recv)
        meta = remote_sent * k * local_ids.element_size() + (world - 1) * send_counts.element_size()
        traffic = Traffic(remote_sent, remote_recv, remote_sent * payload.shape[1] * payload.element_size() + meta)
        if received.requires_grad:  # backward sends the gradient of every received row back
            traffic.backward_bytes = remote_recv * payload.shape[1] * payload.element_size()
        self.traffic += traffic
        state = ExpertParallelState(row_weight, row_idx, sum(recv), pair_token, t, send, recv)
        return rows, counts, state

    def combine(self, expert_out: Tensor, state: ExpertParallelState) -> Tensor:
        """expert_out [S, H] (gate-weighted slots) → [T, H]: summed per received row, sent back, summed per token."""
        h = expert_out.shape[-1]
        per_row = expert_out.new_zeros(state.n_received, h).index_add_(0, state.slot_row, expert_out)
        back = _AllToAll.apply(per_row, state.recv_counts, state.send_counts, self.group)  # [P, H]
        self.traffic.forward_bytes += self._remote(state.recv_counts) * h * back.element_size()
        if back.requires_grad:
            self.traffic.backward_bytes += self._remote(state.send_counts) * h * back.element_size()
        return back.new_zeros(state.n_tokens, h).index_add_(0, state.pair_token, back)

    def _remote(self, counts: list[int]) -> int:
        """Rows of `counts` that cross to another rank (the own rank's share is a local copy)."""
        return sum(counts) - counts[self.rank]
