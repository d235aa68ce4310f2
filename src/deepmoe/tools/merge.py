"""Assembly of Experts (docs/design.md#s4-assembly-of-experts; Klagges et al. 2025, arXiv:2506.14794, the
DeepSeek R1T/R1T2 "Chimera" models).

A child of n parents of one architecture, tensor by tensor:

    W = Σ_k λ_k W_k          (λ per parent, chosen separately per tensor class)

where the first parent is the base. With a threshold δ > 0, a parent's tensor that barely differs
from the base's is replaced by the base's: d_k = ‖W_k − W_base‖_F / ‖W_base‖_F < δ ⇒ W_k := W_base,
and where every parent is that close the child keeps the base tensor itself (bit for bit). With
two parents that is the paper's rule: merge a tensor only where the parents differ by δ or more.

Streaming (`deepmoe.io.safetensors_stream`): tensors are read from the safetensors files with plain
reads (no memory map, so pages do not stay resident), a row block of at most `CHUNK_BYTES` per parent
at a time, and written straight into the output shards (their headers are known in advance), so the
peak memory is a few row blocks, not a model. The output is a sharded HF checkpoint with the base's config.json and
tokenizer files, written atomically.

FP8 parents (DeepSeek-V3/R1 as published: e4m3 weights with a float32 `<name>_scale_inv` per block of the
config's `quantization_config.weight_block_size`): each row block is dequantised as it is read (row blocks
start on block boundaries), λ and δ work on the dequantised values, and the child is written in `dtype`:
bf16 (the default for FP8 parents) or fp32 without a quantization_config, or fp8: the same tensors as in
the parents requantised a row block at a time (`quantize_fp8`, scale = amax/448 per block) with their
`_scale_inv`, and the parents' quantization_config. Parents must be quantised alike (the same tensors FP8,
one block size, every scale present).

DeepSeek-V4 checkpoints (their names: `ffn.experts`, `attn.*`, `hc_*`, `head.weight`) merge by the same classes.
A hash-routed layer's table `tid2eid` (expert ids, not weights) is not averaged: the parents must hold the same
table, which the child keeps.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from deepmoe.io.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SafetensorsCheckpoint,
    checkpoint_dir,
    checkpoint_output,
    copy_tokenizer_files,
    load_config,
    parse_size,
    plan_shards,
    read_json,
    shard_file_name,
)
from deepmoe.io.distributed import cast_dtype
from deepmoe.io.files import atomic_directory, claim_directory, refuse_overlap, write_json
from deepmoe.io.fp8_blocks import SCALE_SUFFIX, dequantize_fp8, quantize_fp8
from deepmoe.io.safetensors_stream import (
    DTYPES,
    ShardWriter,
    StoredTensor,
    dtype_code,
    itemsize,
    read_rows,
    row_blocks,
)

TENSOR_CLASSES = (
    "routed_experts",
    "shared_experts",
    "router",
    "attention",
    "dense_mlp",
    "embeddings_norms",
    "other",
)
"""Routed experts (mlp.experts.*; V4: ffn.experts.*), shared experts, router (mlp.gate weight and bias; V4:
ffn.gate weight, bias and hash table), attention (self_attn.*; V4: attn.*), dense FFNs, embeddings/head/norms,
other (MTP's eh_proj, V4's hyper-connections hc_*)."""
HASH_TABLE = ".gate.tid2eid"
"""A hash-routed layer's token id -> experts table (integers): kept from the base, the same in every parent."""

