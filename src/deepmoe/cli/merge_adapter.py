"""`deepmoe merge-adapter`: `deepmoe.tools.merge_adapter.merge_adapter`, then one line saying what was written."""

from __future__ import annotations

import argparse

from deepmoe.tools.merge_adapter import merge_adapter

HELP = "merge a LoRA adapter into its base checkpoint"
DESCRIPTION = (
    "Fold a LoRA adapter directory (PEFT format, e.g. from `deepmoe train --lora-rank`) into the base checkpoint's "
    "weights, W + (alpha/r)·B·A, and write an ordinary checkpoint that transformers and deepmoe load."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe merge-adapter BASE ADAPTER --out DIR`."""
    add = parser.add_argument
    add("base", metavar="BASE", help="base checkpoint directory (or a run directory: its newest step)")
    add("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    add("--out", required=True, metavar="DIR", help="new checkpoint directory (new, empty, or an earlier merge)")
    add("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")


def run(args: argparse.Namespace) -> int:
    record = merge_adapter(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size)
    print(f"merged {record['tensors']} LoRA factors (rank {record['rank']}, alpha {record['alpha']:g}, "
          f"{', '.join(record['targets'])}) into {record['out']}")  # fmt: skip
    return 0
