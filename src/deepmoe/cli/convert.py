"""`deepmoe convert`: call `deepmoe.tools.convert.convert_checkpoint`, print where the checkpoint went."""

from __future__ import annotations

import argparse

from deepmoe.tools.convert import DTYPE_NAMES, LAYOUTS, convert_checkpoint

HELP = "convert a checkpoint between the Hugging Face and DeepSeek inference layouts, and FP8 <-> bf16/fp32"
DESCRIPTION = (
    "Write a checkpoint (a Hugging Face directory, a run directory, or a DeepSeek-layout directory written by this "
    "command) in the Hugging Face layout or in DeepSeek's inference layout (its tensor names, model{rank}-mp{N}"
    ".safetensors shards, a ModelArgs config.json, the HF config kept as hf_config.json, MTP tensors in "
    "mtp.safetensors), optionally dequantising FP8 or quantising to DeepSeek's block FP8; streamed tensor by tensor."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe convert SRC --out DST --to hf|deepseek [--dtype bf16|fp32|fp8] [--model-parallel N]
    [--fp4-experts]`."""
    add = parser.add_argument
    add("source", metavar="SRC", help="a checkpoint directory (HF or DeepSeek layout) or a run directory")
    add("--out", required=True, metavar="DST", help="output directory (new, empty or an earlier conversion)")
    add("--to", required=True, choices=LAYOUTS, help="the output layout")
    add("--dtype", choices=list(DTYPE_NAMES), default=None, help="convert the weights (default: as stored)")
    add("--model-parallel", type=int, default=1, metavar="N", help="rank shards of --to deepseek (default 1)")
    add("--max-shard-size", default="5GB", help="largest output shard of --to hf (default 5GB)")
    fp4 = "--to deepseek: write the routed experts in FP4 (e2m1, a ue8m0 scale per 32 values), as DeepSeek-V4 does"
    add("--fp4-experts", action="store_true", help=fp4)


def run(args: argparse.Namespace) -> int:
    out = convert_checkpoint(
        args.source,
        args.out,
        args.to,
        DTYPE_NAMES.get(args.dtype),
        args.model_parallel,
        args.max_shard_size,
        fp4_experts=args.fp4_experts,
    )
    print(f"converted {args.source} -> {out} ({args.to})")
    return 0
