"""Distributed training checkpoints (docs/design.md#m5-hugging-face-checkpoints), read in one process.

A multi-process run saves each step's weights with `torch.distributed.checkpoint` (DCP) into
`step-N/distributed/`: one `shard-0000k-model-00001-of-00001.safetensors` per rank, written by
`HuggingFaceStorageWriter(save_distributed=True)`, each holding that rank's pieces of the state
`{"model": model_state_dict, "optimizer": {...}}` under DCP's flattened names (`model.<name>`,
`optimizer.state.<name>.exp_avg`, ...) with the pieces' offsets in the files' metadata. Beside it
are config.json and the run's other files; there is no `model.safetensors`.

`DistributedCheckpoint` is the model's tensors as a read-only mapping, internal state-dict names ->
full (global) tensors, read one at a time on demand: reassembled from every rank's file by
`dcp.load(..., no_dist=True)`, no process group needed.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from torch import Tensor

from deepmoe.io.safetensors_stream import CheckpointError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

DISTRIBUTED_DIR = "distributed"
"""In a step directory: the DCP directory of a multi-process run's checkpoint."""
MODEL_PREFIX = "model."
"""DCP's prefix of the model's tensors (the state's "model" entry), before the state-dict name."""
KEEP_FLOAT32 = ("e_score_correction_bias", "self_attn.indexer.weights_proj.weight")
"""Names ending so (the expert-bias buffers, DSA's indexer head weights) stay float32 when tensors are cast."""
_SINGLE_PROCESS = r"torch\.distributed is disabled, unavailable or uninitialized"


@runtime_checkable
class LazyTensors(Protocol):
    """A name -> tensor mapping whose values are read on demand; `shape` and `dtype` come without reading."""

    def __getitem__(self, name: str) -> Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...


def is_distributed_checkpoint(step_dir: str | os.PathLike) -> bool:
    """Whether `step_dir` holds a DCP checkpoint (a `distributed/` directory)."""
    return (Path(step_dir) / DISTRIBUTED_DIR).is_dir()


def cast_dtype(name: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as `stored` is read as when casting to `dtype` (None: as stored):
    floating tensors become `dtype`, except the expert biases and the indexer's head weights, always float32."""
    if not stored.is_floating_point:
        return stored
    return torch.float32 if name.endswith(KEEP_FLOAT32) else dtype or stored


class DistributedCheckpoint(Mapping[str, Tensor]):
    """The model tensors of a DCP checkpoint, by internal state-dict name (DCP's `model.` prefix
    stripped), each a full tensor of its global shape, cast to `dtype` (None: as stored; see
    `cast_dtype`). `shape` and `dtype` come from the files' headers; `[name]` reads the tensor from
    every rank's file and keeps only the most recent one (so splitting a fused tensor into pieces
    reads it once).

    `path`: a step directory or its `distributed/` directory. CheckpointError, naming the directory and
    the tensor, for a missing or unreadable directory, a tensor not stored whole (a rank's file
    missing), or a file that cannot be read.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None):
        path = Path(path)
        self.directory = path / DISTRIBUTED_DIR if is_distributed_checkpoint(path) else path
        self.cast = dtype
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: distributed checkpoint directory not found")
        if not any(p.suffix == ".safetensors" for p in self.directory.iterdir()):
            raise CheckpointError(f"{self.directory}: distributed checkpoint has no .safetensors files")
        from torch.distributed.checkpoint import HuggingFaceStorageReader  # 2 s to import: only when needed
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            metadata = HuggingFaceStorageReader(str(self.directory)).read_metadata()
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.directory}: not a readable distributed checkpoint ({err})") from None
        self._meta: dict[str, TensorStorageMetadata] = {}
        for key, meta in metadata.state_dict_metadata.items():
            if not key.startswith(MODEL_PREFIX) or not isinstance(meta, TensorStorageMetadata):
                continue
            stored = sum(math.prod(chunk.sizes) for chunk in meta.chunks)
            if stored != math.prod(meta.size):
                raise CheckpointError(
                    f"{self.directory}: tensor {key!r} of shape {list(meta.size)} is only partly stored "
                    f"({stored} of {math.prod(meta.size)} elements): a rank's shard file is missing"
                )
            self._meta[key.removeprefix(MODEL_PREFIX)] = meta
        if not self._meta:
            raise CheckpointError(f"{self.directory}: distributed checkpoint holds no {MODEL_PREFIX}* tensors")
        self._last: tuple[str, Tensor] | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def _metadata(self, name: str) -> TensorStorageMetadata:
        meta = self._meta.get(name)
        if meta is None:
            raise CheckpointError(f"{self.directory}: has no tensor {MODEL_PREFIX + name!r}")
        return meta

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._metadata(name).size)

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._metadata(name).properties.dtype

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `[name]` returns (after the cast)."""
        return cast_dtype(name, self.stored_dtype(name), self.cast)

    def __getitem__(self, name: str) -> Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        import torch.distributed.checkpoint as dcp

        self._last = None  # release the previous tensor before reading the next
        meta = self._metadata(name)
        key = MODEL_PREFIX + name
        out = torch.empty(meta.size, dtype=meta.properties.dtype)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _SINGLE_PROCESS, UserWarning)
                dcp.load({key: out}, storage_reader=dcp.HuggingFaceStorageReader(str(self.directory)), no_dist=True)
        except Exception as err:  # DCP wraps the readers' errors (truncated file, ...) in its own
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{self.directory}: cannot read tensor {key!r} ({reason})") from None
        out = out.to(self.dtype(name))
        self._last = (name, out)
        return out


__all__ = [
    "DISTRIBUTED_DIR",
    "MODEL_PREFIX",
    "DistributedCheckpoint",
    "LazyTensors",
    "cast_dtype",
    "is_distributed_checkpoint",
]
