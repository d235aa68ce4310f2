"""The device mesh of a distributed run (docs/design.md#d2-sharded-training): W ranks launched by `torchrun`,
expert parallelism over E of them, and the layout checks that must pass before any work starts.

torchtitan's layout for DeepSeek-V3: the W ranks form a 2-D mesh ("dp_mod_ep" = W/E, "ep" = E); expert
parallelism borrows the "ep" dimension from the data-parallel one. The dense weights are sharded (FSDP2) over
all W ranks, the flattened dimension "dp"; the routed experts are split over "ep" and their W/E data-parallel
copies are sharded over "dp_mod_ep". Ranks r = i·E + j with the same i form one expert-parallel group:
consecutive ranks, on one node when E is at most the GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deepmoe.config import DeepSeekConfig

DATA_PARALLEL = ("fsdp", "replicate")
"""fsdp: every weight sharded over its data-parallel ranks (FSDP2); replicate: each rank holds whole copies
(the dense weights on every rank, each expert on W/E ranks) and gradients are all-reduced."""


class ParallelMesh(NamedTuple):
    """The meshes of a run, all over the same W ranks."""

    dp: DeviceMesh
    """All W ranks (1-D): the dense weights' data-parallel dimension."""
    dp_mod_ep: DeviceMesh
    """W/E ranks (1-D, the ranks holding the same experts): the experts' data-parallel dimension."""
    ep: DeviceMesh
    """E consecutive ranks (1-D): the expert-parallel dimension."""


class LayoutError(ValueError):
    """A parallel layout that cannot run (named before any work starts)."""


@dataclass(frozen=True)
class ParallelLayout:
    """W ranks, E of them expert-parallel, and how the data-parallel copies are kept."""

    world: int
    """W, the ranks of the run (torchrun's WORLD_SIZE)."""
    expert_parallel: int = 1
    """E: the routed experts of each MoE layer are split over E ranks (E divides W and every layer's N_r)."""
    data_parallel: str = "fsdp"
    """One of DATA_PARALLEL."""

    def check(self, config: DeepSeekConfig | None = None, batch_size: int | None = None) -> None:
        """LayoutError naming what is wrong: E not dividing W or some layer's N_r, a global batch that does not
        split over the W ranks, an unknown data_parallel mode."""
        w, e = self.world, self.expert_parallel
        if w < 1 or e < 1:
            raise LayoutError(f"the world size ({w}) and expert_parallel ({e}) must be at least 1")
        if self.data_parallel not in DATA_PARALLEL:
            raise LayoutError(f"data_parallel={self.data_parallel!r} is not one of {', '.join(DATA_PARALLEL)}")
        if w % e:
            raise LayoutError(
                f"expert_parallel={e} must divide the {w} ranks of this run (the mesh is W/E = {w}/{e} data-parallel "
                f"groups of E expert-parallel ranks)"
            )
        if batch_size is not None and batch_size % w:
            raise LayoutError(
                f"batch_size={batch_size} (the global batch) must be divisible by the {w} ranks: each trains on its "
                "share"
            )
        if config is None or e == 1:
            return
        for i in range(config.num_hidden_layers + config.num_nextn_predict_layers):
            moe = config.moe_config(i) if config.is_moe_layer(i) else None
            if moe is not None and moe.n_routed_experts % e:
                raise LayoutError(
                    f"expert_parallel={e} must divide the {moe.n_routed_experts} routed experts of layer {i}: "
                    "each expert-parallel rank holds an equal slice"
                )

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The 2-D mesh ("dp_mod_ep", "ep") over the default process group and its flattening "dp" (all W
        ranks), as a `ParallelMesh`."""
        self.check()
        e = self.expert_parallel
        mesh = init_device_mesh(device_type, (self.world // e, e), mesh_dim_names=("dp_mod_ep", "ep"))
        return ParallelMesh(mesh._flatten("dp"), mesh["dp_mod_ep"], mesh["ep"])
