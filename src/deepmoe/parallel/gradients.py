"""Gradient clipping over a sharded model: `torch.nn.utils` on DTensor gradients that live on more than one
device mesh (FSDP2's dense weights and the expert-parallel experts)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` for parameters that may be DTensors on several meshes; returns the global
    2-norm of the gradients before clipping (a float, the same on every rank).

    The gradients of each mesh (plain tensors form one group) get their norm from
    `torch.nn.utils.get_total_norm`, made whole over the mesh (`DTensor.full_tensor`: a partial norm is
    reduced over the ranks that shard it); the group norms combine into the total, and
    `torch.nn.utils.clip_grads_with_norm_` scales each group by max_norm / total (when below 1). With one group
    of plain tensors this is exactly `clip_grad_norm_`.
    """
    groups: dict[object, list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    if not groups:
        return 0.0
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
