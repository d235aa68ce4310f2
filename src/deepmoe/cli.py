"""The `deepmoe` command: one thin subcommand per job (parse, call, print)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from deepmoe.runtime import keep_freed_memory


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from deepmoe.tools.balance_demo import run_balance_demo, tiny_v3_config

    config = tiny_v3_config(bias_update_speed=args.gamma)
    console = Console()
    console.print(
        f"[bold]Aux-loss-free balancing[/bold] on a tiny DeepSeek-V3-style layer: "
        f"{config.n_routed_experts} routed experts in {config.n_group} groups, top-"
        f"{config.num_experts_per_tok} of the best {config.topk_group} groups, sigmoid gate, "
        f"γ={config.bias_update_speed}; the router is skewed towards experts 0–{args.favoured - 1}."
    )
    run = run_balance_demo(config, steps=args.steps, n_tokens=args.tokens, n_favoured=args.favoured, seed=args.seed)
    table = Table(
        title=f"tokens per expert on a held-out batch of {args.tokens} tokens "
        f"(ideal {args.tokens * config.num_experts_per_tok // config.n_routed_experts})"
    )
    for column in ("expert", "group", "before", "after", "bias b_i"):
        table.add_column(column, justify="right")
    for i in range(config.n_routed_experts):
        table.add_row(
            str(i),
            str(i // config.experts_per_group),
            str(int(run.load_before[i])),
            str(int(run.load_after[i])),
            f"{float(run.bias[i]):+.3f}",
        )
    table.add_section()
    table.add_row("MaxVio", "", f"{run.max_vio_before:.3f}", f"{run.max_vio_after:.3f}", "")
    console.print(table)
    trace = ", ".join(f"{run.max_vio_per_step[s]:.2f}@{s}" for s in range(0, args.steps, max(1, args.steps // 6)))
    console.print(f"MaxVio of the training batches over the {args.steps} bias updates: {trace}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmoe", description="DeepSeek-style Mixture-of-Experts toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="show aux-loss-free balancing fix a skewed router",
        description="Route skewed batches through a tiny DeepSeek-V3-style MoE layer, update "
        "the selection bias after each batch and print the load before/after.",
    )
    demo.add_argument("--steps", type=_positive_int, default=300, help="bias updates (default 300)")
    demo.add_argument("--tokens", type=_positive_int, default=16384, help="tokens per batch (default 16384)")
    demo.add_argument("--favoured", type=_positive_int, default=4, help="experts the router is skewed towards")
    demo.add_argument("--gamma", type=float, default=0.001, help="bias update speed γ (default 0.001)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        print(f"deepmoe {args.command}: error: {error}", file=sys.stderr)
        return 1
