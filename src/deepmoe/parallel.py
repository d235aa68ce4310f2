"""Process-group plumbing for expert parallelism (docs/design.md#d1-expert-parallelism) on `torch.distributed`.

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on GPUs,
gloo on CPUs. The D ranks of the expert-parallel group are also data-parallel for everything that is not a
routed expert: those weights are replicated and their gradients averaged; each rank's routed experts are
its own, their gradients (already summed over every rank's tokens by the all-to-all's backward) are scaled
to the same global mean: `sync_gradients` does both; under DistributedDataParallel, DDP averages the replicated
weights (the experts are marked for it to ignore, `ignore_experts_in_ddp`) and `scale_expert_gradients` scales
the experts'.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmoe.moe.layer import MoE


def init_from_env(device_type: str = "cpu") -> tuple[int, int]:
    """(rank, world size) of the default process group, initialised from torchrun's environment if it is not
    yet (NCCL for "cuda", with this process on GPU LOCAL_RANK; gloo otherwise). (0, 1) outside torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert weights of the layers that shard them (one rank's slice each)."""
    return [p for m in model.modules() if isinstance(m, MoE) and m.expert_parallel for p in m.experts.parameters()]


def ignore_experts_in_ddp(module: nn.Module) -> list[str]:
    """Mark the sharded routed experts under `module` for `DistributedDataParallel(module)` to leave alone, and
    return their names (relative to `module`; names marked before are kept).

    DDP would otherwise broadcast rank 0's experts over every rank's own shard when it wraps the module, and
    average the gradients of different experts. Call it on the module given to DDP, after
    `enable_expert_parallel` and before `DistributedDataParallel(...)`; `DeepSeekForCausalLM` and `MoE` do it
    for themselves in their `enable_expert_parallel`, so it is needed only when DDP wraps another module around
    them. Then, after each backward, `scale_expert_gradients` (DDP averages only the replicated weights).
    """
    from torch.nn.parallel import DistributedDataParallel

    experts = {id(p) for p in expert_parameters(module)}
    names = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    names += [name for name, p in module.named_parameters() if id(p) in experts and name not in names]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


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
        group = layer.dispatcher.group
        shard = tensors[key].contiguous()
        parts = (
            [torch.empty_like(shard) for _ in range(layer.dispatcher.world)] if layer.dispatcher.rank == dst else None
        )
        dist.gather(shard, parts, dst=dist.get_global_rank(group, dst) if group else dst, group=group)
        if parts is not None:
            out[key] = torch.cat(parts).cpu()
    return out


def shard_experts(tensors: dict[str, Tensor], model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The inverse of `gather_experts` on every rank: each full expert tensor cut to this rank's experts."""
    out = dict(tensors)
    for key, layer in _expert_layers(tensors, model, prefix).items():
        d = layer.dispatcher
        out[key] = tensors[key][d.rank * d.n_local : (d.rank + 1) * d.n_local].clone()
    return out
