"""Checkpoint files (docs/design.md#m5-hugging-face-checkpoints): safetensors reading (single file or sharded,
memory-mapped, no pickle), block-wise FP8 dequantisation, atomic sharded writing, and on top of them
`load_config` / `load_checkpoint` / `save_checkpoint` for HF-format DeepSeek checkpoints: a config
and a state dict, names and config mapped by `deepmoe.io.hf`. Building a model from them is
`deepmoe.model.pretrained`'s.

Wherever a checkpoint directory is read, a training run's directory will do too: its `last` file
names its newest complete checkpoint (`checkpoint_dir`). `load_checkpoint` also reads a multi-process
run's step directory, whose weights are a `distributed/` DCP checkpoint (`deepmoe.io.distributed`).

Every problem with a file raises `CheckpointError`, one line naming the file and, where there is
one, the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.io.distributed import (
    MODEL_PREFIX,
    DistributedCheckpoint,
    LazyTensors,
    cast_dtype,
    is_distributed_checkpoint,
)
from deepmoe.io.files import atomic_directory, fsync_path, visible_entries, write_json
from deepmoe.io.fp8_blocks import FP8_DTYPES, SCALE_SUFFIX, dequantize_fp8
from deepmoe.io.hf import (
    config_from_hf,
    config_to_hf,
    expected_hf_shapes,
    expected_shapes,
    hf_items,
    hf_name,
    mtp_copies,
    split_expert_shape,
    split_expert_tensor,
)
from deepmoe.io.safetensors_stream import CheckpointError, PendingTensor, StoredTensor, tensor_locations, write_file

CONFIG_NAME = "config.json"
LAST_NAME = "last"
"""In a training run's directory: one line, the name of its newest complete checkpoint directory."""
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|vocab\..*|merges\.txt)")
"""Files beside the weights that belong to a HF checkpoint (tokenizer, generation settings)."""


# ---- reading ------------------------------------------------------------------------------------


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_STEP_DIR = re.compile(r"step-(\d+)")


def step_number(directory: Path) -> int | None:
    """N of a run's `step-N` directory, else None."""
    match = _STEP_DIR.fullmatch(Path(directory).name)
    return int(match[1]) if match else None


def _newest_complete_step(run_dir: Path) -> Path | None:
    """The run's `step-N` directory of the highest N that holds a complete checkpoint (config.json and its
    weights: safetensors or a `distributed/` DCP directory; a run writes each one whole, staged and
    renamed), or None."""
    steps = []
    for entry in run_dir.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / CONFIG_NAME).is_file():
            if (entry / WEIGHTS_NAME).is_file() or (entry / INDEX_NAME).is_file() or is_distributed_checkpoint(entry):
                steps.append((int(match[1]), entry))
    return max(steps)[1] if steps else None


