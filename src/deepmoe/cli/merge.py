"""`deepmoe merge`."""

from __future__ import annotations

import argparse

HELP = "Assembly of Experts: merge checkpoints of one architecture tensor by tensor"
DESCRIPTION = (
    "Build W = Σ_k λ_k W_k tensor by tensor from two or more checkpoints of one architecture (the first "
    "is the base), with separate λ for the routed experts (--expert-weights) or any tensor class, keeping "
    "the base tensor where the parents differ from it by less than δ (--threshold); streams tensor by "
    "tensor."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.tools.merge import add_merge_arguments

    add_merge_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.tools.merge import run_merge

    return run_merge(args)
