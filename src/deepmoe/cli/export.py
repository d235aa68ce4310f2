"""`deepmoe export`: call `deepmoe.tools.export.export_checkpoint`, print where the checkpoint went."""

from __future__ import annotations

import argparse

import torch

from deepmoe.tools.export import export_checkpoint

HELP = "write a training checkpoint (distributed or not) as an ordinary Hugging Face checkpoint"
DESCRIPTION = (
    "Convert a run's newest step, or a given step directory, into a Hugging Face checkpoint (config.json, "
    "sharded safetensors with one tensor per expert, tokenizer): a multi-process run's distributed (DCP) "
    "step is streamed tensor by tensor, so the memory needed is about the largest tensor."
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe export RUN_OR_STEP --out DIR [--dtype bf16|fp32]`."""
    add = parser.add_argument
    add("source", metavar="RUN_OR_STEP", help="a run directory (its newest complete step) or a checkpoint directory")
    add("--out", required=True, metavar="DIR", help="output checkpoint directory (new, empty or an earlier export)")
    add("--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: as stored)")
    add("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.source, args.out, DTYPES.get(args.dtype), args.max_shard_size)
    print(f"exported {args.source} -> {out}")
    return 0
