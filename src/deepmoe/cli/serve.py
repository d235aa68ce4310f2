"""`deepmoe serve`: an OpenAI-compatible HTTP server with continuous batching and a routing viewer."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from deepmoe.cli.argtypes import positive_int
from deepmoe.cli.common import TOKENIZER_HELP
from deepmoe.data import load_tokenizer
from deepmoe.model import from_pretrained
from deepmoe.tools.serve import Engine, chat_renderer, create_app

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API"
DESCRIPTION = (
    "Serve a checkpoint (or a run directory: its newest step) with /v1/completions and /v1/chat/completions "
    "(OpenAI's API, streaming included), decoding concurrent requests together (continuous batching), with "
    "per-request expert steering and a routing viewer at /."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="CKPT", help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000)
    parser.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together (default 8)")
    parser.add_argument(
        "--max-context", type=positive_int, default=None, help="prompt + max_tokens limit (default: the model's)"
    )
    parser.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting before 503 (default 64)")
    parser.add_argument("--model-name", default=None, help="the name /v1/models lists (default: the directory's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    try:
        tokenizer = load_tokenizer(args.model, needed_for="text prompts", tokenizer=args.tokenizer)
    except ValueError as error:
        logging.getLogger("deepmoe").warning("%s: serving token-id prompts only", error)
        tokenizer = None
    if args.max_context is not None and args.max_context > model.config.max_position_embeddings:
        raise ValueError(
            f"--max-context {args.max_context} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )
    engine = Engine(model, max_batch=args.max_batch, max_context=args.max_context, max_queue=args.max_queue)
    chat = chat_renderer(args.model, tokenizer) if tokenizer is not None else None
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer=tokenizer, chat=chat, model_name=name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
