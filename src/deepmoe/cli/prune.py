"""`deepmoe prune`: parse, `deepmoe.tools.prune.prune`, print the experts kept per layer."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from deepmoe.cli import common
from deepmoe.cli.argtypes import positive_int
from deepmoe.tools.prune import METHODS, prune

HELP = "remove the least useful routed experts per layer (REAP, frequency or gate score), write a smaller checkpoint"
DESCRIPTION = (
    "Score every routed expert on calibration data (REAP's router-weighted output norm, routing frequency or "
    "mean gate score), keep the best --keep per layer (the same number in every routing group) and write an "
    "ordinary HF-format checkpoint with fewer experts, plus prune_report.json (scores and kept ids per layer)."
)


def keep_value(text: str) -> int | float:
    """--keep: a number of experts (an integer >= 1) or a fraction in (0, 1] (written with a point: 0.5, 1.0)."""
    if text.strip().lstrip("+-").isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"a number of experts must be >= 1, got {text}")
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number of experts or a fraction") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe prune CKPT --keep N|FRACTION --method M --data SRC --out DIR`."""
    add = parser.add_argument
    add("model", metavar="CKPT", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    add(
        "--keep",
        required=True,
        type=keep_value,
        metavar="N|FRACTION",
        help="routed experts kept per layer: a number (e.g. 8; a multiple of n_group with group-limited routing) or "
        "a fraction of them (e.g. 0.5, rounded per group)",
    )
    add(
        "--method",
        choices=METHODS,
        default="reap",
        help="expert score (default reap): reap = mean over the tokens routed to the expert of gate weight × "
        "output norm; frequency = tokens routed to it; gate = its mean gate score over all tokens",
    )
    add(
        "--data",
        required=True,
        metavar="SRC",
        help="calibration text: a file or folder, bundled:english / bundled:code (held-out bundled documents), or "
        "prepared data (its train split)",
    )
    add("--out", required=True, metavar="DIR", help="where to write the pruned checkpoint (a new or empty directory)")
    add("--tokens", type=positive_int, default=32768, help="calibration tokens, at most (default 32768)")
    add("--seq-len", type=positive_int, default=256, help="tokens per calibration sequence (default 256)")
    add("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    add("--tokenizer", metavar="PATH", help=common.TOKENIZER_HELP)
    add("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Prune and print the report; errors (ValueError, OSError) are reported by `deepmoe.cli.main`."""
    report = prune(
        args.model, args.data, args.out, keep=args.keep, method=args.method, tokens=args.tokens,
        seq_len=args.seq_len, batch_size=args.batch_size, device=args.device, tokenizer=args.tokenizer,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    """The kept and removed experts per layer, then the output directory."""
    console = common.console()
    n = report["n_routed_experts"]
    table = Table(title=f"pruned {report['source']} ({report['method']} scores, {n['before']} → {n['after']} experts)")
    for column in ("layer", "kept", "removed experts", "score kept / total"):
        table.add_column(column, justify="right")
    for layer, entry in report["layers"].items():
        scores = entry["scores"]
        total = sum(scores)
        kept = sum(scores[i] for i in entry["kept"])
        share = f"{kept / total:.1%}" if total > 0 else "-"
        table.add_row(layer, f"{len(entry['kept'])}/{entry['experts']}", " ".join(map(str, entry["removed"])), share)
    console.print(table)
    console.print(f"calibration tokens: {report['calibration']['tokens']:,}; written to {report['out']}")
