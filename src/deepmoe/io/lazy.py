"""A checkpoint read without reading its weights (docs/design.md#m5-hugging-face-checkpoints, "mmap"):
`map_checkpoint` is `load_checkpoint` for a model larger than free memory.

Every tensor stored as the model holds it (its name, dtype and shape; not FP8) becomes a view of a private
(copy-on-write) memory map of its safetensors file: no copy is made, the pages are read from the file when
first touched, and being clean file pages the OS drops and re-reads them under memory pressure. Every other
tensor (per-expert tensors that are stacked into a fused `gate_up_proj` / `down_proj`, FP8 weights that are
dequantised, tensors cast to another dtype) becomes a `Deferred`: its shape and dtype, and a function that
builds it when called, reading the file with plain reads (no pages stay mapped), so it costs memory only
while the caller keeps the result (`deepmoe.model.pretrained` builds a layer's deferred tensors when the
layer runs and drops them after).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import (
    CONFIG_NAME,
    SafetensorsCheckpoint,
    _check_finite,
    _dtype_from_config,
    _read_config,
    _validate,
    checkpoint_dir,
)
from deepmoe.io.distributed import cast_dtype, is_distributed_checkpoint
from deepmoe.io.fp8_blocks import SCALE_SUFFIX, dequantize_fp8
from deepmoe.io.hf import expected_shapes, hf_items, hf_name
from deepmoe.io.safetensors_stream import DTYPES, CheckpointError, StoredTensor, read_tensor


@dataclass(frozen=True)
class Deferred:
    """A tensor of `shape` and `dtype` that `build()` reads from the checkpoint (a new tensor each call)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[], Tensor]


class MappedFiles:
    """Private read-write (copy-on-write) memory maps of safetensors files, one per file, and tensors that
    are views of them. A write to such a view changes this process's copy of the page, never the file."""

    def __init__(self) -> None:
        self.maps: dict[Path, mmap.mmap] = {}

    def view(self, t: StoredTensor) -> Tensor:
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{t.path}: dtype {t.dtype} is not read here (one of {', '.join(DTYPES)})")
        dtype, count = DTYPES[t.dtype], math.prod(t.shape)
        if count == 0:
            return torch.empty(t.shape, dtype=dtype)
        mapped = self.maps.get(t.path)
        if mapped is None:
            with open(t.path, "rb") as f:
                mapped = self.maps[t.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if t.end > len(mapped):
            raise CheckpointError(f"{t.path}: ends inside a tensor (truncated file)")
        # the tensor keeps the map alive (frombuffer holds a reference to it)
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=t.start).view(t.shape)

    def ranges(self) -> list[tuple[int, int]]:
        """[start, end) addresses of the maps (for checking that a tensor is a view of one)."""
        out = []
        for mapped in self.maps.values():
            address = torch.frombuffer(mapped, dtype=torch.uint8, count=1).data_ptr()
            out.append((address, address + len(mapped)))
        return out


def map_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, check_finite: bool = True
) -> tuple[DeepSeekConfig, dict[str, Tensor | Deferred], MappedFiles]:
    """(config, deepmoe state dict, the maps) of a HF-format safetensors checkpoint directory (or a run
    directory's newest checkpoint), like `load_checkpoint(path, dtype)` but reading no weights: each entry is
    a view of the memory-mapped file or a `Deferred` (see the module's docstring). The checks on names,
    shapes and dtypes are `load_checkpoint`'s; `check_finite` checks a deferred tensor each time it is built
    (the views are not read, so not checked). A multi-process run's step (DCP files) raises CheckpointError:
    `deepmoe export` it first.
    """
    directory = checkpoint_dir(path)
    config, raw = _read_config(directory)
    if is_distributed_checkpoint(directory):
        raise CheckpointError(
            f"{directory}: a distributed training checkpoint cannot be memory-mapped: convert it with "
            "`deepmoe export` first (or load it without mmap)"
        )
    quant = raw.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or (128, 128))
    fp8_dtype = dtype or _dtype_from_config(raw) or torch.bfloat16
    files = MappedFiles()
    with SafetensorsCheckpoint(directory) as ckpt:
        config = _validate(ckpt, config, directory / CONFIG_NAME)
        where = ckpt.locations()

    def target_dtype(hf: str) -> torch.dtype:
        stored = DTYPES[where[hf].dtype]
        if stored.is_floating_point and stored.itemsize == 1:  # FP8: dequantised
            return cast_dtype(hf, fp8_dtype, dtype)
        return cast_dtype(hf, stored, dtype)

    def read(hf: str) -> Tensor:
        t = where[hf]
        with open(t.path, "rb") as f:
            value = read_tensor(f, t)
        if t.dtype.startswith("F8"):
            scale = where[hf + SCALE_SUFFIX]
            with open(scale.path, "rb") as f:
                scales = read_tensor(f, scale)
            try:
                value = dequantize_fp8(value, scales, block, fp8_dtype)
            except ValueError as err:
                raise CheckpointError(f"{t.path}: tensor {hf!r}: {err}") from None
        value = value.to(cast_dtype(hf, value.dtype, dtype))
        if check_finite:
            _check_finite(value, t.path, hf)
        return value

    def stacked(shape: tuple[int, ...], parts: list[tuple[str, tuple[int, str]]], out_dtype: torch.dtype) -> Tensor:
        out = torch.empty(shape, dtype=out_dtype)
        half = shape[1] // 2
        for hf_part, (j, proj) in parts:
            {"gate_proj": out[j, :half], "up_proj": out[j, half:], "down_proj": out[j]}[proj].copy_(read(hf_part))
        return out

    state: dict[str, Tensor | Deferred] = {}
    for name, shape in expected_shapes(config).items():
        hf = hf_name(name, config)
        if hf in where:  # stored as is (experts fused, as in memory)
            want = target_dtype(hf)
            if DTYPES[where[hf].dtype] == want:
                state[name] = files.view(where[hf])
            else:
                state[name] = Deferred(shape, want, lambda hf=hf: read(hf))
            continue
        parts = hf_items(name, None, config, lambda _, j, proj: (j, proj))
        want = target_dtype(parts[0][0])
        state[name] = Deferred(shape, want, lambda s=shape, p=parts, d=want: stacked(s, p, d))
    return config, state, files
