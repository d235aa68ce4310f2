"""Models from checkpoint files and back (docs/design.md#m5-hugging-face-checkpoints). `deepmoe.io` reads
and writes a config and a state
dict and knows no model class; here they become a model, with an expert delta (`deepmoe esft`) applied
on top, and a model becomes files again.

`DeepSeekForCausalLM.from_pretrained` / `.save_pretrained` are these functions, and so are
`deepmoe.from_pretrained` / `deepmoe.save_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepmoe.io.delta import apply_delta
from deepmoe.model.rope import RotaryEmbedding
from deepmoe.moe.router import Router

Model = TypeVar("Model", bound=nn.Module)


def load_pretrained(
    model_class: Callable[[DeepSeekConfig], Model],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    delta: str | os.PathLike | None = None,
) -> Model:
    """`model_class(config)` (eval mode) with the weights of a HF-format checkpoint directory (a HF folder,
    a training step's directory, or a run directory: its newest complete step), plus an expert delta
    applied on top when `delta` names one.

    dtype None keeps the stored dtypes (FP8 weights become the config's torch_dtype).

    The model is built on the meta device and the checkpoint's tensors are assigned to it (no randomly
    initialised float32 copy exists: the peak is about the loaded state dict, docs/benchmarks.md#load-memory);
    the buffers no checkpoint holds (RoPE's θ, the router's expert masks) are then computed as the constructor
    does, so the model equals an eager one with the state dict loaded, bit for bit.
    """
    config, state = load_checkpoint(path, dtype=dtype)
    with torch.device("meta"):  # no randomly initialised float32 copy: the checkpoint's tensors are assigned
        model = model_class(config)
    own = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if own.keys() != state.keys():
        missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise CheckpointError(
            f"{path}: {type(model).__name__} does not match the checkpoint: it needs {_listing(missing)}, "
            f"the checkpoint has {_listing(extra)}"
        )
    for name, shape in own.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(state[name].shape)}, the model {list(shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)  # assign: keep the loaded dtypes (and memory)
    del state
    _materialise_buffers(model, path)
    if delta is not None:
        apply_delta(model, delta)
    if device is not None:
        model.to(device)
    return model.eval()


@torch.no_grad()
def _materialise_buffers(model: nn.Module, path: str | os.PathLike) -> None:
    """Give the non-persistent buffers of a model built on the meta device (no checkpoint holds them) their
    constructor values, on the device of the loaded weights: RoPE's θ (`reset_parameters` recomputes it, float32)
    and the router's expert masks (none). Raises CheckpointError if a parameter is still on the meta device."""
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: the checkpoint left {_listing(left)} unloaded")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for module_name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        for name in meta:
            buffer = module._buffers[name]
            module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()  # θ, computed on the CPU as the constructor does
        elif isinstance(module, Router):
            module.clear_expert_mask()  # zeros: no expert disabled or forced
        else:
            names = ", ".join(f"{module_name}.{n}" if module_name else n for n in meta)
            raise CheckpointError(f"{path}: no value for {names}: {type(module).__name__} is not from a checkpoint")


def save_pretrained(model: nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """config.json + safetensors of `model` (HF's names for its model_type) in the directory `path`,
    atomically: `save_checkpoint(model, model.config, path, max_shard_size)`."""
    return save_checkpoint(model, getattr(model, "config", None), path, max_shard_size=max_shard_size)


def _listing(names: list[str], limit: int = 4) -> str:
    if not names:
        return "nothing more"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
