"""`deepmoe balance-demo`: aux-loss-free balancing fixing a skewed router."""

from __future__ import annotations

import argparse

from rich.table import Table

from deepmoe.cli import common
from deepmoe.cli.argtypes import positive_int
from deepmoe.tools.balance_demo import run_balance_demo, tiny_v3_config

HELP = "show aux-loss-free balancing fix a skewed router"
DESCRIPTION = (
    "Route skewed batches through a tiny DeepSeek-V3-style MoE layer, update the selection bias after "
    "each batch and print the load before/after."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=300, help="bias updates (default 300)")
    parser.add_argument("--tokens", type=positive_int, default=16384, help="tokens per batch (default 16384)")
    parser.add_argument("--favoured", type=positive_int, default=4, help="experts the router is skewed towards")
    parser.add_argument("--gamma", type=float, default=0.001, help="bias update speed γ (default 0.001)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:

    config = tiny_v3_config(bias_update_speed=args.gamma)
    console = common.console()
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
