"""Expert parallelism (docs/design.md#d1-expert-parallelism) on `torch.distributed`, applied to a model from
outside it: `apply_expert_parallel(model)` shards every MoE layer's routed experts and plugs in the all-to-all
`ExpertParallelDispatcher` (a `deepmoe.moe.dispatch.Dispatcher`).

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on GPUs,
gloo on CPUs (`init_from_env`). The D ranks of the expert-parallel group are also data-parallel for everything
that is not a routed expert: those weights are replicated and their gradients averaged; each rank's routed
experts are its own, their gradients (already summed over every rank's tokens by the all-to-all's backward) are
scaled to the same global mean: `sync_gradients` does both; under DistributedDataParallel, DDP averages the
replicated weights (the experts are marked for it to ignore, `ignore_experts_in_ddp`) and
`scale_expert_gradients` scales the experts'.
"""

from deepmoe.parallel.dispatch import ExpertParallelDispatcher, ExpertParallelState, Traffic
from deepmoe.parallel.experts import (
    apply_expert_parallel,
    expert_parameters,
    gather_experts,
    ignore_experts_in_ddp,
    shard_experts,
)
from deepmoe.parallel.gradients import clip_grad_norm, scale_expert_gradients, sync_gradients
from deepmoe.parallel.group import init_from_env

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertParallelState",
    "Traffic",
    "apply_expert_parallel",
    "clip_grad_norm",
    "expert_parameters",
    "gather_experts",
    "ignore_experts_in_ddp",
    "init_from_env",
    "scale_expert_gradients",
    "shard_experts",
    "sync_gradients",
]
