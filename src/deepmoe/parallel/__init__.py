"""Scale-out on `torch.distributed` (docs/design.md#d1-expert-parallelism, #d2-sharded-training).

- `apply_expert_parallel(model, mesh)` shards every MoE layer's routed experts over the ranks of a mesh and
  plugs in the all-to-all `ExpertParallelDispatcher` (a `deepmoe.moe.dispatch.Dispatcher`).
- `ParallelLayout` / `build_mesh`: W ranks from `torchrun`, E of them expert-parallel, torchtitan's 2-D mesh.
- `parallelize(model, mesh)`: expert parallelism + FSDP2 (or replication) + mixed precision + activation
  checkpointing; `clip_grad_norm_` over its DTensor gradients; `save_sharded` / `load_sharded`: distributed
  checkpoints (`torch.distributed.checkpoint`, safetensors storage) that load on any layout.

Launched by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on GPUs, gloo on CPUs
(`init_from_env`).
"""

from deepmoe.parallel.dispatch import ExpertParallelDispatcher, ExpertParallelState, Traffic
from deepmoe.parallel.experts import apply_expert_parallel, expert_parallel_layers
from deepmoe.parallel.gradients import clip_grad_norm_
from deepmoe.parallel.group import init_from_env
from deepmoe.parallel.mesh import DATA_PARALLEL, LayoutError, ParallelLayout, ParallelMesh
from deepmoe.parallel.parallelize import checkpoint_activations, parallelize

__all__ = [
    "DATA_PARALLEL",
    "ExpertParallelDispatcher",
    "ExpertParallelState",
    "LayoutError",
    "ParallelLayout",
    "ParallelMesh",
    "Traffic",
    "apply_expert_parallel",
    "checkpoint_activations",
    "clip_grad_norm_",
    "expert_parallel_layers",
    "init_from_env",
    "parallelize",
]
