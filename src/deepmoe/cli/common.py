"""What every command shares: a console for its tables, and the tokenizer of a checkpoint."""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    """Where commands print tables and messages (stdout; errors go to stderr through `deepmoe.cli.main`)."""
    return Console()


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer for a --prompt (`deepmoe.data.load_tokenizer`)."""
    from deepmoe.data import load_tokenizer

    return load_tokenizer(model_dir, needed_for="--prompt (or give token ids with --ids)")
