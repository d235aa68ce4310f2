"""LoRA adapter directories (docs/design.md#lora-adapters), in PEFT's format: `adapter_config.json` (a PEFT
`LoraConfig`) and `adapter_model.safetensors`, written atomically (`deepmoe.io.files.atomic_directory`).

Tensor names and layouts are PEFT's (peft.tuners.lora):

- an nn.Linear target (attention projections, `target_modules`): `base_model.model.{module}.lora_A.weight`
  [r, in] and `...lora_B.weight` [out, r];
- the stacked experts (`target_parameters`, PEFT >= 0.17's `ParamWrapper`): PEFT wraps the experts module once
  per targeted parameter, nesting the wrappers in the order the parameters were registered, so `gate_up_proj`
  (registered first, wrapped first) is the inner wrapper, `{experts}.base_layer.lora_{A,B}.weight`, and
  `down_proj` the outer one, `{experts}.lora_{A,B}.weight`. Its A is one [N_r·r, in] matrix, row e·r + k = A_e[k];
  its B one [out, r·N_r] matrix, column k·N_r + e = B_e[:, k] (PEFT's `get_delta_weight` reshapes them to
  [N_r, r, in] and [out, r, N_r] and forms einsum("o r e, e r i -> e o i")·α/r, the [N_r, out, in] update).

deepmoe holds the factors as `{experts}.{proj}_lora_A` [N_r, r, in] / `_lora_B` [N_r, out, r] and
`{module}.lora_A` / `lora_B` (`deepmoe.model.lora`); this module converts between the two. The safetensors header
also records the base model's identity (`deepmoe.io.delta.config_hash`, model_type) under "deepmoe_base", which
PEFT ignores and `read_adapter` checks against the model it is loaded into.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as st_torch
from torch import Tensor

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import CheckpointError
from deepmoe.io.delta import config_hash, identity_config
from deepmoe.io.files import atomic_directory, fsync_path, make_readable, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_EXPERT_FACTOR = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)_lora_([AB])")
_LINEAR_FACTOR = re.compile(r"(.*)\.lora_([AB])")
_PEFT_EXPERTS = re.compile(r"(.*\.mlp\.experts)(\.base_layer)?\.lora_([AB])\.weight")
_PEFT_LINEAR = re.compile(r"(.*)\.lora_([AB])\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class AdapterError(CheckpointError):
    """An adapter directory is missing, unreadable, not PEFT's LoRA format, or does not fit the model."""


@dataclass
class Adapter:
    """An adapter directory's contents, in deepmoe's terms."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    """A subset of ("experts", "attention")."""
    layers: tuple[int, ...] | None
    """The decoder layers adapted (PEFT's layers_to_transform); None: every layer."""
    tensors: dict[str, Tensor]
    """deepmoe parameter name → factor (`deepmoe.model.lora.lora_state_dict`'s names and layouts)."""
    base: dict[str, Any]
    """The base model's identity: config_hash, model_type, config (empty for an adapter made elsewhere)."""
    path: str


def peft_name(name: str) -> str:
    """PEFT's key of a deepmoe LoRA factor name, e.g. `model.layers.1.mlp.experts.gate_up_proj_lora_A` →
    `base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight`."""
    expert = _EXPERT_FACTOR.fullmatch(name)
    if expert:
        module, proj, factor = expert.groups()
        inner = ".base_layer" if proj == "gate_up_proj" else ""
        return f"{PEFT_PREFIX}{module}{inner}.lora_{factor}.weight"
    linear = _LINEAR_FACTOR.fullmatch(name)
    if linear is None:
        raise ValueError(f"{name!r} is not a LoRA factor name")
    return f"{PEFT_PREFIX}{linear[1]}.lora_{linear[2]}.weight"


def to_peft(name: str, t: Tensor) -> Tensor:
    """A factor in PEFT's layout: stacked expert A [N, r, in] → [N·r, in], B [N, out, r] → [out, r·N]."""
    if _EXPERT_FACTOR.fullmatch(name) is None:
        return t
    if name.endswith("_lora_A"):
        return t.reshape(-1, t.shape[-1])
    return t.permute(1, 2, 0).reshape(t.shape[1], -1)


def from_peft(key: str, t: Tensor, rank: int) -> tuple[str, Tensor]:
    """(deepmoe name, factor in deepmoe's layout) of a PEFT key and tensor (inverse of `peft_name`/`to_peft`)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"tensor {key!r} does not start with {PEFT_PREFIX!r}")
    rest = key[len(PEFT_PREFIX) :]
    expert = _PEFT_EXPERTS.fullmatch(rest)
    if expert:
        module, inner, factor = expert.groups()
        proj = "gate_up_proj" if inner else "down_proj"
        name = f"{module}.{proj}_lora_{factor}"
        if t.dim() != 2 or t.shape[0 if factor == "A" else 1] % rank:
            raise ValueError(f"tensor {key!r} has shape {list(t.shape)}: not a stacked factor of rank {rank}")
        if factor == "A":
            return name, t.reshape(-1, rank, t.shape[-1])
        return name, t.reshape(t.shape[0], rank, -1).permute(2, 0, 1).contiguous()
    linear = _PEFT_LINEAR.fullmatch(rest)
    if linear is None:
        raise ValueError(f"tensor {key!r} is not a LoRA factor (…lora_A.weight / …lora_B.weight)")
    return f"{linear[1]}.lora_{linear[2]}", t


def _layer_numbers(names: Sequence[str]) -> list[int]:
    return sorted({int(m[1]) for n in names if (m := _LAYER.match(n))})


def save_adapter(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    rank: int,
    alpha: float,
    config: DeepSeekConfig,
    layers: Sequence[int] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the LoRA factors `tensors` (deepmoe names, `lora_state_dict`) as a PEFT adapter directory `path`.

    `config` is the base model's (recorded as its identity); `layers` the adapted decoder layers (None: all);
    `base_model_name_or_path` goes into adapter_config.json as PEFT's field. An existing `path` is replaced as a
    whole, only if it is an adapter directory (or empty). Returns `path`."""
    if not tensors:
        raise AdapterError("save_adapter: no LoRA factor to save (the model has no adapters)")
    peft_tensors: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"tensor {name!r} contains NaN or inf: refusing to save it")
        peft_tensors[peft_name(name)] = to_peft(name, t.detach()).to("cpu").contiguous().clone()
    modules = sorted({m[1].rpartition(".")[2] for n in tensors if (m := _LINEAR_FACTOR.fullmatch(n))
                      and not _EXPERT_FACTOR.fullmatch(n)})  # fmt: skip
    experts = any(_EXPERT_FACTOR.fullmatch(n) for n in tensors)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": modules or None,
        "target_parameters": [f"mlp.experts.{p}" for p in EXPERT_PARAMETERS] if experts else None,
        "layers_to_transform": sorted(layers) if layers is not None else None,
        "layers_pattern": "layers" if layers is not None else None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    base = {"config_hash": config_hash(config), "model_type": config.model_type, "config": identity_config(config)}
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise AdapterError(f"{target}: exists and is not a directory")
        if any(target.iterdir()) and not (target / ADAPTER_CONFIG).is_file():
            raise AdapterError(f"{target}: exists and is not an adapter directory (no {ADAPTER_CONFIG}): refusing "
                               "to replace it")  # fmt: skip
    with atomic_directory(target) as tmp:
        weights = tmp / ADAPTER_WEIGHTS
        st_torch.save_file(peft_tensors, str(weights), metadata={"format": "pt", "deepmoe_base": json.dumps(base)})
        make_readable(weights)
        fsync_path(weights)
        write_json(tmp / ADAPTER_CONFIG, adapter_config)
    return target


