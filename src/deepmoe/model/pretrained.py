"""Models from checkpoint files and back (docs/design.md#m5-hugging-face-checkpoints). `deepmoe.io` reads
and writes a config and a state
dict and knows no model class; here they become a model, with an expert delta (`deepmoe esft`) applied
on top, and a model becomes files again.

`DeepSeekForCausalLM.from_pretrained` / `.save_pretrained` are these functions, and so are
`deepmoe.from_pretrained` / `deepmoe.save_pretrained`.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepmoe.io.deepseek_layout import is_deepseek_dir, load_deepseek_checkpoint
from deepmoe.io.delta import apply_delta
from deepmoe.io.lazy import Deferred, map_checkpoint
from deepmoe.model.lora import load_adapter
from deepmoe.model.rope import RotaryEmbedding
from deepmoe.moe.router import Router

Model = TypeVar("Model", bound=nn.Module)


def load_pretrained(
    model_class: Callable[[DeepSeekConfig], Model],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    delta: str | os.PathLike | None = None,
    mmap: bool = False,
    adapter: str | os.PathLike | None = None,
) -> Model:
    """`model_class(config)` (eval mode) with the weights of a HF-format checkpoint directory (a HF folder,
    a training step's directory, or a run directory: its newest complete step) or of a directory in DeepSeek's
    own layout (`deepmoe.io.deepseek_layout.load_deepseek_checkpoint`, FP4/FP8 weights dequantised), plus an
    expert delta applied on top when `delta` names one, and the LoRA adapter directory `adapter` (PEFT format,
    `deepmoe.model.lora.load_adapter`: its factors trainable, the base frozen; `merge_lora` folds it in).

    dtype None keeps the stored dtypes (FP8 weights become the config's torch_dtype).

    The model is built on the meta device and the checkpoint's tensors are assigned to it (no randomly
    initialised float32 copy exists: the peak is about the loaded state dict, docs/benchmarks.md#load-memory);
    the buffers no checkpoint holds (RoPE's θ, the router's expert masks) are then computed as the constructor
    does, so the model equals an eager one with the state dict loaded, bit for bit.

    `mmap=True` loads for inference a checkpoint larger than free memory (`_load_mapped`): the weights stored
    as the model holds them are views of the memory-mapped safetensors files (no copy), the others (per-expert
    tensors stacked into the fused experts, FP8 weights dequantised, casts) are built when their decoder layer
    (or MTP module) runs and dropped after it. Such a model is for inference on the CPU: `train()` raises,
    no parameter requires grad, and `device` (other than the CPU) and `delta` are refused.
    """
    deepseek = is_deepseek_dir(Path(path))  # DeepSeek's own layout (model{r}-mp{N}.safetensors), dequantised
    if mmap:
        if adapter is not None:
            raise ValueError("mmap=True does not load a LoRA adapter: load without mmap (or merge it first)")
        if deepseek:
            raise ValueError(f"{path}: mmap=True maps HF-layout files; DeepSeek's layout is read (and dequantised) "
                             "whole: load it without mmap, or `deepmoe convert --to hf` it first")  # fmt: skip
        return _load_mapped(model_class, path, dtype, device, delta)
    config, state = load_deepseek_checkpoint(path, dtype) if deepseek else load_checkpoint(path, dtype=dtype)
    with torch.device("meta"):  # no randomly initialised float32 copy: the checkpoint's tensors are assigned
        model = model_class(config)
    _check_against(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)  # assign: keep the loaded dtypes (and memory)
    del state
    _materialise_buffers(model, path)
    if delta is not None:
        apply_delta(model, delta)
    if adapter is not None:
        load_adapter(model, adapter)
    if device is not None:
        model.to(device)
    return model.eval()


def _check_against(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
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


_LAYER = re.compile(r"model\.(layers|mtp)\.(\d+)\.")


def _load_mapped(
    model_class: Callable[[DeepSeekConfig], Model],
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    delta: str | os.PathLike | None,
) -> Model:
    """`load_pretrained(..., mmap=True)`.

    The design: `map_checkpoint` gives each weight as a view of the mapped file or a `Deferred` (a function
    building it). A deferred weight inside a decoder layer or MTP module is a meta-device placeholder of its
    shape and dtype; a forward pre-hook on that layer builds the layer's deferred weights (stacking its
    experts, dequantising its FP8 weights) and puts them in place, and a forward hook (also called when the
    forward raises) puts the placeholders back, so at most one layer's built weights exist at a time and
    reading a weight outside its layer's forward fails loudly (meta tensors have no data) instead of giving
    wrong values. Deferred weights outside the layers (embeddings, head, final norm: used outside their
    modules' forwards, e.g. the tied head) are built at load.
    """
    if delta is not None:
        raise ValueError("mmap=True does not apply an expert delta: load without mmap to apply one")
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"mmap=True keeps the weights in CPU memory maps: device={device!r} is not the CPU")
    config, state, files = map_checkpoint(path, dtype=dtype)
    with torch.device("meta"):
        model = model_class(config)
    _check_against(model, state, path)
    per_layer: dict[nn.Module, list[tuple[nn.Module, str, Deferred]]] = {}
    tensors = {}
    for name, value in state.items():
        match = _LAYER.match(name)
        if isinstance(value, Deferred) and match:
            layer = model.get_submodule(match[0][:-1])
            module_name, _, attr = name.rpartition(".")
            per_layer.setdefault(layer, []).append((model.get_submodule(module_name), attr, value))
            tensors[name] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        else:
            tensors[name] = value.build() if isinstance(value, Deferred) else value
    del state
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    for layer, deferred in per_layer.items():
        layer.register_forward_pre_hook(lambda module, args, deferred=deferred: _build(deferred))
        layer.register_forward_hook(lambda module, args, out, deferred=deferred: _drop(deferred), always_call=True)
    _materialise_buffers(model, path, deferred={id(m): m for entries in per_layer.values() for m, _, _ in entries})
    for p in model.parameters():
        p.requires_grad_(False)
    model.mapped_files = files  # the maps the weights view (kept while the model lives)
    model.train = types.MethodType(_refuse_training, model)
    return model.eval()


def _slot(module: nn.Module, attr: str) -> dict:
    return module._parameters if attr in module._parameters else module._buffers


def _build(deferred: list[tuple[nn.Module, str, Deferred]]) -> None:
    for module, attr, value in deferred:
        slot = _slot(module, attr)
        built = value.build()
        slot[attr] = nn.Parameter(built, requires_grad=False) if slot is module._parameters else built


def _drop(deferred: list[tuple[nn.Module, str, Deferred]]) -> None:
    for module, attr, value in deferred:
        slot = _slot(module, attr)
        placeholder = torch.empty(value.shape, dtype=value.dtype, device="meta")
        slot[attr] = nn.Parameter(placeholder, requires_grad=False) if slot is module._parameters else placeholder


def _refuse_training(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            f"{type(self).__name__} was loaded with mmap=True (read-only weights, mapped from the checkpoint "
            "files, for inference): load it without mmap to train or fine-tune it"
        )
    return nn.Module.train(self, False)


@torch.no_grad()
def _materialise_buffers(model: nn.Module, path: str | os.PathLike, deferred: dict | None = None) -> None:
    """Give the non-persistent buffers of a model built on the meta device (no checkpoint holds them) their
    constructor values, on the device of the loaded weights: RoPE's θ (`reset_parameters` recomputes it, float32)
    and the router's expert masks (none). Raises CheckpointError if a parameter is still on the meta device."""
    deferred = deferred or {}
    left = [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if id(module) not in deferred
        for name, p in module.named_parameters(recurse=False)
        if p.is_meta
    ]
    if left:
        raise CheckpointError(f"{path}: the checkpoint left {_listing(left)} unloaded")
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for module_name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if id(module) in deferred:
            meta = [n for n in meta if module._buffers[n] is not None and n in module._non_persistent_buffers_set]
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
    atomically: `save_checkpoint(model, model.config, path, max_shard_size)`. A model with LoRA adapters is
    refused: save them with `deepmoe.model.lora.save_adapter`, or fold them in with `merge_lora` first."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("save_pretrained: the model has LoRA adapters; save them with save_adapter (the base "
                         "checkpoint is unchanged), or merge_lora first to save the merged weights")  # fmt: skip
    return save_checkpoint(model, getattr(model, "config", None), path, max_shard_size=max_shard_size)


def _listing(names: list[str], limit: int = 4) -> str:
    if not names:
        return "nothing more"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
