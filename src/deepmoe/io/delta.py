"""Expert deltas (docs/design.md#s3-expert-specialised-fine-tuning): the routed-expert slices that an
expert-specialised fine-tune (ESFT) changed,
stored apart from the base checkpoint and applied on top of it.

A delta is a directory of two files, written atomically (`deepmoe.io.files.atomic_directory`):

- `delta.safetensors`: one tensor per changed expert projection, under the per-expert names of a
  Hugging Face checkpoint, `model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`
  ([I, H], [I, H], [H, I]); an MTP block k is layer `num_hidden_layers + k`, as on disk;
- `delta.json`: the format tag, the selection (layer -> experts), and the identity of the base model:
  a hash of its config (`config_hash`, the fields that define the computed function) and a SHA-256
  of the base values of exactly the slices the delta replaces (`base_slices_sha256`), so that applying
  it to another model, or twice, is refused.

`apply_delta(model, path)` validates everything (names, layers, experts, shapes, finiteness, base
identity) before it writes a single value; it needs of the model only its `config` and its parameters, and
`merge_delta` applies a delta to a checkpoint's state dict without building a model. Every problem raises
`DeltaError` (a `ValueError`), one line naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as st_torch
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import CheckpointError, checkpoint_dir, load_checkpoint, save_checkpoint
from deepmoe.io.files import atomic_directory, fsync_path, make_readable, write_json
from deepmoe.io.hf import split_expert_shape, split_expert_tensor

DELTA_WEIGHTS = "delta.safetensors"
DELTA_META = "delta.json"
DELTA_FORMAT = "deepmoe-expert-delta"
DELTA_VERSION = 1
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")

# Config fields that only steer training (loss weights, balancing speed) or pick a kernel: they do not change
# what a given set of weights computes, so a delta stays valid across them.
_RUNTIME_FIELDS = frozenset(
    {"experts_implementation", "bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "device_aux_loss_alpha",
     "comm_aux_loss_alpha", "z_loss_coef", "entropy_loss_coef", "mtp_loss_weight"}
)  # fmt: skip

Selection = Mapping[int, list[int]]


class DeltaError(CheckpointError):
    """A delta directory is missing, unreadable, inconsistent, or does not fit the model it is applied to."""


# ---- names and identity ----------------------------------------------------------------------------


def identity_config(config: DeepSeekConfig) -> dict[str, Any]:
    """`config.to_dict()` without the training-only knobs (`_RUNTIME_FIELDS`), as JSON values."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_FIELDS}
    if isinstance(fields.get("moe"), dict):
        fields["moe"] = {k: v for k, v in fields["moe"].items() if k not in _RUNTIME_FIELDS}
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def config_hash(config: DeepSeekConfig) -> str:
    """SHA-256 (hex, 16 characters) of `identity_config(config)` as canonical JSON."""
    data = json.dumps(identity_config(config), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def fused_expert_name(config: DeepSeekConfig, layer: int, fused: str) -> str:
    """deepmoe state-dict name of a layer's stacked experts (`fused`: "gate_up_proj" or "down_proj")."""
    n = config.num_hidden_layers
    prefix = f"model.layers.{layer}." if layer < n else f"model.mtp.{layer - n}.block."
    return f"{prefix}mlp.experts.{fused}"


def delta_name(layer: int, expert: int, proj: str) -> str:
    """Checkpoint name of one expert projection, e.g. `model.layers.3.mlp.experts.7.down_proj.weight`."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def check_selection(config: DeepSeekConfig, selection: Selection, what: str = "selection") -> dict[int, list[int]]:
    """`selection` as {layer: sorted unique experts}; raises ValueError for a layer that is not an MoE layer
    of `config` or an expert out of range."""
    n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
    moe_layers = [i for i in range(n_layers) if config.is_moe_layer(i)]
    out: dict[int, list[int]] = {}
    for layer, experts in selection.items():
        layer = int(layer)
        if layer not in moe_layers:
            raise ValueError(f"{what}: layer {layer} is not an MoE layer of this model (MoE layers: {moe_layers})")
        n = config.moe.n_routed_experts
        chosen = sorted({int(e) for e in experts})
        bad = [e for e in chosen if not 0 <= e < n]
        if bad:
            raise ValueError(f"{what}: layer {layer} has no expert {bad[0]} (it has experts 0..{n - 1})")
        out[layer] = chosen
    return dict(sorted(out.items()))


def expert_slices(state: Mapping[str, Tensor], config: DeepSeekConfig, selection: Selection) -> dict[str, Tensor]:
    """Checkpoint name -> view of that expert projection in `state` (a deepmoe state dict), for the selection."""
    out: dict[str, Tensor] = {}
    for layer, experts in check_selection(config, selection).items():
        for expert in experts:
            for proj in PROJECTIONS:
                fused = state[fused_expert_name(config, layer, _FUSED[proj])]
                out[delta_name(layer, expert, proj)] = split_expert_tensor(fused, expert, proj)
    return out


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def slices_sha256(slices: Mapping[str, Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(slices):
        t = slices[name]
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _base_state(base: nn.Module | Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    if isinstance(base, nn.Module):
        return base.state_dict()
    if isinstance(base, (str, os.PathLike)):
        return load_checkpoint(base)[1]
    return base


def _changed_outside(state: Mapping[str, Tensor], base: Mapping[str, Tensor], config: DeepSeekConfig,
                     selection: dict[int, list[int]]) -> list[str]:  # fmt: skip
    """Names (with expert rows for stacked experts) where `state` differs from `base` outside the selection."""
    fused_rows: dict[str, list[int]] = {}
    for layer, experts in selection.items():
        for fused in ("gate_up_proj", "down_proj"):
            fused_rows[fused_expert_name(config, layer, fused)] = experts
    changed = []
    for name, t in state.items():
        if name not in base:
            changed.append(f"{name} (not in the base)")
            continue
        b = base[name]
        if tuple(b.shape) != tuple(t.shape) or b.dtype != t.dtype:
            changed.append(f"{name} (shape/dtype differ from the base)")
            continue
        rows = fused_rows.get(name)
        if rows is None:
            if not torch.equal(t, b.to(t.device)):
                changed.append(name)
            continue
        keep = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
        keep[rows] = False
        if not torch.equal(t[keep], b.to(t.device)[keep]):
            rows_changed = [i for i in keep.nonzero().flatten().tolist() if not torch.equal(t[i], b[i].to(t.device))]
            changed.append(f"{name} (experts {rows_changed[:8]})")
    return changed


# ---- writing ---------------------------------------------------------------------------------------


def save_delta(
    model: nn.Module,
    base: nn.Module | Mapping[str, Tensor] | str | os.PathLike,
    path: str | os.PathLike,
    selection: Selection,
    metadata: dict[str, Any] | None = None,
    check_unchanged: bool = True,
) -> Path:
    """Write the selected expert slices of `model` as a delta directory `path` (see the module doc).

    `base` is the model before fine-tuning: a module, its state dict, or its checkpoint directory. With
    `check_unchanged` (default), every tensor of `model` outside the selected expert slices must be
    bit-identical to `base` (else the delta would not reproduce `model`: DeltaError naming them).
    `metadata` (JSON values) is stored in delta.json under "training". An existing `path` is replaced as a
    whole, only if it is a delta directory (or empty). Returns `path`.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, DeepSeekConfig) or config.moe is None:
        raise ValueError("save_delta needs a DeepSeekForCausalLM with MoE layers")
    selection = check_selection(config, selection)
    if not any(selection.values()):
        raise ValueError("save_delta: the selection holds no expert")
    state = model.state_dict()
    base_state = _base_state(base)
    if check_unchanged:
        changed = _changed_outside(state, base_state, config, selection)
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise DeltaError(
                f"the model differs from its base outside the selected experts ({shown}): "
                "a delta of the selected experts would not reproduce it"
            )
    tensors = {
        name: t.detach().to("cpu").contiguous().clone() for name, t in expert_slices(state, config, selection).items()
    }
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DeltaError(f"tensor {name!r} contains NaN or inf: refusing to save it")
    base_slices = expert_slices(base_state, config, selection)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    meta = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "kind": "routed-experts",
        "selection": {str(layer): experts for layer, experts in selection.items() if experts},
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "base": {
            "config_hash": config_hash(config),
            "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers,
            "n_routed_experts": config.moe.n_routed_experts,
            "base_slices_sha256": slices_sha256(base_slices),
            "base_slices_dtype": str(next(iter(base_slices.values())).dtype).removeprefix("torch."),
            "config": identity_config(config),
        },
        "training": metadata or {},
    }
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise DeltaError(f"{target}: exists and is not a directory")
        if any(target.iterdir()) and not (target / DELTA_META).is_file():
            raise DeltaError(f"{target}: exists and is not a delta directory (no {DELTA_META}): refusing to replace it")
    with atomic_directory(target) as tmp:
        weights = tmp / DELTA_WEIGHTS
        st_torch.save_file(tensors, str(weights), metadata={"format": "pt", "deepmoe": DELTA_FORMAT})
        make_readable(weights)
        fsync_path(weights)
        write_json(tmp / DELTA_META, meta)
    return target