def read_last(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory that the `last` file of a run directory names, or None when it has none.
    When the step it names was deleted, the newest complete `step-N` directory instead (with a warning
    naming it); CheckpointError when there is none."""
    run_dir = Path(run_dir)
    path = run_dir / LAST_NAME
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8").strip()
    if not name or name in (".", "..") or Path(name).name != name:
        raise CheckpointError(f"{path}: does not name a checkpoint directory (got {name!r})")
    target = run_dir / name
    if not target.is_dir():
        newest = _newest_complete_step(run_dir)
        if newest is None:
            raise CheckpointError(f"{path}: names {name}, but {target} does not exist (nor does any complete step)")
        warnings.warn(
            f"{path} names {name}, which does not exist: using {newest.name}, the newest complete checkpoint",
            stacklevel=2,
        )
        return newest
    return target


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory that `path` means: a training run's directory (no config.json, a `last`
    file) means its newest complete checkpoint; a checkpoint directory (a HF folder, a run's `step-N`) or
    any other path means itself."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_NAME).exists():
        return read_last(path) or path
    return path


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists. Files are memory-mapped by `safe_open`; a tensor's
    shape and dtype are read from the header without touching its data.

    Use as a context manager (or call `close`) to release the file handles.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = checkpoint_dir(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        self._handles: dict[str, Any] = {}
        index_path = self.directory / INDEX_NAME
        single_path = self.directory / WEIGHTS_NAME
        self.weight_map: dict[str, str] = {}
        if index_path.exists():
            index = read_json(index_path, "index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: has no 'weight_map' object of tensor name -> file name")
            for file in sorted(set(weight_map.values())):
                if Path(file).name != file:
                    raise CheckpointError(f"{index_path}: shard name {file!r} is not a plain file name")
                if not (self.directory / file).is_file():
                    first = next(name for name, f in weight_map.items() if f == file)
                    raise CheckpointError(
                        f"{index_path}: names shard {file!r} (holding e.g. {first!r}), "
                        f"but {self.directory / file} does not exist"
                    )
            self.weight_map = dict(weight_map)
            for file in sorted(set(weight_map.values())):
                keys = set(self._handle(file).keys())
                for name, f in weight_map.items():
                    if f == file and name not in keys:
                        raise CheckpointError(
                            f"{index_path}: says tensor {name!r} is in {file}, but that file lacks it"
                        )
        elif single_path.exists():
            self.weight_map = dict.fromkeys(self._handle(WEIGHTS_NAME).keys(), WEIGHTS_NAME)
        else:
            pickled = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt")]
            hint = (
                f" (found {pickled[0]}: pickled weights are not read, convert them to safetensors)" if pickled else ""
            )
            if is_distributed_checkpoint(self.directory):
                hint = " (a distributed training checkpoint: convert it with `deepmoe export` first)"
            raise CheckpointError(f"{self.directory}: has neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")

    def _handle(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            path = self.directory / file
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
            self._handles[file] = handle
        return handle

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        return self.directory / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. "BF16", "F8_E4M3"."""
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def is_fp8(self, name: str) -> bool:
        return self.dtype(name).startswith("F8")

    def locations(self) -> dict[str, StoredTensor]:
        """Name -> where its bytes are (file, dtype, shape, byte range), in the weight map's order, for
        reading a row block at a time (`deepmoe.io.safetensors_stream.read_rows`)."""
        files = {file: tensor_locations(self.directory / file) for file in sorted(set(self.weight_map.values()))}
        return {name: files[file][name] for name, file in self.weight_map.items()}

    def get(self, name: str) -> Tensor:
        try:
            return self._handle(self.weight_map[name]).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({err})") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- writing ------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "10KiB" (decimal units; "iB": binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"max_shard_size={size!r} is invalid: use bytes or a string like '5GB', '500MB'")
        number, unit, binary = match.groups()
        base = 1024 if binary else 1000
        value = int(float(number) * base ** " KMGT".index(unit.upper() or " "))
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} is invalid: must be >= 1 byte")
    return value


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """(name, nbytes) items in order, greedily packed into shards of at most `max_shard_size` bytes
    (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_name(index: int, n_shards: int) -> str:
    """`model.safetensors` for a single shard, else `model-0000i-of-0000n.safetensors` (i from 0)."""
    return WEIGHTS_NAME if n_shards == 1 else f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"


def write_shards(
    items: Iterable[tuple[str, PendingTensor]],
    directory: Path,
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write (name, pending tensor) items in order into `directory`, packed by `plan_shards`; several
    shards get `model.safetensors.index.json`. Each tensor is made right before it is written (so the
    peak memory is about the largest one), each file is fsynced. Returns name -> file name.
    """
    pending = dict(items)
    shards = plan_shards(((name, t.nbytes) for name, t in pending.items()), max_shard_size)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = shard_file_name(i, len(shards))
        weight_map.update(dict.fromkeys(shard, file))
        write_file(directory / file, {name: pending[name] for name in shard}, metadata)
    if len(shards) > 1:
        total = sum(t.nbytes for t in pending.values())
        write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map


