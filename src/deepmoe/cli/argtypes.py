"""argparse value types shared by every command's options: each gives argparse's one-line usage error
(exit code 2) naming the value."""

from __future__ import annotations

import argparse
import math


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a token id, a count that may be zero)."""
    return _integer(text, 0)


def finite_float(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a temperature: 0 is greedy)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1] (a probability mass such as top-p)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_mmap_argument(parser: argparse.ArgumentParser) -> None:
    """--mmap of the commands that only read a model (`from_pretrained(..., mmap=True)`)."""
    parser.add_argument(
        "--mmap", action="store_true",
        help="keep the weights memory-mapped from the checkpoint's files (CPU, inference only), for a model larger "
        "than free memory: each layer's experts are built when the layer runs",
    )  # fmt: skip