CHUNK_BYTES = 64 * 2**20
"""Largest row block read from one parent at a time (once converted to float32)."""

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""The safetensors dtypes merge reads and writes."""
FP8_CODES = ("F8_E4M3", "F8_E5M2")
"""Block-scaled FP8 weights, read dequantised (their `_scale_inv` beside them)."""
OUTPUT_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                 "fp8": None}  # fmt: skip
"""`dtype` of merge_checkpoints: fp8 requantises the tensors the parents store in FP8."""
DEFAULT_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                        "weight_block_size": [128, 128]}  # fmt: skip
MERGE_RECORD = "merge.json"
# settings that only change training, not the function a checkpoint computes: parents may differ in them
_TRAINING_ONLY = {
    "initializer_range", "mtp_loss_weight", "bos_token_id", "eos_token_id", "pad_token_id",
    "moe.bias_update_speed", "moe.capacity_factor", "moe.capacity_scope", "moe.drop_policy", "moe.no_drop_fraction",
    "moe.n_devices", "moe.aux_loss_alpha", "moe.device_aux_loss_alpha", "moe.comm_aux_loss_alpha",
    "moe.seq_aux_loss_alpha", "moe.z_loss_coef", "moe.entropy_loss_coef", "moe.experts_implementation",
    "moe.fp8_experts",
}  # fmt: skip


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def tensor_class(name: str) -> str:
    """The class of a checkpoint tensor (HF names) whose merge weights λ apply to it."""
    if re.search(r"\.(mlp|ffn)\.experts\.", name):
        return "routed_experts"
    if re.search(r"\.(mlp|ffn)\.shared_experts\.", name):
        return "shared_experts"
    if name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias", ".ffn.gate.weight", ".ffn.gate.bias",
                      HASH_TABLE)):  # fmt: skip
        return "router"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return "dense_mlp"
    if "embed_tokens" in name or "lm_head" in name or "shared_head.head" in name or name.endswith("norm.weight"):
        return "embeddings_norms"
    return "embeddings_norms" if name == "head.weight" else "other"


# ---- checks ----------------------------------------------------------------------------------------


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Name -> where its bytes are, for a checkpoint directory (single file or sharded), in its order."""
    with SafetensorsCheckpoint(directory) as ckpt:
        return ckpt.locations()


def _flat_config(directory: Path) -> dict[str, Any]:
    config = load_config(directory).to_dict()
    moe = config.pop("moe") or {}
    return {**config, **{f"moe.{k}": v for k, v in moe.items()}, "moe": bool(moe)}


@dataclass(frozen=True)
class Parents:
    """The parents' tensors, checked alike: `tensors[k]` name -> where (the `_scale_inv` tensors left out),
    `scales[k]` FP8 weight name -> its `_scale_inv`, `block` the FP8 block size (None: no FP8 tensors)."""

    tensors: list[dict[str, StoredTensor]]
    scales: list[dict[str, StoredTensor]]
    block: tuple[int, int] | None

    def is_fp8(self, name: str) -> bool:
        return name in self.scales[0]


def _split_scales(
    path: Path, own: dict[str, StoredTensor]
) -> tuple[dict[str, StoredTensor], dict[str, StoredTensor], tuple[int, int] | None]:
    """(weights, FP8 weight name -> its scale, block size or None) of one parent; ValueError naming the tensor
    of a scale without an FP8 weight, an FP8 weight without a scale, or a scale of the wrong shape."""
    scales = {}
    for name, t in own.items():
        weight = name.removesuffix(SCALE_SUFFIX)
        if weight != name and weight in own:
            if own[weight].dtype not in FP8_CODES:
                raise ValueError(f"{t.path}: has {name!r}, but tensor {weight!r} is {own[weight].dtype}, not FP8")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{t.path}: scale {name!r} has dtype {t.dtype}, not a float type")
            scales[weight] = t
    weights = {
        n: t for n, t in own.items() if not (n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) in scales)
    }
    fp8 = [n for n, t in weights.items() if t.dtype in FP8_CODES]
    if not fp8:
        return weights, scales, None
    quant = read_json(path / CONFIG_NAME, CONFIG_NAME).get("quantization_config") or {}
    raw = quant.get("weight_block_size") or (128, 128)
    if not (isinstance(raw, (list, tuple)) and len(raw) == 2 and all(type(b) is int and b > 0 for b in raw)):
        raise ValueError(
            f"{path / CONFIG_NAME}: quantization_config.weight_block_size={raw!r} is not two positive ints"
        )
    block = (raw[0], raw[1])
    for name in fp8:
        t = weights[name]
        if name not in scales:
            raise ValueError(f"{t.path}: FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
        want = _scale_shape(t.shape, block) if len(t.shape) >= 2 else None
        if want is None or scales[name].shape != want:
            raise ValueError(
                f"{scales[name].path}: scale {name + SCALE_SUFFIX!r} has shape {list(scales[name].shape)}, FP8 tensor "
                f"{name!r} of shape {list(t.shape)} in {block[0]}x{block[1]} blocks (quantization_config) needs "
                f"{list(want) if want else 'a weight of >= 2 dimensions'}"
            )
    return weights, scales, block


def _scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, math.ceil(m / block[0]), math.ceil(n / block[1]))


