"""`deepmoe analyze`: parse, `deepmoe.tools.analyze.analyze_checkpoint`, `write_analysis`, print the tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from deepmoe.cli import common
from deepmoe.cli.argtypes import add_mmap_argument, positive_int
from deepmoe.tools.analyze import analyze_checkpoint
from deepmoe.tools.analyze_files import write_analysis

HELP = "routing analysis: load, entropy, domain specialisation, co-activation, vocabulary"
DESCRIPTION = (
    "Run a checkpoint over text sources (files, folders or bundled:english / bundled:code) and report per "
    "layer load, MaxVio, entropy, dead/dominant experts, the JS divergence between the sources, "
    "source-specific experts, co-activation and each expert's preferred vocabulary (JSON, CSV, PNG)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe analyze MODEL --data A [--data B ...]`."""
    parser.add_argument(
        "model", metavar="MODEL", help="checkpoint directory (config.json, safetensors, tokenizer.json)"
    )
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SOURCE",
        help="text file or folder, or bundled:english / bundled:code (held-out part of the bundled corpus); "
        "repeat for each source to compare",
    )
    parser.add_argument("--out", default="runs/analyze", help="output directory (default runs/analyze)")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=40_000, help="tokens per source at most (default 40000)"
    )
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="entries in each top list (default 5)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, ...")
    add_mmap_argument(parser)
    parser.add_argument("--tokenizer", metavar="PATH", help=common.TOKENIZER_HELP)


def summary_table(report: dict[str, Any]) -> Table:
    """One row per MoE layer (marked "(hash)" when hash-routed; MaxVio, CV, normalised entropy, dead, dominant,
    collapse and, with several sources, the largest JS divergence)."""
    names = list(report["sources"])
    table = Table(
        title="routing per layer: " + ", ".join(f"{n} ({report['sources'][n]['tokens']:,} tok)" for n in names)
    )
    for column in ("layer", "MaxVio", "CV", "H/ln N", "dead", "dominant", "collapse"):
        table.add_column(column, justify="right")
    if len(names) > 1:
        table.add_column("top JS (bits)", justify="right")
    for idx, layer in report["layers"].items():
        row = [
            idx + (" (hash)" if layer["routing"] == "hash" else ""),
            f"{layer['maxvio']:.3f}",
            f"{layer['cv']:.3f}",
            f"{layer['normalized_entropy']:.3f}",
            str(len(layer["dead_experts"])),
            " ".join(map(str, layer["dominant_experts"])) or "-",
            "[red]yes[/red]" if layer["collapse"]["warning"] else "no",
        ]
        if len(names) > 1:
            best = layer["max_js"]
            row.append(f"{best['js']:.4f}" + (f" ({' vs '.join(best['sources'])})" if len(names) > 2 else ""))
        table.add_row(*row)
    return table


def specific_table(report: dict[str, Any], top: int = 3) -> Table:
    """Each layer's most source-specific experts and their share in every source."""
    names = list(report["sources"])
    table = Table(title="most specific experts: expert (share in " + " / ".join(names) + ")")
    table.add_column("layer", justify="right")
    table.add_column("source")
    table.add_column("experts")
    for idx, layer in report["layers"].items():
        for name, experts in layer["specific_experts"].items():
            listed = ", ".join(
                f"{e['expert']} ({' / '.join(f'{v:.1%}' for v in e['shares'].values())})" for e in experts[:top]
            )
            table.add_row(idx, name, listed or "-")
    return table


def run(args: argparse.Namespace) -> int:
    """0 on success, 1 (and one error line) when the model or a source is unusable."""
    try:
        report = analyze_checkpoint(
            args.model,
            args.data,
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            top_k=args.top_k,
            device=args.device,
            tokenizer=args.tokenizer,
            mmap=args.mmap,
        )
        written = write_analysis(report, args.out)
    except (ValueError, OSError) as error:
        print(f"deepmoe analyze: error: {common.error_line(error)}", file=sys.stderr)
        return 1
    console = common.console()
    console.print(summary_table(report))
    if len(report["sources"]) > 1:
        console.print(specific_table(report))
    out = Path(args.out)
    console.print(f"report: {out / 'report.json'}; tables: {', '.join(p.name for p in written if p.suffix == '.csv')}")
    console.print(f"plots: {', '.join(p.name for p in written if p.suffix == '.png')} in {out}")
    return 0
