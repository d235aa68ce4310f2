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
    """
    config, state = load_checkpoint(path, dtype=dtype)
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
    model.load_state_dict(state, strict=True, assign=True)  # assign: keep the loaded dtypes
    if delta is not None:
        apply_delta(model, delta)
    if device is not None:
        model.to(device)
    return model.eval()


def save_pretrained(model: nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """config.json + safetensors of `model` (HF's names for its model_type) in the directory `path`,
    atomically: `save_checkpoint(model, model.config, path, max_shard_size)`."""
    return save_checkpoint(model, getattr(model, "config", None), path, max_shard_size=max_shard_size)


def _listing(names: list[str], limit: int = 4) -> str:
    if not names:
        return "nothing more"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
