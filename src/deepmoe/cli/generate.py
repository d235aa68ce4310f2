"""`deepmoe generate`: text from a checkpoint with the KV cache."""

from __future__ import annotations

import argparse

import torch

from deepmoe.cli.argtypes import add_mmap_argument, non_negative_float, non_negative_int, positive_int, unit_interval
from deepmoe.cli.common import TOKENIZER_HELP, load_tokenizer
from deepmoe.io import load_config
from deepmoe.model import from_pretrained
from deepmoe.model.generate import TextStreamer, generate, generate_speculative
from deepmoe.tools.steering_file import apply_steering

HELP = "generate text from a checkpoint"
DESCRIPTION = (
    "Generate from a Hugging Face-format DeepSeek checkpoint (or a run directory: its newest step) with the KV cache."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="PATH", help="checkpoint directory (config.json + safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint, or --tokenizer)")
    source.add_argument("--ids", type=int, nargs="+", help="prompt token ids")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="0 (default): greedy; > 0: sample at this temperature",
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=None, help="sample among the k likeliest (with --temperature)"
    )
    parser.add_argument(
        "--top-p", type=unit_interval, default=None, help="nucleus sampling, p in (0, 1] (with --temperature)"
    )
    parser.add_argument(
        "--speculative", action="store_true", help="greedy, drafting with the MTP module (no sampling flags)"
    )
    eos = parser.add_mutually_exclusive_group()
    eos.add_argument(
        "--eos",
        type=non_negative_int,
        action="append",
        default=None,
        metavar="ID",
        help="stop at this token id (repeat for several; default: the checkpoint's eos_token_id)",
    )
    eos.add_argument("--no-eos", action="store_true", help="do not stop at the checkpoint's eos_token_id")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_mmap_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steer", metavar="FILE", default=None, help="steering file from `deepmoe steer`")
    parser.add_argument("--delta", metavar="DIR", default=None, help="expert delta from `deepmoe esft`")
    parser.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP)


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that would be ignored: top-k/top-p without sampling, sampling with --speculative."""
    given = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if args.speculative and (args.temperature > 0 or given):
        flags = ([f"--temperature {args.temperature:g}"] if args.temperature > 0 else []) + given
        raise ValueError(f"--speculative decodes greedily: drop {' and '.join(flags)} (or drop --speculative)")
    if given and args.temperature == 0:
        raise ValueError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only when sampling: set --temperature "
            "to a value > 0 (0 decodes greedily)"
        )


def _check_mtp(path: str, model) -> None:
    """--speculative drafts with the MTP module: refuse a model without one, saying whether the config has
    none or the checkpoint lacks the weights of the ones it declares (transformers saves none)."""
    if model.model.mtp:
        return
    declared = load_config(path).num_nextn_predict_layers
    if declared:
        first = model.config.num_hidden_layers
        raise ValueError(
            f"{path}: --speculative needs the MTP weights: config.json declares num_nextn_predict_layers={declared}, "
            f"but the checkpoint holds no model.layers.{first}.* tensors (transformers does not save them)"
        )
    raise ValueError(f"{path}: --speculative needs an MTP module, and the model has none (num_nextn_predict_layers=0)")


def run(args: argparse.Namespace) -> int:
    _check_sampling_flags(args)

    tokenizer = load_tokenizer(args.model, args.tokenizer) if args.prompt is not None else None
    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype), delta=args.delta, mmap=args.mmap).eval()
    if args.steer is not None:
        apply_steering(model, args.steer)
    ids = tokenizer.encode(args.prompt).ids if tokenizer is not None else args.ids
    if not ids:
        raise ValueError("the prompt is empty: give --prompt TEXT or --ids ID [ID ...]")
    input_ids = torch.tensor([ids], dtype=torch.long)
    eos = [] if args.no_eos else args.eos  # None: the checkpoint's eos_token_id

    if tokenizer is not None:  # print whole characters only: one may span several tokens
        streamer = TextStreamer(tokenizer, lambda text: print(text, end="", flush=True))
        stream, finish = streamer, streamer.end
    else:

        def stream(token: torch.Tensor) -> None:
            print(f" {int(token[0])}", end="", flush=True)

        def finish() -> None:
            pass

    if args.speculative:
        _check_mtp(args.model, model)
        _, stats = generate_speculative(model, input_ids, args.max_new_tokens, eos_token_id=eos, streamer=stream)
        finish()
        print(f"\n[MTP drafts accepted: {stats.accepted}/{stats.drafted} = {stats.acceptance_rate:.0%}]")
        return 0
    generate(
        model,
        input_ids,
        args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos,
        generator=torch.Generator().manual_seed(args.seed),
        streamer=stream,
    )
    finish()
    print()
    return 0
