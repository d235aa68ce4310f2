"""What every command shares: consoles, the library's log messages shown on stderr, and the tokenizer of
a checkpoint."""

from __future__ import annotations

import logging
import os
import re
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


def _one_line_warning(record: logging.LogRecord) -> bool:
    """A captured `warnings` warning ("FILE:LINE: Category: message\n  source line") as its message only."""
    text = record.getMessage()
    match = re.match(r".*?:\d+: \w+: (.*)", text, re.DOTALL)
    record.msg, record.args = (match[1] if match else text).rstrip("\n").split("\n")[0], ()
    return True


def show_library_messages() -> None:
    """Show the library's `logging` messages on stderr: the trainer's at INFO (what a run tells on the way),
    the rest from WARNING; on the processes of an expert-parallel run other than rank 0 only errors. Python
    `warnings` go through logging too (`logging.captureWarnings`): one line "warning: ..." each; only the
    command line (`deepmoe.cli.main`) calls this."""
    logging.captureWarnings(True)
    package = logging.getLogger("deepmoe")
    if any(isinstance(h, RichHandler) for h in package.handlers):
        return
    handler = RichHandler(console=error_console(), show_time=False, show_path=False, show_level=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    captured = logging.getLogger("py.warnings")
    warning_handler = RichHandler(console=error_console(), show_time=False, show_path=False, show_level=False)
    warning_handler.setFormatter(logging.Formatter("warning: %(message)s"))
    warning_handler.addFilter(_one_line_warning)
    captured.addHandler(warning_handler)
    captured.propagate = False
    quiet = os.environ.get("RANK", "0") != "0"
    package.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("deepmoe.train").setLevel(logging.ERROR if quiet else logging.INFO)


def error_line(error: BaseException) -> str:
    """One line for an error: an OSError as "PATH: reason" (not "[Errno 13] Permission denied: 'PATH'")."""
    if isinstance(error, OSError) and error.strerror:
        paths = [p for p in (error.filename, error.filename2) if p is not None]
        return ": ".join([*(str(p) for p in paths), error.strerror])
    return str(error).splitlines()[0] if str(error) else type(error).__name__


TOKENIZER_HELP = "tokenizer.json file or a directory holding one (for a checkpoint saved without it, e.g. by HF)"


def load_tokenizer(model_dir: str, tokenizer: str | None = None):
    """The checkpoint's tokenizer for a --prompt (`deepmoe.data.load_tokenizer`), or the --tokenizer given."""
    return data.load_tokenizer(model_dir, needed_for="--prompt (or give token ids with --ids)", tokenizer=tokenizer)
