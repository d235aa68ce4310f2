"""`deepmoe data`: training data tools. `deepmoe data prepare` tokenizes text, JSON Lines, parquet or chat
conversations once into a prepared-dataset directory (`deepmoe.data.prepare.prepare_dataset`) and prints
a summary."""

from __future__ import annotations

import argparse

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from deepmoe.cli import common
from deepmoe.data.prepare import DEFAULT_HELDOUT_FRACTION, DEFAULT_SHARD_TOKENS, prepare_dataset
from deepmoe.data.readers import INPUT_FORMATS

HELP = "training data: prepare (tokenize a corpus once into shards that training reads)"
DESCRIPTION = "Training data tools. `deepmoe data prepare INPUT... --out DIR`: see `deepmoe data prepare --help`."

PREPARE_DESCRIPTION = (
    "Tokenize INPUT (files or folders, read recursively in sorted order) into DIR: flat token shards "
    "(train-NNNNN.bin/.idx, heldout-NNNNN.bin/.idx, .mask with --chat), index.json, token_counts.npy and a copy "
    "of the tokenizer (docs/design.md#t2-data). Streams the input; an interrupted run given the same arguments "
    "keeps the shards it completed (in .DIR.partial beside DIR) and goes on after them. txt: a document is a "
    "paragraph (ends at a blank line or the end of the file; cut at about 1 MB); jsonl: one JSON object per line "
    "with the text in --field; parquet: the column --field. Every document is followed by the end-of-text token. "
    '--chat: JSON Lines of {"messages": [{"role": system|user|assistant, "content": ...}]}, rendered with '
    "the chat_template of the tokenizer folder's tokenizer_config.json, else the default template "
    "'<|role|>\\n' + content, a newline after a system or user turn and the end-of-text token right after an "
    "assistant turn (<|user|>\\nHi\\n<|assistant|>\\nHello<|endoftext|>); the loss mask is 1 on the assistant "
    "contents and the end-of-turn token after them."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `data` subcommands: `prepare`."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prepare = sub.add_parser("prepare", help="tokenize a corpus into shards", description=PREPARE_DESCRIPTION)
    add = prepare.add_argument
    add("inputs", nargs="+", metavar="INPUT", help="text, JSON Lines or parquet files, or folders of them")
    add("--out", required=True, metavar="DIR", help="the prepared dataset directory (replaces an earlier one)")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="PATH", help=common.TOKENIZER_HELP)
    source.add_argument("--vocab-size", type=int, metavar="N", help="train a new byte-level BPE of N tokens on INPUT")
    add("--format", choices=INPUT_FORMATS, default="auto", help="input format (default: by file extension)")
    add("--field", default="text", metavar="NAME", help="JSON / parquet field holding the text (default text)")
    add("--chat", action="store_true", help="JSON Lines of conversations, with an assistant-only loss mask")
    add("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    add("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
        help=f"close a shard when it holds N tokens (default {DEFAULT_SHARD_TOKENS:_})")  # fmt: skip
    add("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION, metavar="F",
        help="hold out every round(1/F)-th document (default 0.005; 0: none)")  # fmt: skip
    add("--on-error", choices=("fail", "skip"), default="fail",
        help="bad input (malformed JSON, missing or empty text, bad conversation): fail naming file and line "
             "(default), or skip and count it")  # fmt: skip
    add("--no-progress", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    with Progress(
        SpinnerColumn(), TextColumn("[bold]prepare[/bold] {task.fields[docs]} documents, {task.fields[tokens]} tokens"),
        TimeElapsedColumn(), console=common.error_console(), disable=args.no_progress, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("prepare", total=None, docs="0", tokens="0")
        report = prepare_dataset(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            input_format=args.format,
            text_field=args.field,
            chat=args.chat,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            heldout_fraction=args.heldout_fraction,
            on_error=args.on_error,
            progress=lambda docs, tokens: bar.update(task, docs=f"{docs:,}", tokens=f"{tokens:,}"),
        )
    out = common.console()
    for name, split in report.splits.items():
        shards = len(split["shards"])
        out.print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {shards} shards")
    for source in report.sources:
        if source.skipped:
            out.print(f"skipped {source.skipped:,} bad documents of {source.path} (--on-error skip)")
    resumed = f", {report.resumed_shards} shards kept from an interrupted run" if report.resumed_shards else ""
    out.print(
        f"prepared {report.out}: tokenized {report.tokenized_tokens:,} tokens in {report.seconds:.1f} s "
        f"({report.tokens_per_second:,.0f} tokens/s){resumed}",
        soft_wrap=True,
    )
    return 0
