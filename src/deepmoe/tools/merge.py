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
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from deepmoe.io.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    TOKENIZER_FILES,
    SafetensorsCheckpoint,
    checkpoint_dir,
    checkpoint_output,
    load_config,
    parse_size,
    plan_shards,
    shard_file_name,
)
from deepmoe.io.files import atomic_directory, claim_directory, fsync_path, refuse_overlap, write_json
from deepmoe.io.safetensors_stream import DTYPES, ShardWriter, StoredTensor, read_rows, row_blocks

TENSOR_CLASSES = (
    "routed_experts",
    "shared_experts",
    "router",
    "attention",
    "dense_mlp",
    "embeddings_norms",
    "other",
)
"""Routed experts (mlp.experts.*), shared experts, router (mlp.gate weight and bias), attention
(self_attn.*), dense FFNs, embeddings/head/norms, other (MTP's eh_proj)."""

CHUNK_BYTES = 64 * 2**20
"""Largest row block read from one parent at a time (once converted to float32)."""

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""The safetensors dtypes merge reads and writes."""
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
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")):
        return "router"
    if ".self_attn." in name:
        return "attention"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return "dense_mlp"
    if "embed_tokens" in name or "lm_head" in name or "shared_head.head" in name or name.endswith("norm.weight"):
        return "embeddings_norms"
    return "other"


# ---- checks ----------------------------------------------------------------------------------------


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Name -> where its bytes are, for a checkpoint directory (single file or sharded), in its order."""
    with SafetensorsCheckpoint(directory) as ckpt:
        return ckpt.locations()


def _flat_config(directory: Path) -> dict[str, Any]:
    config = load_config(directory).to_dict()
    moe = config.pop("moe") or {}
    return {**config, **{f"moe.{k}": v for k, v in moe.items()}, "moe": bool(moe)}


def check_parents(parents: Sequence[Path]) -> list[dict[str, StoredTensor]]:
    """The parents' tensors; ValueError naming the first architecture, name, shape or dtype mismatch."""
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
    tensors = [stored_tensors(p) for p in parents]
    base = tensors[0]
    for name, t in base.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{t.path}: tensor {name!r} has dtype {t.dtype}: merge reads F32, F16, BF16 and F64 "
                             "(dequantise FP8 checkpoints first)")  # fmt: skip
    for parent, own in zip(parents[1:], tensors[1:], strict=True):
        for name, t in base.items():
            if name not in own:
                raise ValueError(f"{parent} lacks tensor {name!r} of the base {parents[0]}")
            if own[name].shape != t.shape:
                raise ValueError(
                    f"{own[name].path}: tensor {name!r} has shape {list(own[name].shape)}, the base {list(t.shape)}"
                )
            if own[name].dtype not in FLOAT_DTYPES:
                raise ValueError(f"{own[name].path}: tensor {name!r} has dtype {own[name].dtype}, not a float type")
        extra = [name for name in own if name not in base]
        if extra:
            raise ValueError(f"{parent} has tensor {extra[0]!r}, which the base {parents[0]} lacks")
    return tensors


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

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.classes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "parents": self.parents,
            "weights": self.weights,
            "threshold": self.threshold,
            "out": self.out,
            "classes": {
                c: {"tensors": s.tensors, "bytes": s.bytes, "kept_from_base": s.kept,
                    "mean_difference": s.mean_differences()}
                for c, s in self.classes.items() if s.tensors
            },
        }  # fmt: skip