def read_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter directory `path` (PEFT LoRA format, made by deepmoe or by PEFT for a DeepSeek model), checked:
    both files readable, peft_type LORA, no feature deepmoe does not compute (dropout is training-only and
    ignored; bias, DoRA, rsLoRA, fan_in_fan_out, rank/alpha patterns are refused), every tensor a LoRA factor
    of rank r, finite."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise AdapterError(f"{directory}: has no {ADAPTER_CONFIG} (not a PEFT adapter)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: not a LoRA adapter (peft_type is {raw.get('peft_type')!r}, not 'LORA')")
    rank, alpha = raw.get("r"), raw.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{config_path}: r={rank!r} is invalid: must be an integer >= 1")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterError(f"{config_path}: lora_alpha={alpha!r} is invalid: must be a number > 0")
    for key, plain in (("bias", "none"), ("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False),
                       ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None)):  # fmt: skip
        if raw.get(key) and raw[key] != plain:
            raise AdapterError(f"{config_path}: {key}={raw[key]!r} is not supported (deepmoe computes plain LoRA)")
    if not weights_path.is_file():
        raise AdapterError(f"{directory}: has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({err})") from None
    tensors: dict[str, Tensor] = {}
    for key, t in stored.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise AdapterError(f"{weights_path}: tensor {key!r} is not finite floating point")
        try:
            name, value = from_peft(key, t, rank)
        except ValueError as err:
            raise AdapterError(f"{weights_path}: {err}") from None
        tensors[name] = value
    experts = [bool(_EXPERT_FACTOR.fullmatch(n)) for n in tensors]
    targets = ("experts",) * any(experts) + ("attention",) * (not all(experts))
    if not targets:
        raise AdapterError(f"{weights_path}: holds no LoRA factor")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    adapted = _layer_numbers(list(tensors))
    try:
        base = json.loads(metadata.get("deepmoe_base", "{}"))
    except json.JSONDecodeError:
        base = {}
    return Adapter(rank, float(alpha), targets, tuple(layers) if layers is not None else tuple(adapted), tensors,
                   base, str(directory))  # fmt: skip


def check_adapter_base(adapter: Adapter, config: DeepSeekConfig) -> None:
    """AdapterError when the adapter records a base model (made by deepmoe) whose config differs from `config`
    (up to training-only knobs), naming the differing fields."""
    want = adapter.base.get("config_hash")
    if want is None or want == config_hash(config):
        return
    stored, mine = adapter.base.get("config") or {}, identity_config(config)
    fields = [k for k in sorted(set(stored) | set(mine)) if stored.get(k) != mine.get(k)]
    raise AdapterError(
        f"{adapter.path}: made for another base model (model_type {adapter.base.get('model_type')!r}; differing "
        f"config fields: {', '.join(fields[:5]) or 'unknown'})"
    )


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "AdapterError",
    "check_adapter_base",
    "peft_name",
    "read_adapter",
    "save_adapter",
]
