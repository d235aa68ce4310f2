"""`deepmoe steer`."""

from __future__ import annotations

import argparse

HELP = "find the experts behind behaviour A vs B and write a steering file"
DESCRIPTION = (
    "Score every (layer, expert) by the difference of its activation frequency on A and B (SteerMoE), "
    "write a steering file that disables or forces the top experts of one side, and with --effect measure "
    "how held-out loss on A and B moves."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.tools.steer import add_steer_arguments

    add_steer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.tools.steer import run_steer

    return run_steer(args)
