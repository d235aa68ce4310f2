"""The steering file of `deepmoe steer` (docs/design.md#s2-steering): a plan from
`deepmoe.tools.steer.steering_plan`, as a JSON object {"format": "deepmoe-steering", "version": 1,
"action": "disable" | "force", "layers": {"layer": [expert, ...]}, ...}; `load_steering` reads and checks
it, `apply_steering` sets its expert masks on a model (`deepmoe generate --steering FILE`), `clear_steering`
removes them, `write_steering` writes one.

`deepmoe steer --out FILE` replaces FILE only if it is a steering file (`check_steering_target`);
anything else is refused before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepmoe.io.files import write_json

STEERING_FORMAT = "deepmoe-steering"
STEERING_VERSION = 1
ACTIONS = ("disable", "force")


# -------------------------------------------------------------------------------------- reading and applying


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


def load_steering(plan_or_path: Mapping[str, Any] | str | os.PathLike) -> tuple[str, dict[int, list[int]]]:
    """(action, {layer: experts}) of a steering plan or of a steering file, validated for shape."""
    where = "steering plan"
    if isinstance(plan_or_path, (str, os.PathLike)):
        where = str(plan_or_path)
        text = Path(plan_or_path).read_text(encoding="utf-8")
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}, line {error.lineno})") from None
    else:
        plan = plan_or_path
    if not isinstance(plan, Mapping):
        raise ValueError(f"{where}: a steering plan is a JSON object, got {type(plan).__name__}")
    if plan.get("format", STEERING_FORMAT) != STEERING_FORMAT:
        raise ValueError(f"{where}: format is {plan.get('format')!r}, not {STEERING_FORMAT!r}")
    version = plan.get("version", STEERING_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > STEERING_VERSION:
        raise ValueError(f"{where}: version {version!r} is not supported (this deepmoe reads {STEERING_VERSION})")
    action = plan.get("action")
    if action not in ACTIONS:
        raise ValueError(f"{where}: action must be one of {', '.join(ACTIONS)}, got {action!r}")
    layers = plan.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError(f"{where}: 'layers' must be an object {{layer: [expert, ...]}}")
    out: dict[int, list[int]] = {}
    for key, experts in layers.items():
        layer = _int(key, f"{where}: layer index")
        if not isinstance(experts, list):
            raise ValueError(f"{where}: layer {layer} must list expert ids, got {experts!r}")
        out[layer] = [_int(e, f"{where}: layer {layer} expert id") for e in experts]
    return action, out


def clear_steering(model) -> None:
    """Remove every expert mask (all MoE layers, MTP blocks included)."""
    for layer in model.moe_layers().values():
        layer.gate.clear_expert_mask()


def apply_steering(model, plan_or_path: Mapping[str, Any] | str | os.PathLike) -> dict[int, list[int]]:
    """Set the plan's expert masks on `model` (a plan from `steering_plan` or a steering JSON file).

    Every earlier mask is cleared first; the weights are not touched. If the router refuses a layer's
    mask (out-of-range ids, too many forced, too few left), every mask is cleared again and a ValueError
    names the layer. Returns {layer: experts} as applied.
    """
    action, layers = load_steering(plan_or_path)
    moe = model.moe_layers()
    unknown = sorted(set(layers) - set(moe))
    if unknown:
        raise ValueError(f"steering names layers {unknown}, but the model's MoE layers are {sorted(moe)}")
    clear_steering(model)
    try:
        for layer, experts in sorted(layers.items()):
            if experts:
                kind = {"disabled": experts} if action == "disable" else {"forced": experts}
                try:
                    moe[layer].gate.set_expert_mask(**kind)
                except ValueError as error:
                    raise ValueError(f"steering layer {layer}: {error}") from None
    except ValueError:
        clear_steering(model)
        raise
    return {layer: experts for layer, experts in sorted(layers.items()) if experts}


# ------------------------------------------------------------------------------------------------ output


def check_steering_target(path: str | os.PathLike) -> None:
    """Refuse (one ValueError naming it) to write the steering file `path` over anything but a steering
    file: a JSON object with "format": "deepmoe-steering" that `load_steering` reads. A missing `path` is
    fine when its directory exists."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        if not path.parent.is_dir():
            raise ValueError(f"--out {path}: the directory {path.parent} does not exist")
        return
    refuse = f"--out {path}: exists and is not a steering file"
    advice = "refusing to overwrite it; choose another path"
    if not path.is_file():
        raise ValueError(f"{refuse} (not a regular file): {advice}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != STEERING_FORMAT:
            raise ValueError(f'no "format": "{STEERING_FORMAT}"')
        load_steering(data)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).removeprefix("steering plan: ")
        if isinstance(error, json.JSONDecodeError):
            reason = "not valid JSON"
        elif isinstance(error, UnicodeDecodeError):
            reason = "not UTF-8 text"
        raise ValueError(f"{refuse} ({reason}): {advice}") from None


def write_steering(path: str | os.PathLike, output: Mapping[str, Any]) -> Path:
    """Write the steering file `path` (atomically; `check_steering_target` first, so only a steering file
    is ever replaced)."""
    check_steering_target(path)
    return write_json(path, output)


__all__ = [
    "ACTIONS",
    "STEERING_FORMAT",
    "STEERING_VERSION",
    "apply_steering",
    "check_steering_target",
    "clear_steering",
    "load_steering",
    "write_steering",
]