def _differences(files: list[BinaryIO], ts: list[StoredTensor]) -> list[float]:
    """d_k for k = 1..n−1, the Frobenius norms accumulated over row blocks."""
    base_sq, diff_sq = 0.0, [0.0] * (len(ts) - 1)
    for r0, r1 in row_blocks(ts[0], CHUNK_BYTES):
        base = read_rows(files[0], ts[0], r0, r1).double()
        base_sq += float(base.square().sum())
        for k in range(1, len(ts)):
            diff_sq[k - 1] += float((read_rows(files[k], ts[k], r0, r1).double() - base).square().sum())
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
) -> MergeReport:
    """Merge `parents` (the first is the base) into `out`: W = Σ_k λ_k W_k per tensor, λ from
    `weights` or `class_weights[tensor_class(name)]`, the base's tensor kept where every parent is
    within `threshold` δ of it (see the module docstring). Parents with λ_k = 0 are not read for the
    sum, so λ = (1, 0, ...) gives parent one bit for bit. The child has the base's dtypes.

    `dry_run`: nothing is written; the report has, per class, the tensor count, bytes, the mean
    normalised difference of each parent to the base and how many tensors δ would keep.
    """
    _check_paths(parents)
    paths = [checkpoint_dir(p) for p in parents]
    if not is_number(threshold) or threshold < 0:
        raise ValueError(f"threshold δ={threshold!r} is invalid: must be a finite number >= 0")
    table = resolve_weights(len(paths), weights, class_weights)
    if out is None and not dry_run:
        raise ValueError("give the output directory (--out), or ask for a dry run")
    if not dry_run:
        refuse_overlap(out, paths, "a parent")
    limit = parse_size(max_shard_size)
    tensors = check_parents(paths)
    base = tensors[0]
    names = list(base)
    stats = {c: ClassStats(differences=[[] for _ in paths[1:]]) for c in TENSOR_CLASSES}
    sizes = []
    for name in names:
        t = base[name]
        s = stats[tensor_class(name)]
        s.tensors += 1
        s.bytes += t.end - t.start
        sizes.append((name, t.end - t.start))
    report = MergeReport([str(p) for p in paths], {c: table[c] for c in TENSOR_CLASSES if stats[c].tensors},
                         float(threshold), stats, None if dry_run else str(out))  # fmt: skip
    files = [{path: open(path, "rb") for path in {t.path for t in own.values()}} for own in tensors]  # noqa: SIM115
    try:

        def plan(name: str) -> tuple[list[float], list[int]] | None:
            """(λ, the parent index whose tensor each λ multiplies) or None: keep the base tensor."""
            c = tensor_class(name)
            ts = [own[name] for own in tensors]
            sources = list(range(len(paths)))
            if threshold > 0 or dry_run:
                d = _differences([files[k][ts[k].path] for k in range(len(paths))], ts)
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
                with ShardWriter(tmp / file, [(n, base[n].dtype, base[n].shape) for n in shard]) as writer:
                    for name in shard:
                        _write_tensor(writer, name, plan(name), tensors, files)
                        weight_map[name] = file
                report.files.append(file)
            if len(shards) > 1:
                write_json(tmp / INDEX_NAME, {"metadata": {"total_size": sum(n for _, n in sizes)},
                                              "weight_map": weight_map})  # fmt: skip
            for entry in sorted(paths[0].iterdir()):
                if entry.is_file() and (entry.name == CONFIG_NAME or TOKENIZER_FILES.fullmatch(entry.name)):
                    shutil.copyfile(entry, tmp / entry.name)
                    fsync_path(tmp / entry.name)
            write_json(tmp / MERGE_RECORD, report.to_dict())
        return report
    finally:
        for handles in files:
            for f in handles.values():
                f.close()


def _write_tensor(
    writer: ShardWriter,
    name: str,
    plan: tuple[list[float], list[int]] | None,
    tensors: list[dict[str, StoredTensor]],
    files: list[dict[Path, BinaryIO]],
) -> None:
    """Σ_k λ_k W_k of one tensor (or the base's, plan None) into `writer`, a row block at a time, in
    float32 (float64 where a parent stores float64), cast to the base's dtype."""
    base = tensors[0][name]
    out_dtype = DTYPES[base.dtype]
    work = torch.float64 if any(own[name].dtype == "F64" for own in tensors) else torch.float32
    for r0, r1 in row_blocks(base, CHUNK_BYTES):
        if plan is None:
            writer.write(read_rows(files[0][base.path], base, r0, r1))
            continue
        rows = torch.zeros((r1 - r0, *base.shape[1:]) if base.shape else (), dtype=work)
        first = True
        for lam, source in zip(*plan, strict=True):
            if lam == 0:  # not read: λ = (1, 0) gives parent one bit for bit (no −0 + 0 = +0)
                continue
            t = tensors[source][name]
            term = read_rows(files[source][t.path], t, r0, r1).to(work)
            term = term if lam == 1 else lam * term
            rows = term if first else rows + term
            first = False
        writer.write(rows.to(out_dtype))