# ---- reading ---------------------------------------------------------------------------------------


def load_delta(path: str | os.PathLike) -> dict[str, Any]:
    """The delta directory `path` as a dict: delta.json's fields ("format", "version", "selection" as
    {layer: [experts]} with int keys, "base", "training", ...) plus "tensors": {name: Tensor} and "path".

    Checks that both files are there and readable, the format, that every tensor name is an expert
    projection of a layer and expert of the selection (and every selected expert has its three), and that
    the values are finite.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise DeltaError(f"{directory}: delta directory not found")
    meta_path, weights_path = directory / DELTA_META, directory / DELTA_WEIGHTS
    if not meta_path.is_file():
        raise DeltaError(f"{directory}: has no {DELTA_META} (not a deepmoe delta)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeltaError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{meta_path}: not a deepmoe delta (format is not {DELTA_FORMAT!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > DELTA_VERSION:
        raise DeltaError(
            f"{meta_path}: delta version {version!r} is not supported (this deepmoe reads <= {DELTA_VERSION})"
        )
    raw_selection = meta.get("selection")
    try:
        selection = {int(k): sorted(int(e) for e in v) for k, v in raw_selection.items()}
    except (AttributeError, TypeError, ValueError):
        raise DeltaError(f"{meta_path}: 'selection' must map layer numbers to lists of expert numbers") from None
    if not weights_path.is_file():
        raise DeltaError(f"{directory}: has no {DELTA_WEIGHTS}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise DeltaError(f"{weights_path}: not a readable safetensors file ({err})") from None
    expected = {
        delta_name(layer, e, proj) for layer, experts in selection.items() for e in experts for proj in PROJECTIONS
    }
    for name, t in tensors.items():
        if not _NAME.fullmatch(name):
            raise DeltaError(
                f"{weights_path}: unknown tensor name {name!r} (a delta holds only "
                "model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight)"
            )
        if name not in expected:
            raise DeltaError(f"{weights_path}: tensor {name!r} is not an expert of the selection in {DELTA_META}")
        if not t.is_floating_point():
            raise DeltaError(f"{weights_path}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise DeltaError(f"{weights_path}: tensor {name!r} contains NaN or inf")
    missing = sorted(expected - tensors.keys())
    if missing:
        raise DeltaError(f"{weights_path}: lacks {missing[0]!r} ({len(missing)} tensor(s) of the selection missing)")
    return {**meta, "selection": selection, "tensors": tensors, "path": str(directory)}


def apply_delta(model: nn.Module, delta: str | os.PathLike | Mapping[str, Any], check_base: bool = True) -> nn.Module:
    """Write a delta's expert slices into `model` (in place; returns it).

    `delta` is a delta directory or what `load_delta` returned. Everything is checked before anything is
    written: each tensor's layer must be an MoE layer of `model`, its expert in range, its shape the slice's
    shape. With `check_base` (default), the model must also be the delta's base: the same config (up to
    training-only knobs) and, where the dtypes agree, bit-identical values in the slices being replaced (so
    a delta applied twice, or to another checkpoint, is refused). Values are cast to the model's dtype.
    """
    _apply(dict(model.named_parameters()), getattr(model, "config", None), delta, check_base)
    return model


def _apply(
    state: Mapping[str, Tensor], config: DeepSeekConfig | None, delta: str | os.PathLike | Mapping[str, Any],
    check_base: bool,
) -> None:  # fmt: skip
    """`apply_delta` on the stacked expert tensors of `state` (a deepmoe state dict or a model's parameters)."""
    loaded = load_delta(delta) if isinstance(delta, (str, os.PathLike)) else delta
    where = loaded.get("path", "delta")
    if not isinstance(config, DeepSeekConfig) or config.moe is None:
        raise DeltaError(f"{where}: can only be applied to a DeepSeekForCausalLM with MoE layers")
    n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
    moe_layers = [i for i in range(n_layers) if config.is_moe_layer(i)]
    targets: dict[str, Tensor] = {}
    for name, t in loaded["tensors"].items():
        match = _NAME.fullmatch(name)
        if not match:
            raise DeltaError(f"{where}: unknown tensor name {name!r}")
        layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
        if layer not in moe_layers:
            raise DeltaError(
                f"{where}: tensor {name!r}: layer {layer} is not an MoE layer of this model (MoE layers: {moe_layers})"
            )
        n_experts = config.moe_config(layer).n_routed_experts
        if expert >= n_experts:
            raise DeltaError(f"{where}: tensor {name!r}: layer {layer} of this model has experts 0..{n_experts - 1}")
        fused = state[fused_expert_name(config, layer, _FUSED[proj])]
        want = split_expert_shape(tuple(fused.shape), expert, proj)
        if tuple(t.shape) != want:
            raise DeltaError(
                f"{where}: tensor {name!r} has shape {list(t.shape)}, this model's expert slice is {list(want)}"
            )
        targets[name] = split_expert_tensor(fused, expert, proj)
    if check_base:
        base = loaded.get("base") or {}
        want_hash, got_hash = base.get("config_hash"), config_hash(config)
        if want_hash != got_hash:
            stored = base.get("config") or {}
            mine = identity_config(config)
            fields = _differing(stored, mine)
            raise DeltaError(
                f"{where}: made for a base model with another config (config hash {want_hash}, this model "
                f"{got_hash}; {', '.join(fields[:5]) or 'fields differ'}); pass check_base=False to apply it anyway"
            )
        dtypes = {str(t.dtype).removeprefix("torch.") for t in targets.values()}
        if dtypes == {base.get("base_slices_dtype")} and slices_sha256(targets) != base.get("base_slices_sha256"):
            raise DeltaError(
                f"{where}: this model is not the delta's base: the expert weights it replaces differ from the ones "
                "it was trained from (another checkpoint, or the delta is already applied); "
                "pass check_base=False to apply it anyway"
            )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(loaded["tensors"][name])


def _differing(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _differing(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} vs {y!r}")
    return out


def delta_size(path: str | os.PathLike) -> int:
    """Bytes of the files in a delta (or any) directory."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def merge_delta(
    base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> Path:
    """A full checkpoint `out` = the checkpoint `base` with `delta` applied (tokenizer.json copied along)."""
    base = checkpoint_dir(base)
    config, state = load_checkpoint(base)
    _apply(state, config, delta, check_base=True)
    target = save_checkpoint(state, config, out, max_shard_size=max_shard_size)
    tokenizer = base / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copy2(tokenizer, Path(target) / "tokenizer.json")
    return target


__all__ = [
    "DELTA_META",
    "DELTA_WEIGHTS",
    "DeltaError",
    "apply_delta",
    "check_selection",
    "config_hash",
    "delta_name",
    "delta_size",
    "expert_slices",
    "load_delta",
    "merge_delta",
    "save_delta",
]
