"""Expert parallelism applied to a model from outside it: `apply_expert_parallel` cuts each MoE layer's routed
experts to this rank's slice and installs the all-to-all dispatcher; the layer itself never slices its weights.
Also what DDP and checkpoints need of the sharded experts: marking them for DDP to ignore, and gathering /
cutting full expert tensors (state dicts, optimizer moments) to and from the shards."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from deepmoe.moe.layer import MoE
from deepmoe.parallel.dispatch import ExpertParallelDispatcher


@torch.no_grad()
def apply_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the routed experts of every MoE layer under `module` (a model, a lone `MoE`, any module holding
    them) over the D ranks of `group` (None: the default group), and return `module`.

    Each layer keeps only this rank's experts [r·N_r/D, (r+1)·N_r/D) and dispatches with all-to-all
    (`ExpertParallelDispatcher`); router and shared experts stay replicated. The sharded experts are marked for
    `DistributedDataParallel` to leave alone (`ignore_experts_in_ddp`), on `module` and on each layer. Load or
    build the same full weights on every rank first, then call this.

    Each rank then computes exactly what the full layer computes on the same (local) tokens: routing, capacity
    and balance losses are per rank's batch, with n_devices = D so that B2, B3 and per-device capacity count
    the real ranks. Device-limited routing (R3) bounds ranks when n_group == D (group g = rank g's experts).
    """
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for layer in layers:
        if layer.expert_parallel:
            raise ValueError("expert parallelism is already enabled on this MoE layer")
    # every check before any layer changes: a refusal leaves the whole module as it was
    dispatchers = [ExpertParallelDispatcher(layer.config.n_routed_experts, group) for layer in layers]
    configs = [
        dataclasses.replace(layer.config, n_devices=d.world) for layer, d in zip(layers, dispatchers, strict=True)
    ]
    for layer, dispatcher, config in zip(layers, dispatchers, configs, strict=True):
        layer.config = config
        experts = layer.experts
        for name, p in list(experts.named_parameters(recurse=False)):  # every expert tensor is [N_r, ...]
            setattr(experts, name, nn.Parameter(p[dispatcher.local_experts].clone(), p.requires_grad))
        experts.n_experts = dispatcher.n_local
        layer.dispatcher = dispatcher
        ignore_experts_in_ddp(layer)  # DistributedDataParallel(layer) as well as DistributedDataParallel(module)
    ignore_experts_in_ddp(module)
    return module


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert weights of the layers that shard them (one rank's slice each)."""
    return [p for m in model.modules() if isinstance(m, MoE) and m.expert_parallel for p in m.experts.parameters()]


def ignore_experts_in_ddp(module: nn.Module) -> list[str]:
    """Mark the sharded routed experts under `module` for `DistributedDataParallel(module)` to leave alone, and
    return their names (relative to `module`; names marked before are kept).

    DDP would otherwise broadcast rank 0's experts over every rank's own shard when it wraps the module, and
    average the gradients of different experts. `apply_expert_parallel` marks the module it is given and each
    MoE layer; call this on the module given to DDP when DDP wraps another module around them, after
    `apply_expert_parallel` and before `DistributedDataParallel(...)`. Then, after each backward,
    `scale_expert_gradients` (DDP averages only the replicated weights).
    """
    experts = {id(p) for p in expert_parameters(module)}
    names = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    names += [name for name, p in module.named_parameters() if id(p) in experts and name not in names]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def _expert_layers(tensors: dict[str, Tensor], model: nn.Module, prefix: str) -> dict[str, MoE]:
    """Keys of `tensors` that hold a sharded routed-expert tensor — `prefix + name` or `prefix + name + ".*"`
    (e.g. an optimizer's moments), with a leading expert dimension — each with its layer."""
    layers = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MoE) and module.expert_parallel:
            for name, _ in module.experts.named_parameters():
                layers[f"{prefix}{module_name}.experts.{name}"] = module
    found = {}
    for key, t in tensors.items():
        name = key if key in layers else key.rpartition(".")[0]
        if name in layers and t.dim() > 0:
            found[key] = layers[name]
    return found


@torch.no_grad()
def gather_experts(tensors: dict[str, Tensor], model: nn.Module, prefix: str = "", dst: int = 0) -> dict[str, Tensor]:
    """`tensors` (a state dict, or optimizer tensors with `prefix`) with each sharded expert tensor replaced by
    the full [N_r, ...] one on group rank `dst`, on the CPU. A collective: every rank calls it; the others get
    their tensors back unchanged."""
    out = dict(tensors)
    for key, layer in _expert_layers(tensors, model, prefix).items():
        d: ExpertParallelDispatcher = layer.dispatcher
        shard = tensors[key].contiguous()
        parts = [torch.empty_like(shard) for _ in range(d.world)] if d.rank == dst else None
        dist.gather(shard, parts, dst=dist.get_global_rank(d.group, dst) if d.group else dst, group=d.group)
        if parts is not None:
            out[key] = torch.cat(parts).cpu()
    return out


def shard_experts(tensors: dict[str, Tensor], model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The inverse of `gather_experts` on every rank: each full expert tensor cut to this rank's experts."""
    out = dict(tensors)
    for key, layer in _expert_layers(tensors, model, prefix).items():
        out[key] = tensors[key][layer.dispatcher.local_experts].clone()
    return out
