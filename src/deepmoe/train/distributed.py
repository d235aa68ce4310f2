"""What a training run does across ranks (docs/design.md#d2-sharded-training): join torchrun's process group,
build the mesh, shard the model, reduce the numbers it logs, and write and read distributed checkpoints.

`Ranks` is one process's view of the run: rank, world size W, and the mesh once `shard` built it. With one
process it is the identity (no process group, nothing communicated).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from deepmoe import parallel
from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import CONFIG_NAME as HF_CONFIG_NAME
from deepmoe.io.distributed import DISTRIBUTED_DIR
from deepmoe.io.files import atomic_directory, make_readable, write_json
from deepmoe.io.hf import config_to_hf
from deepmoe.moe.balance import RoutingStats, merge_routing_stats
from deepmoe.parallel.checkpoint import load_sharded, save_sharded
from deepmoe.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def launched_world() -> int:
    """W, the processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_layout(expert_parallel: int, data_parallel: str) -> parallel.ParallelLayout:
    """The layout of this launch: torchrun's W with `expert_parallel` E (LayoutError if E > 1 in one process or
    E does not divide W). `ParallelLayout.check(config, batch_size)` then checks the model and the batch."""
    layout = parallel.ParallelLayout(launched_world(), expert_parallel, data_parallel)
    if layout.world == 1 and expert_parallel > 1:
        raise parallel.LayoutError(
            f"expert_parallel={expert_parallel} needs several processes: launch with torchrun --nproc-per-node "
            f"N -m deepmoe train ... (N a multiple of {expert_parallel})"
        )
    layout.check()
    return layout


