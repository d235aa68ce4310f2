"""`deepmoe upcycle`."""

from __future__ import annotations

import argparse

HELP = "turn a dense checkpoint into a fine-grained MoE with the same function"
DESCRIPTION = (
    "Split each dense FFN of a deepmoe or Llama-style checkpoint into M experts of width I/M (K of them "
    "shared), with a router and gates that make the MoE model compute the dense one at step 0 (top-k = "
    "all routed experts); a smaller --top-k gives a sparse model to train further."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.tools.upcycle import add_upcycle_arguments

    add_upcycle_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.tools.upcycle import run_upcycle

    return run_upcycle(args)
