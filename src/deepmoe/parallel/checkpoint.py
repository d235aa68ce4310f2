"""Distributed checkpoints of a sharded model and its optimizer (docs/design.md#d2-sharded-training):
`torch.distributed.checkpoint` with safetensors storage. Every rank writes its own shards in parallel (no
gather); loading reshards to whatever layout the reader has (another world size, another E, one process
without a process group). No pickle is written or read.

The directory holds one `shard-0000k-model-00001-of-00001.safetensors` per rank, keyed "model.<state-dict
name>" (full global shapes in DCP's metadata) and "optimizer.state.<parameter name>.<field>"
(`deepmoe.io.distributed` reads the model part in one process, e.g. for `deepmoe export`). The optimizer's
param_groups (numbers, not tensors) are returned to the caller, which keeps them in its JSON.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    optim = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model), "optimizer": {"state": optim["state"]}}, optim["param_groups"]


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Write the model and optimizer shards of this rank into the directory `path` (a collective: every rank
    calls it with the same path). Returns the optimizer's param_groups (JSON-ready: tuples made lists)."""
    state, groups = _state(model, optimizer)
    distributed = dist.is_available() and dist.is_initialized()
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.fspath(path), save_distributed=True),
             no_dist=not distributed)  # fmt: skip
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def load_sharded(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]]
) -> None:
    """Read the shards this rank needs, whatever layout wrote them, into `model` (sharded or not, built with the
    same config) and `optimizer`; `param_groups` as `save_sharded` returned them."""
    state, _ = _state(model, optimizer)
    distributed = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():  # DCP warns that one process without a process group reads alone: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(os.fspath(path)), no_dist=not distributed)
    set_model_state_dict(model, state["model"])
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in param_groups]
    set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"]["state"], "param_groups": groups})


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole (unsharded) optimizer state, keyed by parameter name as `get_optimizer_state_dict` keys it,
    into the optimizer of a sharded model: each rank keeps its shards (a checkpoint of one process resumed on
    several)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
