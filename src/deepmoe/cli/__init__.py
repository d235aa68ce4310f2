"""The `deepmoe` command: one module per subcommand, each thin (parse, call one library function,
render the result). A command module defines HELP, DESCRIPTION, `add_arguments(parser)` and
`run(args) -> int` (the exit status); `COMMANDS` is the table, in the order `deepmoe --help` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deepmoe.cli.common import error_line, show_library_messages
from deepmoe.runtime import keep_freed_memory

COMMANDS = {  # name on the command line: module in deepmoe.cli
    "demo": "demo",
    "balance-demo": "balance_demo",
    "train": "train",
    "data": "data",
    "export": "export",
    "convert": "convert",
    "analyze": "analyze",
    "esft": "esft",
    "steer": "steer",
    "merge": "merge",
    "merge-adapter": "merge_adapter",
    "upcycle": "upcycle",
    "prune": "prune",
    "study": "study",
    "inspect": "inspect",
    "generate": "generate",
    "grpo": "grpo",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmoe", description="DeepSeek-style Mixture-of-Experts toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"deepmoe.cli.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    show_library_messages()
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        print(f"deepmoe {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 1
    finally:
        logging.captureWarnings(False)  # `show_library_messages` routed them to logging for this command only
