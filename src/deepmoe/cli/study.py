"""`deepmoe study`."""

from __future__ import annotations

import argparse

HELP = "the architecture or balancing study: train the compared models, print the table"
DESCRIPTION = (
    "architectures: dense, GShard top-2, Switch top-1, fine-grained, DeepSeekMoE, Pyramid- and "
    "Residual-MoE and a dense model of the MoE total, at equal active parameters, plus the DeepSeekMoE "
    "redundancy test; balancing: no balancing, aux losses, sequence-wise loss and aux-loss-free bias. "
    "Writes results.json, table.md and plots; rerun the same command to continue an interrupted study."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.tools.study import add_study_arguments

    add_study_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.tools.study import run_study_from_args

    return run_study_from_args(args)
