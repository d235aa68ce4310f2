"""What every command shares: consoles, the library's log messages shown on stderr, and the tokenizer of
a checkpoint."""

from __future__ import annotations

import logging
import os
from functools import cache

from rich.console import Console
from rich.logging import RichHandler

from deepmoe import data


def console() -> Console:
    """Where commands print their results (stdout)."""
    return Console()


@cache
def error_console() -> Console:
    """Where progress and messages go (stderr): one console, so that log lines and a progress bar share it."""
    return Console(stderr=True)


def show_library_messages() -> None:
    """Show the library's `logging` messages on stderr: the trainer's at INFO (what a run tells on the way),
    the rest from WARNING; on the processes of an expert-parallel run other than rank 0 only errors."""
    package = logging.getLogger("deepmoe")
    if any(isinstance(h, RichHandler) for h in package.handlers):
        return
    handler = RichHandler(console=error_console(), show_time=False, show_path=False, show_level=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    quiet = os.environ.get("RANK", "0") != "0"
    package.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("deepmoe.train").setLevel(logging.ERROR if quiet else logging.INFO)


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer for a --prompt (`deepmoe.data.load_tokenizer`)."""
    return data.load_tokenizer(model_dir, needed_for="--prompt (or give token ids with --ids)")