def check_parents(parents: Sequence[Path]) -> Parents:
    """The parents' tensors; ValueError naming the first architecture, name, shape, dtype or quantisation
    mismatch (FP8 in one parent and not in another, another block size, a missing scale)."""
    if len(parents) < 2:
        raise ValueError(f"merge needs at least two parent checkpoints, got {len(parents)}")
    base_config = _flat_config(parents[0])
    for parent in parents[1:]:
        config = _flat_config(parent)
        for key, value in base_config.items():
            if key not in _TRAINING_ONLY and config.get(key) != value:
                raise ValueError(
                    f"{parent} has another architecture than the base {parents[0]}: "
                    f"{key}={config.get(key)!r}, the base has {value!r}"
                )
    split = [_split_scales(p, stored_tensors(p)) for p in parents]
    tensors, scales, blocks = [s[0] for s in split], [s[1] for s in split], [s[2] for s in split]
    base = tensors[0]
    for name, t in base.items():
        if t.dtype not in FLOAT_DTYPES + FP8_CODES and not name.endswith(HASH_TABLE):
            raise ValueError(f"{t.path}: tensor {name!r} has dtype {t.dtype}: merge reads F32, F16, BF16, F64 and "
                             "block-scaled FP8")  # fmt: skip
    for parent, own, block in zip(parents[1:], tensors[1:], blocks[1:], strict=True):
        for name, t in base.items():
            if name not in own:
                raise ValueError(f"{parent} lacks tensor {name!r} of the base {parents[0]}")
            if own[name].shape != t.shape:
                raise ValueError(
                    f"{own[name].path}: tensor {name!r} has shape {list(own[name].shape)}, the base {list(t.shape)}"
                )
            if name.endswith(HASH_TABLE):
                if own[name].dtype != t.dtype or not torch.equal(_whole(own[name]), _whole(t)):
                    raise ValueError(f"{parent} routes hash-routed tokens by another table {name!r} than the base "
                                     f"{parents[0]}: tables of expert ids cannot be averaged")  # fmt: skip
                continue
            if own[name].dtype not in FLOAT_DTYPES + FP8_CODES:
                raise ValueError(f"{own[name].path}: tensor {name!r} has dtype {own[name].dtype}, not a float type")
            if (own[name].dtype in FP8_CODES) != (t.dtype in FP8_CODES):
                raise ValueError(
                    f"the parents are quantised differently: tensor {name!r} is {own[name].dtype} in {parent} but "
                    f"{t.dtype} in the base {parents[0]} (merge needs the same tensors FP8 in every parent)"
                )
            if t.dtype in FP8_CODES and block != blocks[0]:
                raise ValueError(
                    f"the parents are quantised differently: FP8 tensor {name!r} is in {block[0]}x{block[1]} blocks "
                    f"in {parent} but {blocks[0][0]}x{blocks[0][1]} in the base {parents[0]} "
                    "(quantization_config.weight_block_size)"
                )
        extra = [name for name in own if name not in base]
        if extra:
            raise ValueError(f"{parent} has tensor {extra[0]!r}, which the base {parents[0]} lacks")
    return Parents(tensors, scales, blocks[0])


def _whole(t: StoredTensor) -> torch.Tensor:
    with open(t.path, "rb") as f:
        return read_rows(f, t, 0, t.rows)


def resolve_weights(
    n_parents: int, weights: Sequence[float], class_weights: dict[str, Sequence[float]] | None = None
) -> dict[str, list[float]]:
    """λ per tensor class: `weights` for every class, replaced by `class_weights[c]` where given."""
    table = {c: list(weights) for c in TENSOR_CLASSES}
    for c, values in (class_weights or {}).items():
        if c not in TENSOR_CLASSES:
            raise ValueError(f"unknown tensor class {c!r}: choose one of {', '.join(TENSOR_CLASSES)}")
        table[c] = list(values)
    for c, values in table.items():
        what = "--weights" if c not in (class_weights or {}) else f"the weights of {c}"
        if len(values) != n_parents:
            raise ValueError(f"{what} has {len(values)} value(s) for {n_parents} parents: give one λ per parent")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"{what}: λ={bad[0]!r} is not a finite number")
    return table


# ---- the merge ---------------------------------------------------------------------------------