def _checkpoint_files(directory: Path) -> set[str]:
    """Names of the files a checkpoint write replaces (config, weights, shards, index)."""
    names = {CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME}
    names |= {p.name for p in directory.iterdir() if _SHARD_NAME.fullmatch(p.name)}
    try:
        names |= set(json.loads((directory / INDEX_NAME).read_text()).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return names


def copy_tokenizer_files(source: Path, target: Path, also: tuple[str, ...] = ()) -> None:
    """Copy the tokenizer files of the checkpoint directory `source` (and the files named in `also`) into
    `target`, each fsynced: what a command writing a new checkpoint from `source` carries over."""
    for entry in sorted(source.iterdir()):
        if entry.is_file() and (entry.name in also or TOKENIZER_FILES.fullmatch(entry.name)):
            shutil.copyfile(entry, target / entry.name)
            fsync_path(target / entry.name)


def checkpoint_output(record: str) -> Callable[[Path], bool]:
    """Whether a directory is a checkpoint a command wrote before and may replace: it holds the command's
    `record` file (e.g. merge.json) and otherwise only checkpoint files (config, weights, tokenizer)."""

    def replaceable(directory: Path) -> bool:
        own = _checkpoint_files(directory) | {record}
        names = visible_entries(directory)
        return record in names and all(n in own or TOKENIZER_FILES.fullmatch(n) for n in names)

    return replaceable


# ---- HF checkpoints of deepmoe models -------------------------------------------------------------


def load_config(path: str | os.PathLike) -> DeepSeekConfig:
    """`DeepSeekConfig` of a checkpoint directory, a run directory or a config.json path; errors name the file."""
    return _read_config(checkpoint_dir(path))[0]


def _read_config(path: Path) -> tuple[DeepSeekConfig, dict[str, Any]]:
    file = path / CONFIG_NAME if path.is_dir() or not path.suffix else path
    raw = read_json(file, CONFIG_NAME)
    try:
        return config_from_hf(raw), raw
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file}: {err}") from None


# ---- loading -----------------------------------------------------------------------------------


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _mismatch(directory: Path, config_file: Path, missing: list[str], unexpected: list[str], where: str = "") -> str:
    """The message of a checkpoint whose tensors do not match its config: what is missing and unexpected."""
    problems = [f"missing {len(missing)} tensor(s) {_listing(missing)}"] if missing else []
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) {_listing(unexpected)}{where}")
    return f"{directory}: does not match {config_file.name}: " + "; ".join(problems)


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
    check_finite: bool = True,
) -> tuple[DeepSeekConfig, dict[str, Tensor]]:  # fmt: skip
    """Read a HF-format checkpoint directory (or a run directory's newest checkpoint): (config, deepmoe
    state dict).

    Reads config.json and `model.safetensors` or the shards of `model.safetensors.index.json`
    (memory-mapped), stacks per-expert tensors into `gate_up_proj`/`down_proj`, maps V3's MTP layers
    to `model.mtp.{k}`, dequantises FP8 block-scaled weights, and casts floating tensors to `dtype`
    (None: as stored; FP8 weights to the config's torch_dtype, else bfloat16). The expert-bias
    buffers stay float32. A step directory of a multi-process run (config.json and `distributed/`)
    is read tensor by tensor from its DCP files. Raises CheckpointError naming the file and tensor on
    any mismatch.
    """
    directory = checkpoint_dir(path)
    config, raw = _read_config(directory)
    if is_distributed_checkpoint(directory):
        return config, _load_distributed(directory, config, dtype, device, check_finite)
    quant = raw.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or (128, 128))
    fp8_dtype = dtype or _dtype_from_config(raw) or torch.bfloat16
    with SafetensorsCheckpoint(directory) as ckpt:
        config = _validate(ckpt, config, directory / CONFIG_NAME)

        def read(hf: str) -> Tensor:
            t = ckpt.get(hf)
            if t.dtype in FP8_DTYPES:
                try:
                    t = dequantize_fp8(t, ckpt.get(hf + SCALE_SUFFIX), block, fp8_dtype)
                except ValueError as err:
                    raise CheckpointError(f"{ckpt.file_of(hf)}: tensor {hf!r}: {err}") from None
            t = t.to(cast_dtype(hf, t.dtype, dtype))
            if check_finite:
                _check_finite(t, ckpt.file_of(hf), hf)
            return t.to(device) if device is not None else t

        state = assemble_state(config, read, ckpt)
    return config, state


def assemble_state(config: DeepSeekConfig, read: Callable[[str], Tensor], stored: Container[str]) -> dict[str, Tensor]:
    """deepmoe's state dict for `config` from a checkpoint's tensors by HF name (`read(name)`; `stored`: the names
    it has): per-expert tensors stacked into `gate_up_proj`/`down_proj` (unless stored fused), V3's MTP layers
    mapped to `model.mtp.{k}`."""
    state: dict[str, Tensor] = {}
    for name, shape in expected_shapes(config).items():
        hf = hf_name(name, config)
        if hf in stored:  # stored as is (experts fused, as in memory)
            state[name] = read(hf)
            continue
        parts = hf_items(name, None, config, lambda _, j, proj: (j, proj))
        first = read(parts[0][0])
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
        half = shape[1] // 2
        for hf_part, (j, proj) in parts:
            t = first if hf_part == parts[0][0] else read(hf_part)
            {"gate_proj": out[j, :half], "up_proj": out[j, half:], "down_proj": out[j]}[proj].copy_(t)
        state[name] = out
    return state


