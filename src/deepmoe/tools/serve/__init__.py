"""Serving (docs/design.md#serving): an OpenAI-compatible HTTP API with continuous batching over one KV cache
(`engine.Engine`), per-request expert steering, and a routing viewer page (`app.create_app`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from deepmoe.io.checkpoint import checkpoint_dir
from deepmoe.tools.serve.app import create_app
from deepmoe.tools.serve.engine import Engine, GenerationRequest, QueueFull, Steering

TOKENIZER_CONFIG = "tokenizer_config.json"


def chat_renderer(model_dir: str | os.PathLike, tokenizer):
    """The chat template as the data code renders it: the checkpoint's tokenizer_config.json (its
    chat_template, bos and eos tokens), else the default template with the tokenizer's end-of-text token."""
    from deepmoe.data.readers import ChatRenderer
    from deepmoe.data.tokenizer import EOT_TOKEN

    path = Path(checkpoint_dir(model_dir)) / TOKENIZER_CONFIG
    config = None
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not readable JSON ({error})") from None
    eot = EOT_TOKEN if tokenizer.token_to_id(EOT_TOKEN) is not None else ""
    return ChatRenderer.from_config(config if isinstance(config, dict) else None, eot)


__all__ = ["Engine", "GenerationRequest", "QueueFull", "Steering", "chat_renderer", "create_app"]
