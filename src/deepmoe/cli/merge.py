"""`deepmoe merge`: parse the parents and λ, call `deepmoe.tools.merge.merge_checkpoints`, print the
per-class table."""

from __future__ import annotations

import argparse

from rich.table import Table

from deepmoe.cli import common
from deepmoe.tools.merge import TENSOR_CLASSES, merge_checkpoints

HELP = "Assembly of Experts: merge checkpoints of one architecture tensor by tensor"
DESCRIPTION = (
    "Build W = Σ_k λ_k W_k tensor by tensor from two or more checkpoints of one architecture (the first "
    "is the base), with separate λ for the routed experts (--expert-weights) or any tensor class, keeping "
    "the base tensor where the parents differ from it by less than δ (--threshold); streams tensor by "
    "tensor."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe merge PARENT [PARENT ...] --weights W [W ...] --out DIR`."""
    add = parser.add_argument
    add("parents", nargs="+", metavar="PARENT", help="checkpoints of one architecture; the first is the base")
    add("--weights", type=float, nargs="+", required=True, metavar="W", help="λ of each parent (every tensor class)")
    add(
        "--expert-weights",
        type=float,
        nargs="+",
        metavar="W",
        default=None,
        help="λ of each parent for the routed-expert tensors (default: --weights)",
    )
    add(
        "--class-weights",
        nargs="+",
        action="append",
        metavar="CLASS_OR_W",
        default=None,
        help=f"CLASS W [W ...]: λ of each parent for one tensor class ({', '.join(TENSOR_CLASSES)}); repeatable",
    )
    add(
        "--threshold",
        type=float,
        default=0.0,
        metavar="DELTA",
        help="δ: a parent tensor with ‖W_k − W_base‖_F / ‖W_base‖_F < δ counts as the base's (default 0)",
    )
    add(
        "--dtype",
        choices=("bf16", "fp32", "fp8"),
        default=None,
        help="the child's dtype: bf16 or fp32 (FP8 parents dequantised, no quantization_config), or fp8 (the "
        "parents' FP8 tensors requantised in their 128x128-block format, with their quantization_config); "
        "default: bf16 for FP8 parents, else the base's dtypes",
    )
    add("--out", default=None, metavar="DIR", help="output checkpoint directory (required unless --dry-run)")
    add("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    add("--dry-run", action="store_true", help="print what would be merged and how much the parents differ")


def _class_weights(args: argparse.Namespace) -> dict[str, list[float]]:
    table: dict[str, list[float]] = {}
    for group in args.class_weights or []:
        name, *values = group
        try:
            table[name] = [float(v) for v in values]
        except ValueError:
            raise ValueError(f"--class-weights {name}: {values} are not numbers") from None
    if args.expert_weights is not None:
        table["routed_experts"] = args.expert_weights
    return table


def run(args: argparse.Namespace) -> int:

    if args.out is None and not args.dry_run:
        raise ValueError("--out DIR is required (or --dry-run)")
    report = merge_checkpoints(
        args.parents,
        args.weights,
        None if args.dry_run else args.out,
        class_weights=_class_weights(args),
        threshold=args.threshold,
        max_shard_size=args.max_shard_size,
        dry_run=args.dry_run,
        dtype=args.dtype,
    )
    title = "dry run: " if args.dry_run else f"merged into {args.out}: "
    table = Table(
        title=title
        + f"{len(report.parents)} parents, base {report.parents[0]}, δ={report.threshold:g}"
        + (f", {report.dtype}" if report.dtype else ""),
        caption="d_k = ‖W_k − W_base‖_F / ‖W_base‖_F of parent k, measured when δ > 0 or in a dry run",
    )
    table.add_column("class", no_wrap=True)
    for column in ("tensors", "MB", "λ", *[f"mean d_{k}" for k in range(2, len(report.parents) + 1)]):
        table.add_column(column, justify="right")
    table.add_column("kept from base", justify="right")
    for c, s in report.classes.items():
        if not s.tensors:
            continue
        means = ["-" if m is None else f"{m:.4g}" for m in s.mean_differences()]
        lambdas = ", ".join(f"{v:g}" for v in report.weights[c])
        table.add_row(c, str(s.tensors), f"{s.bytes / 1e6:.3g}", lambdas, *means, str(s.kept))
    common.console().print(table)
    return 0