class Ranks:
    """Rank, world size and mesh of a run: `Ranks(device, expert_parallel, data_parallel)` joins torchrun's
    process group when W > 1 and checks the layout (LayoutError naming the problem)."""

    def __init__(self, device: torch.device, expert_parallel: int, data_parallel: str):
        self.layout = launch_layout(expert_parallel, data_parallel)
        self.rank, self.world = 0, 1
        self.device = device
        self.mesh = None
        if self.layout.world > 1:
            if device.type == "cuda" and int(os.environ.get("LOCAL_RANK", 0)) >= torch.cuda.device_count():
                raise parallel.LayoutError(
                    f"local rank {os.environ['LOCAL_RANK']} has no GPU: this node has {torch.cuda.device_count()}; "
                    "launch at most that many processes per node"
                )
            self.rank, self.world = parallel.init_from_env(device.type)
            if device.type == "cuda":
                self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """' x W ranks (fsdp, expert parallel E)', or '' for one process."""
        if self.world == 1:
            return ""
        layout = self.layout
        ep = f", expert parallel {layout.expert_parallel}" if layout.expert_parallel > 1 else ""
        return f" x {self.world} ranks ({layout.data_parallel}{ep})"

    def shard(self, model: nn.Module, config: DeepSeekConfig, batch_size: int, *, bf16: bool,
              activation_checkpointing: bool) -> None:  # fmt: skip
        """Check the layout against the model and batch, build the mesh and `parallel.parallelize` the model (on
        its device already); one process: only activation checkpointing, if asked."""
        self.layout.check(config, batch_size)
        if self.world == 1:
            if activation_checkpointing:
                parallel.checkpoint_activations(model)
            return
        self.mesh = self.layout.build_mesh(self.device.type)
        parallel.parallelize(model, self.mesh, data_parallel=self.layout.data_parallel, bf16=bf16,
                             activation_checkpointing=activation_checkpointing)  # fmt: skip

    # -- reductions -------------------------------------------------------------------------------
    def all_reduce(self, values: list[float], mean: bool = True) -> list[float]:
        """Means (or sums) over the ranks; the values themselves on one process."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world if mean else t).tolist()

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over the ranks (on t's device)."""
        if self.world == 1:
            return t
        reduced = t.to(self.device)
        dist.all_reduce(reduced)
        return reduced.to(t.device)

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` sequences."""
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def local(self, batch: Tensor) -> Tensor:
        """This rank's share of a global batch (its 1/W of the sequences)."""
        return batch[self.rows(batch.shape[0])]

    def global_stats(self, stats: dict[int, RoutingStats]) -> dict[int, RoutingStats]:
        """Routing statistics over every rank's tokens: loads summed, entropy averaged, metrics recomputed."""
        if self.world == 1:
            return stats
        layers = sorted(stats)
        parts = [t for i in layers for t in (stats[i].tokens_per_expert, stats[i].kept_per_expert)]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        loads = flat.split([t.numel() for t in parts])
        entropy = self.all_reduce([float(stats[i].entropy) for i in layers])
        per_layer = {
            i: dataclasses.replace(
                stats[i],
                tokens_per_expert=loads[2 * j],
                kept_per_expert=loads[2 * j + 1],
                entropy=torch.tensor(entropy[j]),
            )  # fmt: skip
            for j, i in enumerate(layers)
        }
        return merge_routing_stats([per_layer])

    def all_ranks(self, value: Any) -> list[Any]:
        """Every rank's `value` (a small JSON-able object), by rank."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    # -- checkpoints ------------------------------------------------------------------------------
    def save(
        self, out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: DeepSeekConfig,
        info: dict[str, Any], rng: list[dict[str, Any]], tokenizer: Any = None,
    ) -> Path:  # fmt: skip
        """Write `DIR/step-{step}/` as a distributed checkpoint and point `DIR/last` at it (a collective).

        Every rank writes its shards of the model and optimizer into `distributed/` in parallel
        (`parallel.save_sharded`); rank 0 adds config.json, the tokenizer and training_state.json (`info`, the
        optimizer's param_groups, each rank's RNG state `rng`, the layout). The directory is staged and renamed
        into place by rank 0 only when every rank's shards are written, then `last` is replaced: a failure or a
        killed rank at any moment leaves the previous `last` and its checkpoint intact."""
        name = ckpt.step_dir_name(step)
        target = out_dir / name
        current = ckpt.read_last(out_dir)
        if current is not None and current.name == name:
            return target
        with atomic_directory(target) if self.is_main else nullcontext(None) as staging:
            where = [os.fspath(staging) if staging is not None else None]
            dist.broadcast_object_list(where, src=0)
            staging_dir = Path(where[0])
            groups = save_sharded(staging_dir / DISTRIBUTED_DIR, model, optimizer)
            if self.is_main:
                layout = dataclasses.asdict(self.layout)
                write_json(staging_dir / HF_CONFIG_NAME, config_to_hf(config))
                ckpt.save_tokenizer(tokenizer, staging_dir)
                ckpt.write_state_json(staging_dir, {**info, "step": step, "optimizer": {"param_groups": groups},
                                                    "rng_per_rank": rng, "distributed": layout})  # fmt: skip
                for entry in staging_dir.rglob("*"):
                    make_readable(entry)
            dist.barrier()  # every rank's files are complete before rank 0 renames the directory
        if self.is_main:
            ckpt.write_last(out_dir, name)
        return target

    def load(self, step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Read a distributed checkpoint written on any layout into this rank's model and optimizer, and this
        rank's RNG state (its own when the world size is the saved one, else rank 0's)."""
        load_sharded(step_dir / DISTRIBUTED_DIR, model, optimizer, state["optimizer"]["param_groups"])
        saved = state["rng_per_rank"]
        ckpt.set_rng_state(*ckpt.rng_from_json(saved[self.rank] if len(saved) == self.world else saved[0]))


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, their gradients and the optimizer's state (its shards only)."""

    def size(t: Tensor | None) -> int:
        if t is None:
            return 0
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    return {
        "parameter_bytes": sum(size(p) for p in params),
        "gradient_bytes": sum(size(p.grad) for p in params),
        "optimizer_bytes": sum(size(v) for v in moments),
    }
