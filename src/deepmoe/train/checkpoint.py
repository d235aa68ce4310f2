"""Training checkpoints (docs/design.md#t3-checkpoints): `DIR/step-N/` holds the HF-format weights (`config.json` +
`model.safetensors`, written by `deepmoe.io.save_checkpoint`), `training_state.safetensors` (optimizer
state tensors and the torch RNG states) and `training_state.json` (everything else: step, schedule,
python/numpy RNG states, data position, the run's options, the model config). No pickle anywhere.

A checkpoint is staged in a temporary directory next to its target, every file fsynced, then renamed
into place; only then is `DIR/last` (one line: the checkpoint's directory name; read by
`deepmoe.io.checkpoint.read_last`, so that every command takes a run directory) replaced atomically.
A crash at any moment leaves `last` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors import torch as st_torch
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import LAST_NAME, CheckpointError, load_checkpoint, read_json, read_last, save_checkpoint
from deepmoe.io.files import (
    atomic_directory,
    atomic_write,
    claim_directory,
    fsync_path,
    make_readable,
    remove_temporaries,
    visible_entries,
    write_json,
)

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
TOKENIZER_NAME = "tokenizer.json"
LOG_NAME, EVAL_LOG_NAME, REPORT_NAME, CONFIG_NAME = "log.jsonl", "eval.jsonl", "report.json", "train_config.json"
"""The run directory's files beside its checkpoints: one line per step, one per held-out evaluation, the
end-of-run report, the run's options."""
STATE_FORMAT = "deepmoe-training-state"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


# ---- RNG states --------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON part, tensor part) of the torch CPU/CUDA, python `random` and numpy global RNG states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    info = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    return info, tensors


