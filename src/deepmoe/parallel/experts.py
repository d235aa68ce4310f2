"""Expert parallelism applied to a model from outside it: `apply_expert_parallel` cuts each MoE layer's routed
experts to this rank's slice, kept as a DTensor sharded over the expert-parallel mesh (so that gradient norms,
FSDP2 and distributed checkpoints see the whole [N_r, ...] tensor), and installs the all-to-all dispatcher;
the layer itself never slices its weights."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from deepmoe.moe.layer import MoE
from deepmoe.parallel.dispatch import ExpertParallelDispatcher


def _device_type(module: nn.Module) -> str:
    param = next(module.parameters(), None)
    return param.device.type if param is not None else "cpu"


@torch.no_grad()
def apply_expert_parallel(module: nn.Module, mesh: DeviceMesh | dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the routed experts of every MoE layer under `module` (a model, a lone `MoE`, any module holding
    them) over the E ranks of `mesh` (a 1-D DeviceMesh, a process group, or None: every rank), and return
    `module`.

    Each layer keeps only this rank's experts [r·N_r/E, (r+1)·N_r/E), as DTensors `Shard(0)` over the mesh,
    and dispatches with all-to-all (`ExpertParallelDispatcher`); router and shared experts are left as they
    are. Load or build the same full weights on every rank first, then call this.

    Each rank then computes exactly what the full layer computes on the same (local) tokens: routing, capacity
    and balance losses are per rank's batch, with n_devices = E so that B2, B3 and per-device capacity count
    the real ranks. Device-limited routing (R3) bounds ranks when n_group == E (group g = rank g's experts).
    An expert's gradient sums the loss gradients of every rank's tokens routed to it (the all-to-all's
    backward): data parallelism over the E ranks must not average it again (`deepmoe.parallel.parallelize`).
    """
    if isinstance(mesh, dist.ProcessGroup):
        mesh = DeviceMesh.from_group(mesh, _device_type(module))
    elif mesh is None:
        mesh = init_device_mesh(_device_type(module), (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"expert parallelism needs a 1-D device mesh, got {mesh.ndim} dimensions")
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for layer in layers:
        if layer.expert_parallel:
            raise ValueError("expert parallelism is already enabled on this MoE layer")
    # every check before any layer changes: a refusal leaves the whole module as it was
    group = mesh.get_group()
    dispatchers = [ExpertParallelDispatcher(layer.config.n_routed_experts, group) for layer in layers]
    configs = [
        dataclasses.replace(layer.config, n_devices=d.world) for layer, d in zip(layers, dispatchers, strict=True)
    ]
    for layer, dispatcher, config in zip(layers, dispatchers, configs, strict=True):
        layer.config = config
        experts = layer.experts
        for name, p in list(experts.named_parameters(recurse=False)):  # every expert tensor is [N_r, ...]
            local = p[dispatcher.local_experts].clone()
            sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            setattr(experts, name, nn.Parameter(sharded, p.requires_grad))
        experts.n_experts = dispatcher.n_local
        layer.dispatcher = dispatcher
    return module


def expert_parallel_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers under `model` whose routed experts are split over ranks."""
    return [m for m in model.modules() if isinstance(m, MoE) and m.expert_parallel]
