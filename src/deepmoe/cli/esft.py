"""`deepmoe esft`."""

from __future__ import annotations

import argparse

HELP = "expert-specialised fine-tuning: train only the experts a task uses, save a small delta"
DESCRIPTION = (
    "Rank experts per layer on task data (average gate score or token selection ratio), keep the smallest "
    "set reaching share p, fine-tune only those expert slices and save them as a delta that "
    "from_pretrained(..., delta=DIR) applies on the base checkpoint."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.tools.esft import add_esft_arguments

    add_esft_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.tools.esft import run_esft

    return run_esft(args)