@dataclass
class ClassStats:
    tensors: int = 0
    bytes: int = 0
    """Output bytes of the class."""
    kept: int = 0
    """Tensors the child takes from the base unchanged, because every parent is within δ of it."""
    differences: list[list[float]] = field(default_factory=list)
    """Per non-base parent, d_k = ‖W_k − W_base‖_F / ‖W_base‖_F of each tensor (measured when δ > 0 or dry run)."""

    def mean_differences(self) -> list[float | None]:
        return [sum(d) / len(d) if d else None for d in self.differences]


@dataclass
class MergeReport:
    parents: list[str]
    weights: dict[str, list[float]]
    threshold: float
    classes: dict[str, ClassStats]
    out: str | None
    files: list[str] = field(default_factory=list)
    dtype: str | None = None
    """The child's dtype option (bf16, fp32, fp8), None: the base's dtypes."""

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.classes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "parents": self.parents,
            "weights": self.weights,
            "threshold": self.threshold,
            "dtype": self.dtype,
            "out": self.out,
            "classes": {
                c: {"tensors": s.tensors, "bytes": s.bytes, "kept_from_base": s.kept,
                    "mean_difference": s.mean_differences()}
                for c, s in self.classes.items() if s.tensors
            },
        }  # fmt: skip


def _row_ranges(parents: Parents, name: str) -> list[tuple[int, int]]:
    """The row blocks of tensor `name` (`row_blocks`), each starting on an FP8 block row where the tensor is
    a 2-d FP8 weight, so its scale rows are whole."""
    t = parents.tensors[0][name]
    ranges = list(row_blocks(t, CHUNK_BYTES))
    if not (parents.is_fp8(name) and len(t.shape) == 2) or len(ranges) == 1:
        return ranges
    bm = parents.block[0]
    step = max(bm, (ranges[0][1] - ranges[0][0]) // bm * bm)
    return [(r0, min(t.rows, r0 + step)) for r0 in range(0, t.rows, step)]


def _read(parents: Parents, files: list[dict[Path, BinaryIO]], k: int, name: str, r0: int, r1: int,
          work: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Rows [r0, r1) of parent k's tensor `name` as `work`, dequantised where it is FP8."""
    t = parents.tensors[k][name]
    rows = read_rows(files[k][t.path], t, r0, r1)
    if t.dtype not in FP8_CODES:
        return rows.to(work)
    scale, block = parents.scales[k][name], parents.block
    s0, s1 = (r0 // block[0], math.ceil(r1 / block[0])) if len(t.shape) == 2 else (r0, r1)
    return dequantize_fp8(rows, read_rows(files[k][scale.path], scale, s0, s1), block, torch.float32).to(work)


def _differences(parents: Parents, files: list[dict[Path, BinaryIO]], name: str) -> list[float]:
    """d_k for k = 1..n−1, the Frobenius norms (of the dequantised values) accumulated over row blocks."""
    n = len(parents.tensors)
    base_sq, diff_sq = 0.0, [0.0] * (n - 1)
    for r0, r1 in _row_ranges(parents, name):
        base = _read(parents, files, 0, name, r0, r1, torch.float64)
        base_sq += float(base.square().sum())
        for k in range(1, n):
            diff_sq[k - 1] += float((_read(parents, files, k, name, r0, r1, torch.float64) - base).square().sum())
    norm = math.sqrt(base_sq)
    return [math.sqrt(d) / norm if norm else (0.0 if d == 0 else math.inf) for d in diff_sq]


def _check_paths(parents: object) -> None:
    """TypeError unless `parents` is a list of checkpoint directories (paths), e.g. not model objects."""
    if isinstance(parents, (str, os.PathLike)) or not isinstance(parents, Sequence):
        raise TypeError(
            f"merge_checkpoints takes a list of checkpoint directories (the first is the base), got "
            f"{type(parents).__name__}: pass e.g. [base_dir, other_dir]"
        )
    for p in parents:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(
                f"merge_checkpoints takes checkpoint directories (paths), got a {type(p).__name__}: write a model "
                f"out first with save_pretrained(model, directory) and pass the directory"
            )


def merge_checkpoints(
    parents: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out: str | os.PathLike | None = None,
    class_weights: dict[str, Sequence[float]] | None = None,
    threshold: float = 0.0,
    max_shard_size: int | str = "5GB",
    dry_run: bool = False,
    dtype: str | None = None,
) -> MergeReport:
    """Merge `parents` (the first is the base) into `out`: W = Σ_k λ_k W_k per tensor, λ from
    `weights` or `class_weights[tensor_class(name)]`, the base's tensor kept where every parent is
    within `threshold` δ of it (see the module docstring). Parents with λ_k = 0 are not read for the
    sum, so λ = (1, 0, ...) gives parent one bit for bit. The child has the base's dtypes, or `dtype`:
    "bf16" or "fp32" (every float tensor but the expert biases, which stay float32; the default "bf16"
    for FP8 parents, whose child then has no quantization_config), or "fp8" (FP8 parents only: the
    tensors they store in FP8 requantised in their block format, the others in the base's dtypes).

    `dry_run`: nothing is written; the report has, per class, the tensor count, bytes, the mean
    normalised difference of each parent to the base and how many tensors δ would keep.
    """
    _check_paths(parents)
    paths = [checkpoint_dir(p) for p in parents]
    if not is_number(threshold) or threshold < 0:
        raise ValueError(f"threshold δ={threshold!r} is invalid: must be a finite number >= 0")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of bf16, fp32, fp8")
    table = resolve_weights(len(paths), weights, class_weights)
    if out is None and not dry_run:
        raise ValueError("give the output directory (--out), or ask for a dry run")
    if not dry_run:
        refuse_overlap(out, paths, "a parent")
    limit = parse_size(max_shard_size)
    checked = check_parents(paths)
    tensors = checked.tensors
    base = tensors[0]
    names = list(base)
    fp8 = [n for n in names if checked.is_fp8(n)]
    if dtype is None and fp8:
        dtype = "bf16"
    quantize = dtype == "fp8"
    if quantize and not fp8:
        raise ValueError("dtype fp8 requantises the tensors the parents store in FP8, and these parents have none: "
                         "choose bf16 or fp32")  # fmt: skip
    if quantize and any(base[n].dtype != "F8_E4M3" for n in fp8):
        name = next(n for n in fp8 if base[n].dtype != "F8_E4M3")
        raise ValueError(f"dtype fp8 writes e4m3, but the parents store tensor {name!r} as {base[name].dtype}")
    cast = None if dtype is None or quantize else OUTPUT_DTYPES[dtype]

    def layout(name: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """The output entries (name, dtype code, shape) of one tensor: itself, and its scale if quantised."""
        t = base[name]
        if quantize and checked.is_fp8(name):
            return [(name, "F8_E4M3", t.shape), (name + SCALE_SUFFIX, "F32", _scale_shape(t.shape, checked.block))]
        if cast is None:
            return [(name, t.dtype, t.shape)]
        return [(name, dtype_code(cast_dtype(name, DTYPES[t.dtype], cast)), t.shape)]

    entries = {name: layout(name) for name in names}
    stats = {c: ClassStats(differences=[[] for _ in paths[1:]]) for c in TENSOR_CLASSES}
    sizes = []
    for name in names:
        nbytes = sum(math.prod(shape) * itemsize(code) for _, code, shape in entries[name])
        s = stats[tensor_class(name)]
        s.tensors += 1
        s.bytes += nbytes
        sizes.append((name, nbytes))
    report = MergeReport([str(p) for p in paths], {c: table[c] for c in TENSOR_CLASSES if stats[c].tensors},
                         float(threshold), stats, None if dry_run else str(out), dtype=dtype)  # fmt: skip
    files = [
        {path: open(path, "rb") for path in {t.path for t in [*tensors[k].values(), *checked.scales[k].values()]}}  # noqa: SIM115
        for k in range(len(paths))
    ]
    try:

        def plan(name: str) -> tuple[list[float], list[int]] | None:
            """(λ, the parent index whose tensor each λ multiplies) or None: keep the base tensor."""
            c = tensor_class(name)
            if name.endswith(HASH_TABLE):  # the same in every parent (check_parents): the base's, bit for bit
                return None
            sources = list(range(len(paths)))
            if threshold > 0 or dry_run:
                d = _differences(checked, files, name)
                for k, value in enumerate(d, start=1):
                    stats[c].differences[k - 1].append(value)
                    if value < threshold:
                        sources[k] = 0
                if threshold > 0 and all(k == 0 for k in sources):
                    stats[c].kept += 1
                    return None
            return table[c], sources

        if dry_run:
            for name in names:
                plan(name)
            return report
        claim = claim_directory(out, f"merged checkpoint ({MERGE_RECORD})", checkpoint_output(MERGE_RECORD))
        with claim as target, atomic_directory(target) as tmp:
            shards = plan_shards(sizes, limit)
            weight_map = {}
            for i, shard in enumerate(shards):
                file = shard_file_name(i, len(shards))
                with ShardWriter(tmp / file, [e for n in shard for e in entries[n]]) as writer:
                    for name in shard:
                        out_dtype = DTYPES[entries[name][0][1]]
                        _write_tensor(writer, name, plan(name), checked, files, out_dtype, quantize)
                        for entry, *_ in entries[name]:
                            weight_map[entry] = file
                report.files.append(file)
            if len(shards) > 1:
                write_json(tmp / INDEX_NAME, {"metadata": {"total_size": sum(n for _, n in sizes)},
                                              "weight_map": weight_map})  # fmt: skip
            copy_tokenizer_files(paths[0], tmp, also=(CONFIG_NAME,))
            if dtype is not None:
                _write_config(tmp / CONFIG_NAME, dtype, checked.block)
            write_json(tmp / MERGE_RECORD, report.to_dict())
        return report
    finally:
        for handles in files:
            for f in handles.values():
                f.close()


def _write_config(path: Path, dtype: str, block: tuple[int, int] | None) -> None:
    """The child's config.json (a copy of the base's) for `dtype`: fp8 keeps the parents'
    quantization_config (DeepSeek's, with their block size, where they had none); bf16 and fp32 drop it and
    name the dtype."""
    raw = read_json(path, CONFIG_NAME)
    if dtype == "fp8":
        if not raw.get("quantization_config"):
            raw["quantization_config"] = {**DEFAULT_QUANTIZATION, "weight_block_size": list(block)}
    else:
        raw.pop("quantization_config", None)
        name = str(OUTPUT_DTYPES[dtype]).removeprefix("torch.")
        for key in [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]:
            raw[key] = name
    write_json(path, raw)


def _write_tensor(
    writer: ShardWriter,
    name: str,
    plan: tuple[list[float], list[int]] | None,
    parents: Parents,
    files: list[dict[Path, BinaryIO]],
    out_dtype: torch.dtype,
    quantize: bool,
) -> None:
    """Σ_k λ_k W_k of one tensor (or the base's, plan None) into `writer`, a row block at a time, in
    float32 (float64 where a parent stores float64) from the dequantised parents, cast to `out_dtype`, or,
    for an FP8 tensor with `quantize`, requantised block row by block row and followed by its scale. A kept
    base tensor stored as it will be written is copied bit for bit (an FP8 one with its scale)."""
    tensors = parents.tensors
    base = tensors[0][name]
    quantize = quantize and parents.is_fp8(name)
    work = torch.float64 if any(own[name].dtype == "F64" for own in tensors) else torch.float32
    copy = plan is None and (quantize or DTYPES[base.dtype] == out_dtype)
    scales = []
    for r0, r1 in _row_ranges(parents, name):
        if copy:
            writer.write(read_rows(files[0][base.path], base, r0, r1))
            continue
        if plan is None:
            rows = _read(parents, files, 0, name, r0, r1, work)
        else:
            rows = torch.zeros((r1 - r0, *base.shape[1:]) if base.shape else (), dtype=work)
            first = True
            for lam, source in zip(*plan, strict=True):
                if lam == 0:  # not read: λ = (1, 0) gives parent one bit for bit (no −0 + 0 = +0)
                    continue
                term = _read(parents, files, source, name, r0, r1, work)
                term = term if lam == 1 else lam * term
                rows = term if first else rows + term
                first = False
        if quantize:
            q, scale = quantize_fp8(rows, parents.block)
            writer.write(q)
            scales.append(scale)
        else:
            writer.write(rows.to(out_dtype))
    if quantize and copy:
        scale = parents.scales[0][name]
        scales.append(read_rows(files[0][scale.path], scale, 0, scale.rows).to(torch.float32))
    for scale in scales:  # a scale is 1/(bm·bn) of its tensor: kept until the tensor is written
        writer.write(scale)
