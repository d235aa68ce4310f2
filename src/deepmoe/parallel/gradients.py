"""Gradients of an expert-parallel model: the replicated weights averaged over the ranks, each rank's own
experts (already summed over every rank's tokens by the all-to-all's backward) scaled to the same global mean,
and one gradient norm over the whole sharded model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmoe.parallel.experts import expert_parameters


@torch.no_grad()
def scale_expert_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Under DDP, after each backward: divide the local experts' gradients by D (the size of `group`).

    DDP averages the replicated weights' gradients and leaves the experts alone (`ignore_experts_in_ddp`); an
    expert's gradient already sums every rank's tokens (the all-to-all's backward), so dividing by D makes it
    the gradient of the mean loss over the global batch, as `sync_gradients` does without DDP."""
    world = dist.get_world_size(group)
    for p in expert_parameters(model):
        if p.grad is not None:
            p.grad.div_(world)


def _flat_all_reduce(tensors: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum `tensors` over the group in place, as one flat buffer per dtype (in first-seen order, the same
    on every rank)."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        for t, part in zip(same, flat.split([t.numel() for t in same]), strict=True):
            t.copy_(part.view_as(t))


@torch.no_grad()
def sync_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """After each rank's backward of its mean loss: average the replicated weights' gradients, divide the
    local experts' by D, so every gradient is that of the mean loss over the global batch."""
    world = dist.get_world_size(group)
    experts = {id(p) for p in expert_parameters(model)}
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    _flat_all_reduce(replicated, group)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(world)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> float:
    """`torch.nn.utils.clip_grad_norm_` over the whole sharded model: the replicated gradients counted
    once, every rank's experts added; returns the global norm before clipping."""
    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else None

    def square_sum(sharded: bool) -> Tensor:
        parts = [p.grad.float().square().sum() for p in params if (id(p) in experts) == sharded]
        return torch.stack(parts).sum() if parts else torch.zeros((), device=device)

    sharded = square_sum(True)
    dist.all_reduce(sharded, group=group)
    norm = float((square_sum(False) + sharded).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm
