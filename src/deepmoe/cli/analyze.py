"""`deepmoe analyze`."""

from __future__ import annotations

import argparse

HELP = "routing analysis: load, entropy, domain specialisation, co-activation, vocabulary"
DESCRIPTION = (
    "Run a checkpoint over text sources (files, folders or bundled:english / bundled:code) and report per "
    "layer load, MaxVio, entropy, dead/dominant experts, the JS divergence between the sources, "
    "source-specific experts, co-activation and each expert's preferred vocabulary (JSON, CSV, PNG)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepmoe.tools.analyze import add_analyze_arguments

    add_analyze_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from deepmoe.tools.analyze import run_analyze

    return run_analyze(args)
