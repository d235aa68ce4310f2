"""What every command shares: a console for its tables, and the tokenizer of a checkpoint."""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    """Where commands print tables and messages (stdout; errors go to stderr through `deepmoe.cli.main`)."""
    return Console()


def load_tokenizer(model_dir: str):
    """The `tokenizer.json` of a checkpoint (a run directory means its newest step); ValueError if none."""
    from tokenizers import Tokenizer

    from deepmoe.io.checkpoint import checkpoint_dir

    path = checkpoint_dir(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: give token ids with --ids instead of --prompt")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises its own Exception
        raise ValueError(f"{path} is not a readable tokenizer: {str(error).splitlines()[0]}") from error
