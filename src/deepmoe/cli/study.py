"""`deepmoe study`: pick the scale, call `deepmoe.tools.study.run_study` with a printer for its progress,
print the tables."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from deepmoe.cli import common
from deepmoe.cli.argtypes import non_negative_int, positive_int
from deepmoe.tools import refusal, study
from deepmoe.tools.study import STUDIES

HELP = "the architecture, balancing or refusal-expert study: train the compared models, print the table"
DESCRIPTION = (
    "architectures: dense, GShard top-2, Switch top-1, fine-grained, DeepSeekMoE, Pyramid- and "
    "Residual-MoE and a dense model of the MoE total, at equal active parameters, plus the DeepSeekMoE "
    "redundancy test; balancing: no balancing, aux losses, sequence-wise loss and aux-loss-free bias; refusal: "
    "fine-tune a tiny model to refuse one category of requests, then disable its refusal experts (and as many "
    "random ones) and measure the refusal rate and the answered categories' loss (docs/refusal_experts.md). "
    "Writes results.json, table.md and plots; rerun the same command to continue an interrupted study."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("study", choices=(*STUDIES, refusal.REFUSAL_STUDY), help="which comparison to run")
    parser.add_argument(
        "--quick", action="store_true", help="a small smoke-test scale (about 2 minutes per study on 2 quiet cores)"
    )
    parser.add_argument("--out", default=None, help="output directory (default runs/study-STUDY[-quick])")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="override the scale's training steps (refusal: fine-tuning)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    parser.add_argument(
        "--counts", type=non_negative_int, nargs="+", default=None, metavar="N",
        help="refusal: numbers of experts to disable (default 0 1 2 4 8)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.study == refusal.REFUSAL_STUDY:
        return run_refusal(args)
    if args.counts is not None:
        raise ValueError(f"--counts applies to the {refusal.REFUSAL_STUDY} study only")
    scale = study.SCALES["quick" if args.quick else "default"]
    if args.steps is not None:
        scale = replace(scale, steps=args.steps, warmup_steps=min(scale.warmup_steps, args.steps // 10))
    out = Path(args.out or f"runs/study-{args.study}{'-quick' if args.quick else ''}")
    try:
        result = study.run_study(args.study, out, scale, seed=args.seed, log=common.console().print)
    except KeyboardInterrupt:
        print(f"deepmoe study: interrupted; run the same command again to continue in {out}", file=sys.stderr)
        return 130
    print(study.markdown_table(result.rows, args.study))
    if result.redundancy:
        print()
        print(study.redundancy_table(result.redundancy))
    print(f"\nwrote {', '.join(os.fspath(f) for f in result.files)}")
    return 0


def run_refusal(args: argparse.Namespace) -> int:
    """`deepmoe study refusal`: `deepmoe.tools.refusal.run_refusal`, then its tables."""
    scale = refusal.SCALES["quick" if args.quick else "default"]
    if args.steps is not None:
        scale = replace(scale, finetune_steps=args.steps)
    out = Path(args.out or f"runs/study-refusal{'-quick' if args.quick else ''}")
    try:
        counts = refusal.DISABLED_COUNTS if args.counts is None else args.counts
        result = refusal.run_refusal(out, scale, seed=args.seed, counts=counts, log=common.console().print)
    except KeyboardInterrupt:
        print(f"deepmoe study: interrupted; run the same command again to continue in {out}", file=sys.stderr)
        return 130
    print(refusal.experts_table(result.report))
    print()
    print(refusal.markdown_table(result.report))
    print(f"\nwrote {', '.join(os.fspath(f) for f in result.files)}")
    return 0
