"""The process group, from `torchrun`'s environment."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