def set_rng_state(info: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


def rng_to_json(rng: tuple[dict[str, Any], dict[str, Tensor]]) -> dict[str, Any]:
    """`rng_state()` as one JSON object (the byte tensors as hex strings): each rank's, in a distributed
    checkpoint's training_state.json."""
    info, tensors = rng
    return {**info, "tensors": {k: bytes(t.numpy()).hex() for k, t in tensors.items()}}


def rng_from_json(saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The inverse of `rng_to_json`: the arguments of `set_rng_state`."""
    info = {k: v for k, v in saved.items() if k != "tensors"}
    tensors = {k: torch.frombuffer(bytearray.fromhex(v), dtype=torch.uint8) for k, v in saved["tensors"].items()}
    return info, tensors


# ---- optimizer state ---------------------------------------------------------------------------


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON part, tensors keyed `optimizer.{param name}.{key}`) of the optimizer's state_dict."""
    names = _param_names(model)
    groups = []
    ordered: list[str] = []
    for group in optimizer.param_groups:
        ordered.extend(names[id(p)] for p in group["params"])
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        name = ordered[index]
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{name}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    offset = 0
    for group in state["param_groups"]:
        entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        entry["params"] = ordered[offset : offset + len(group["params"])]
        offset += len(group["params"])
        groups.append(entry)
    return {"param_groups": groups, "scalars": scalars}, tensors


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, info: dict[str, Any], tensors: dict[str, Tensor]
) -> None:
    """Inverse of `optimizer_state`; raises CheckpointError if the parameters do not match."""
    names = _param_names(model)
    own = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = [group["params"] for group in info["param_groups"]]
    if own != saved:
        raise CheckpointError("the optimizer state does not match the model's parameters (different parameter groups)")
    index = {name: i for i, name in enumerate(n for group in own for n in group)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        name, _, field = key[len("optimizer.") :].rpartition(".")
        if name not in index:
            raise CheckpointError(f"the optimizer state has a tensor {key!r} for an unknown parameter")
        state.setdefault(index[name], {})[field] = value
    for name, values in info.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for group in info["param_groups"]:
        entry = {k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
        entry["params"] = [index[n] for n in group["params"]]
        groups.append(entry)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def optimizer_state_by_name(info: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """A saved optimizer state (`optimizer_state`'s pair) keyed by parameter name, the form of
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` (to load it into a sharded model)."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, _, field = key[len("optimizer.") :].rpartition(".")
            state.setdefault(name, {})[field] = value
    for name, values in info.get("scalars", {}).items():
        state.setdefault(name, {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- writing -----------------------------------------------------------------------------------


def write_state_json(directory: Path, info: dict[str, Any]) -> None:
    """training_state.json: `info` under the format's name and version."""
    write_json(directory / STATE_JSON, {"format": STATE_FORMAT, "version": STATE_VERSION, **info})


def write_training_state(directory: Path, info: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    path = directory / STATE_TENSORS
    st_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)
    write_state_json(directory, info)


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """The run's tokenizer as `directory/tokenizer.json`, fsynced (nothing for a run without one)."""
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(str(directory / TOKENIZER_NAME))
        fsync_path(directory / TOKENIZER_NAME)


def write_last(out_dir: Path, name: str) -> None:
    """Point `DIR/last` at the checkpoint `name`, atomically (temporary file, fsync, rename)."""
    atomic_write(out_dir / LAST_NAME, name + "\n")


def save_training_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    weights: dict[str, Tensor],
    config: DeepSeekConfig,
    optimizer: tuple[dict[str, Any], dict[str, Tensor]],
    info: dict[str, Any],
    rng: tuple[dict[str, Any], dict[str, Tensor]],
    tokenizer: Any = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `DIR/step-{step}/` (weights, optimizer, RNG, `info`; `extra(staging)` writes any more files, e.g. a
    LoRA run's adapter), then point `DIR/last` at it.

    `weights` is the model's full state dict, `optimizer` the (JSON, tensors) pair of `optimizer_state`
    (both with every expert: an expert-parallel run gathers them first), `rng` the pair of `rng_state()`
    taken at the step boundary being saved.
    The directory `last` currently names is never modified: saving the step it already holds is a no-op.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    target = out_dir / name
    current = read_last(out_dir)
    if current is not None and current.name == name:
        return target
    # staged as `.step-N.tmp-*`; a complete `step-N` that `last` does not name (left by a crash) is replaced whole
    with atomic_directory(target) as staging:
        save_checkpoint(weights, config, staging)
        save_tokenizer(tokenizer, staging)
        if extra is not None:
            extra(staging)
        opt_info, opt_tensors = optimizer
        rng_info, rng_tensors = rng
        write_training_state(
            staging, {**info, "step": step, "optimizer": opt_info, "rng": rng_info}, {**opt_tensors, **rng_tensors}
        )
        for entry in [staging, *staging.iterdir()]:
            make_readable(entry)
    write_last(out_dir, name)
    return target


def checkpoint_steps(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every `step-N` directory in `out_dir`, oldest first."""
    found = []
    for entry in Path(out_dir).iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` checkpoints (0: keep all); never the one `last` names."""
    if keep_last <= 0:
        return []
    current = read_last(out_dir)
    removed = []
    for _, path in checkpoint_steps(out_dir)[:-keep_last]:
        if current is not None and path.resolve() == current.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_staging(out_dir: str | os.PathLike) -> None:
    """Remove what a killed run left of its atomic writes: staging checkpoint directories and the
    temporary files of `last`, the logs, the report and the plots (never a complete checkpoint)."""
    remove_temporaries(out_dir)


# ---- reading -----------------------------------------------------------------------------------


def read_training_state(step_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON state, tensors) of a checkpoint directory; CheckpointError naming the file on any problem."""
    step_dir = Path(step_dir)
    info = read_json(step_dir / STATE_JSON, "training state")
    if info.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{step_dir / STATE_JSON}: not a deepmoe training state")
    if info.get("version") != STATE_VERSION:
        raise CheckpointError(f"{step_dir / STATE_JSON}: unsupported version {info.get('version')!r}")
    if "distributed" in info:  # the tensors are in its distributed/ directory, the RNG states in the JSON
        return info, {}
    path = step_dir / STATE_TENSORS
    if not path.is_file():
        raise CheckpointError(f"{path}: training state tensors not found")
    try:
        tensors = st_torch.load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return info, tensors


def load_model_weights(model: nn.Module, step_dir: str | os.PathLike, new: Callable[[str], bool] | None = None) -> None:
    """Copy the HF-format weights of a checkpoint directory into `model` (names and shapes must match); the model's
    tensors whose name `new(name)` accepts may be absent from the checkpoint (they keep their values)."""
    _, state = load_checkpoint(step_dir)
    own = model.state_dict()
    expected = own.keys() if new is None else {name for name in own if name in state or not new(name)}
    if expected != state.keys():
        missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
        raise CheckpointError(f"{step_dir}: weights do not match the model (missing {missing[:3]}, extra {extra[:3]})")
    model.load_state_dict(state, strict=new is None)


# ---- the run directory --------------------------------------------------------------------------


def hold_run_directory(out: Path, replaceable: Callable[[Path], bool]) -> AbstractContextManager:
    """`claim_directory` of the run directory, on rank 0 of an expert-parallel run (the others write nothing)."""
    if os.environ.get("RANK", "0") != "0":
        return nullcontext(out)
    return claim_directory(out, "deepmoe run directory", replaceable)


def is_unstarted_run(directory: Path) -> bool:
    """A run that stopped before its first checkpoint: its options and logs only (a new run replaces them)."""
    names = set(visible_entries(directory))
    return CONFIG_NAME in names and names <= {CONFIG_NAME, LOG_NAME, EVAL_LOG_NAME}


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Add one JSON line to a run log."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic_write(path, "".join(line + "\n" for line in keep))
