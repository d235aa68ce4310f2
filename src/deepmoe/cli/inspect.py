"""`deepmoe inspect`: a preset's or checkpoint's architecture, parameters and KV-cache size."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from deepmoe.cli import common
from deepmoe.tools.inspect import describe, resolve_config

HELP = "architecture, parameter counts and KV-cache size"
DESCRIPTION = (
    "Print a preset's or checkpoint's architecture, total and active parameters, and KV-cache bytes per "
    "token against MHA and GQA."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="PRESET_OR_PATH")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:

    info = describe(resolve_config(args.model))
    if args.json:
        print(json.dumps(info))
        return 0
    table = Table(title=f"{args.model}", show_header=False)
    cache = info.pop("kv_cache_bytes_per_token_bf16")
    info.pop("kv_cache_bytes_per_token")
    for key, value in info.items():
        if "params" in key:
            value = f"{value / 1e9:.3f} B" if value >= 1e8 else f"{value / 1e6:.2f} M"
        table.add_row(key, str(value))
    table.add_section()
    for kind, size in cache.items():
        table.add_row(f"KV cache bytes/token ({kind}, bf16)", f"{size:,}")
    common.console().print(table)
    return 0
