"""`deepmoe train`."""

from __future__ import annotations

import argparse

HELP = "train a model on the bundled corpus or your own text"
DESCRIPTION = (
    "Train a DeepSeek-style MoE LM (AdamW, warmup + cosine/WSD, aux losses, bias balancing, MTP) with "
    "atomic, resumable checkpoints."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.train.trainer import add_train_arguments

    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.train.trainer import run_from_args

    return run_from_args(args)