def _check_finite(t: Tensor, where: Path, name: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        what = "NaN" if torch.isnan(t).any() else "inf"
        raise CheckpointError(f"{where}: tensor {name!r} contains {what}")


def _load_distributed(
    directory: Path, config: DeepSeekConfig, dtype: torch.dtype | None, device: str | torch.device | None,
    check_finite: bool,
) -> dict[str, Tensor]:  # fmt: skip
    """The state dict of the DCP checkpoint of the step `directory`, checked against its config."""
    tensors = DistributedCheckpoint(directory, dtype)
    expected = check_distributed(tensors, config, directory / CONFIG_NAME)
    state = {}
    for name in expected:
        t = tensors[name]
        if check_finite:
            _check_finite(t, tensors.directory, MODEL_PREFIX + name)
        state[name] = t.to(device) if device is not None else t
    return state


def check_distributed(
    tensors: DistributedCheckpoint, config: DeepSeekConfig, config_file: Path
) -> dict[str, tuple[int, ...]]:
    """`expected_shapes(config)` after checking the DCP checkpoint's model tensors against it (names,
    shapes, floating dtypes; a tied `lm_head.weight` may be stored too); CheckpointError naming the first
    mismatch."""
    expected = expected_shapes(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected and n not in tied]
    if missing or unexpected:
        raise CheckpointError(_mismatch(tensors.directory, config_file, missing, unexpected))
    for name, want in expected.items():
        got = tensors.shape(name)
        if got != want:
            raise CheckpointError(
                f"{tensors.directory}: tensor {MODEL_PREFIX + name!r} has shape {list(got)}, "
                f"{config_file.name} implies {list(want)}"
            )
        if not tensors.stored_dtype(name).is_floating_point:
            raise CheckpointError(
                f"{tensors.directory}: tensor {MODEL_PREFIX + name!r} has dtype {tensors.stored_dtype(name)}, "
                "not a floating-point type"
            )
    return expected


def _dtype_from_config(raw: dict[str, Any]) -> torch.dtype | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    value = getattr(torch, str(name), None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point and value not in FP8_DTYPES else None


def _validate(ckpt: SafetensorsCheckpoint, config: DeepSeekConfig, config_file: Path) -> DeepSeekConfig:
    """Check names and shapes against the config; returns the config (MTP dropped if absent)."""
    names = ckpt.names()
    scales = {n for n in names if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in ckpt}
    for scale in sorted(scales):
        if not ckpt.is_fp8(scale[: -len(SCALE_SUFFIX)]):
            raise CheckpointError(f"{ckpt.file_of(scale)}: has {scale!r}, but its weight is not an FP8 tensor")
    names = [n for n in names if n not in scales and not n.endswith("rotary_emb.inv_freq")]
    D = config.num_nextn_predict_layers  # noqa: N806
    mtp_prefixes = tuple(hf_name(f"model.mtp.{k}.enorm.weight", config).removesuffix("enorm.weight") for k in range(D))
    if D and not any(n.startswith(mtp_prefixes) for n in names):
        warnings.warn(
            f"{config_file}: num_nextn_predict_layers={D}, but the checkpoint has no MTP weights "
            f"({mtp_prefixes[0]}*): loading without the multi-token-prediction modules",
            UserWarning,
            stacklevel=3,
        )
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    fused = {n.rpartition(".")[0] for n in names if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))}
    expected = expected_hf_shapes(config, fused)
    optional = mtp_copies(config)
    present = set(names)
    missing = [n for n in expected if n not in present]
    unexpected = [n for n in names if n not in expected and n not in optional]
    if missing or unexpected:
        where = f" (in {ckpt.file_of(unexpected[0]).name})" if unexpected else ""
        raise CheckpointError(_mismatch(ckpt.directory, config_file, missing, unexpected, where))
    for name in names:
        want = expected.get(name) or optional[name]
        got = ckpt.shape(name)
        if got != want:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(got)}, {config_file.name} implies {list(want)}"
            )
        dtype = ckpt.dtype(name)
        if not dtype.startswith(("F", "BF")) and not name.endswith(".tid2eid"):  # floating (V4's hash table: ids)
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {dtype}, not a floating-point type")
        if ckpt.is_fp8(name) and name + SCALE_SUFFIX not in ckpt:
            raise CheckpointError(f"{ckpt.file_of(name)}: FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
    return config


# ---- saving ------------------------------------------------------------------------------------


def save_checkpoint(
    model_or_state: nn.Module | Mapping[str, Tensor], config: DeepSeekConfig | None, path: str | os.PathLike,
    max_shard_size: int | str = "5GB", check_finite: bool = True,
) -> Path:  # fmt: skip
    """Write config.json + safetensors (per-expert layout, V3 MTP layout) to the directory `path`.

    Sharded with `model.safetensors.index.json` when the weights exceed `max_shard_size`. Streams:
    each tensor is taken from the state right before its pieces are written, so a `LazyTensors`
    mapping (e.g. `DistributedCheckpoint`, whose shapes and dtypes come without reading) is saved
    with about its largest tensor in memory. Atomic: everything is written and fsynced in a temporary
    directory next to `path`, which then replaces it; a failure (a mismatch with the config, a
    non-finite weight, a full disk) leaves the previous checkpoint untouched.
    """
    if isinstance(model_or_state, nn.Module):
        config = config or getattr(model_or_state, "config", None)
        state: Mapping[str, Tensor] = model_or_state.state_dict()
    else:
        state = model_or_state
    if not isinstance(config, DeepSeekConfig):
        raise ValueError("save_checkpoint needs a DeepSeekConfig (pass config, or a model with a .config)")
    limit = parse_size(max_shard_size)
    hf_config = config_to_hf(config)
    expected = expected_shapes(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected and n not in tied]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the config: missing {_listing(missing) or 'none'}, "
            f"unexpected {_listing(unexpected) or 'none'}"
        )

    def layout(name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if isinstance(state, LazyTensors):
            return state.dtype(name), tuple(state.shape(name))
        return state[name].dtype, tuple(state[name].shape)

    dtypes = {}
    for name, shape in expected.items():
        dtypes[name], got = layout(name)
        if got != shape:
            raise ValueError(f"tensor {name!r} has shape {list(got)}, the config implies {list(shape)}")

    def piece(name: str, split: Callable[[Tensor], Tensor]) -> Tensor:
        """`split` of the tensor `name`, read only now; checked piece by piece (a mask of a piece, not of a
        whole fused expert tensor)."""
        t = split(state[name])
        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} contains NaN or inf: refusing to save it")
        return t

    def items() -> Iterator[tuple[str, PendingTensor]]:
        for name, shape in expected.items():
            for hf, (piece_shape, split) in hf_items(name, (shape, _whole), config, _split_pending):
                yield hf, PendingTensor(dtypes[name], piece_shape, lambda name=name, split=split: piece(name, split))
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        for k in range(config.num_nextn_predict_layers if config.model_type != "deepseek_v4" else 0):  # V3's copies
            p = f"model.layers.{config.num_hidden_layers + k}."
            for hf, name in ((p + "embed_tokens.weight", "model.embed_tokens.weight"),
                             (p + "shared_head.head.weight", head)):  # fmt: skip
                yield hf, PendingTensor(dtypes[name], expected[name], lambda name=name: piece(name, _whole))

    floating = {n: math.prod(expected[n]) for n in expected if dtypes[n].is_floating_point}
    weights_dtype = max(
        {dtypes[n] for n in floating}, key=lambda dt: sum(v for n, v in floating.items() if dtypes[n] == dt)
    )
    hf_config["torch_dtype"] = hf_config["dtype"] = str(weights_dtype).removeprefix("torch.")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory")
    with atomic_directory(target, replaces=_checkpoint_files) as tmp:
        write_shards(items(), tmp, limit)
        write_json(tmp / CONFIG_NAME, hf_config)
    return target


def _whole(t: Tensor) -> Tensor:
    return t


def _split_pending(
    value: tuple[tuple[int, ...], Callable[[Tensor], Tensor]], j: int, proj: str
) -> tuple[tuple[int, ...], Callable[[Tensor], Tensor]]:
    """For `hf_items` on (shape, _whole) of a fused expert tensor [N, 2I, H] or [N, H, I]: (shape of expert
    j's `proj` piece, the function taking that piece from the tensor)."""
    return split_expert_shape(value[0], j, proj), lambda t: split_expert_tensor(t, j, proj)
