"""Sharded training on PyTorch's own engine (docs/design.md#d2-sharded-training): `parallelize(model, mesh)`
applies expert parallelism, activation checkpointing and FSDP2 (or its replicating twin) to a
`DeepSeekForCausalLM`, in torchtitan's layout (`deepmoe.parallel.mesh`).

FSDP units: one per decoder block and per MTP module, one for the routed experts of each MoE layer (on their
own mesh), and the root (embeddings, final norm, head). Gradient reduction is FSDP2's: the dense weights'
gradients are averaged over all W ranks; an expert's gradient already sums the E expert-parallel ranks' tokens
(the all-to-all's backward), so its reduction over the W/E copies divides by W, not W/E
(`set_gradient_divide_factor`): every gradient is that of the mean loss over the global batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from deepmoe.moe.layer import MoE
from deepmoe.parallel.experts import apply_expert_parallel
from deepmoe.parallel.mesh import DATA_PARALLEL, ParallelMesh


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks and MTP modules of a `DeepSeekForCausalLM`, in order."""
    return [*model.model.layers, *model.model.mtp]


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass instead of keeping them (one process or
    many; the state-dict names do not change)."""
    for block in _blocks(model):
        activation_checkpoint(block)
    return model


def parallelize(
    model: nn.Module,
    mesh: ParallelMesh,
    *,
    data_parallel: str = "fsdp",
    bf16: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard `model` (a `DeepSeekForCausalLM` with the same full weights on every rank) over `mesh`
    (`ParallelLayout.build_mesh`); returns it.

    - expert parallelism over mesh.ep when it has more than one rank (`apply_expert_parallel`);
    - `activation_checkpointing`: each block's activations are recomputed in the backward pass;
    - `data_parallel="fsdp"`: `fully_shard` (FSDP2); "replicate": whole copies, gradients all-reduced
      (`replicate`, FSDP2's DDP); `bf16`: FSDP2's `MixedPrecisionPolicy` (bf16 compute, fp32 gradient reduction;
      the weights and optimizer state stay fp32).
    """
    if data_parallel not in DATA_PARALLEL:
        raise ValueError(f"data_parallel={data_parallel!r} is not one of {', '.join(DATA_PARALLEL)}")
    wrap = fully_shard if data_parallel == "fsdp" else replicate
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mp_policy": policy} if policy is not None else {}
    world, expert_parallel = mesh.dp.size(), mesh.ep.size()
    if expert_parallel > 1:
        apply_expert_parallel(model, mesh.ep)
    if activation_checkpointing:
        checkpoint_activations(model)
    for block in _blocks(model):
        for layer in (m for m in block.modules() if isinstance(m, MoE) and m.expert_parallel):
            wrap(layer.experts, mesh=mesh.dp_mod_ep, **options)
            layer.experts.set_gradient_divide_factor(world)
            if mesh.dp.device_type == "cpu" and wrap is fully_shard and mesh.dp_mod_ep.size() > 1:
                # gloo has no pre-multiplied sum: reduce-scatter a plain sum, then divide. (Not with one rank per
                # shard group, where FSDP2 already divides once while copying and would divide again.)
                layer.experts.set_force_sum_reduction_for_comms(True)
        wrap(block, mesh=mesh.dp, **options)
    wrap(model, mesh=mesh.dp, **options)
    return model
