"""`deepmoe steer`: parse, `deepmoe.tools.steer.steer`, print the ranking (and the effect tables)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from deepmoe.cli import common
from deepmoe.cli.argtypes import add_mmap_argument, non_negative_int, positive_int
from deepmoe.tools.steer import FULL_LAYER, METHODS, rank_scores, steer
from deepmoe.tools.steering_file import ACTIONS

HELP = "find the experts behind behaviour A vs B and write a steering file"
DESCRIPTION = (
    "Score every (layer, expert) by the difference of its activation frequency on A and B (SteerMoE), "
    "write a steering file that disables or forces the top experts of one side, and with --effect measure "
    "how held-out loss on A and B moves."
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `deepmoe steer MODEL (--a SRC --b SRC | --pairs FILE) --out FILE ...`."""
    parser.add_argument("model", metavar="PATH", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--a", metavar="SRC", help="behaviour A: a text file or folder, or bundled:DOMAIN")
    parser.add_argument("--b", metavar="SRC", help="behaviour B: a text file or folder, or bundled:DOMAIN")
    parser.add_argument("--pairs", metavar="FILE", help='JSONL of {"a": text, "b": text} lines (instead of --a/--b)')
    parser.add_argument("--out", required=True, metavar="FILE", help="steering file to write (JSON)")
    parser.add_argument("--side", choices=["a", "b"], default="a", help="whose top experts to steer (default a)")
    parser.add_argument(
        "--top",
        type=non_negative_int,
        default=8,
        help="top-ranked experts to steer (default 8; with --action force see --full-layer)",
    )
    parser.add_argument(
        "--per-layer", action="store_true", help="--top and --ks count experts per layer (default: over all layers)"
    )
    parser.add_argument(
        "--action", choices=ACTIONS, default="disable", help="never route them, or always (default disable)"
    )
    parser.add_argument(
        "--full-layer",
        choices=FULL_LAYER,
        default="drop",
        help="with --action force, a top expert whose layer already forces num_experts_per_tok experts: drop = "
        "dropped, still counted in --top (SteerMoE; default), next = skipped, the next-ranked expert taken instead",
    )
    parser.add_argument(
        "--method", choices=METHODS, default="frequency", help="score by activation frequency (default) or mean gate"
    )
    parser.add_argument(
        "--effect",
        action="store_true",
        help="score on the first half of each source (of the pairs), and measure the held-out loss on A and B with "
        "0, k, 2k, ... experts of each side switched on the second half",
    )
    parser.add_argument("--ks", type=_int_list, default=None, help="expert counts for --effect, e.g. 0,1,2,4,8")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=32768, help="tokens per source for scoring (default 32768)"
    )
    parser.add_argument("--seq-len", type=positive_int, default=256, help="window length for sources (default 256)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--show", type=non_negative_int, default=16, help="ranked experts to print (default 16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    add_mmap_argument(parser)
    parser.add_argument("--tokenizer", metavar="PATH", help=common.TOKENIZER_HELP)


def run(args: argparse.Namespace) -> int:
    """Score, rank, write the steering file, print the ranking (and the effect tables). A ValueError (exit 1
    through `deepmoe.cli.main`) on unusable inputs; an --out that is not a steering file is refused first."""

    if args.pairs is not None and (args.a is not None or args.b is not None):
        raise ValueError("give either --a and --b, or --pairs, not both")
    if args.pairs is None and (args.a is None or args.b is None):
        raise ValueError("give both --a SRC and --b SRC (files, folders or bundled:DOMAIN), or --pairs FILE")
    console = common.console()
    names = ("A", "B") if args.pairs is not None else (args.a, args.b)
    output = steer(
        args.model, a=args.a, b=args.b, pairs=args.pairs, out=args.out, side=args.side, top=args.top,
        action=args.action, per_layer=args.per_layer, full_layer=args.full_layer, method=args.method,
        effect=args.effect, ks=args.ks, max_tokens=args.max_tokens, seq_len=args.seq_len,
        batch_size=args.batch_size, device=args.device, tokenizer=args.tokenizer, mmap=args.mmap,
        on_plan=lambda plan: console.print(ranking_table(plan, args.show, names)),
    )  # fmt: skip
    for side, rows in output.get("effect", {}).items():
        console.print(effect_table(output, side, rows, names))
    chosen = "; ".join(f"layer {layer}: {experts}" for layer, experts in output["layers"].items()) or "none"
    side = output["side"]
    console.print(f"steering file {args.out}: {args.action} {len(output['selected'])} {side} experts ({chosen})")
    for note in output["notes"]:
        console.print(f"note: {note}")
    return 0


def ranking_table(output: dict[str, Any], show: int, names: tuple[str, str]) -> Table:
    """The `show` top experts of the plan's side: frequencies on A and B, score, and whether it was steered."""
    side, method, action = output["side"], output["method"], output["action"]
    freq = output["frequencies"]
    selected = {(s["layer"], s["expert"]) for s in output["selected"]}
    dropped = {(s["layer"], s["expert"]) for s in output["dropped"]}
    sign = 1 if side == "A" else -1
    scores = [(layer, expert, score) for layer, expert, score in output["scores"]]
    ranking = [s for s in rank_scores(scores, side) if sign * s[2] > 0][:show]
    label = "p" if method == "frequency" else "gate"
    table = Table(title=f"Top {side} experts ({method}: score = {label}_A − {label}_B)")
    for col in ("rank", "layer", "expert", f"{label}_A ({names[0]})", f"{label}_B ({names[1]})", "score", action):
        table.add_column(col, justify="right")
    for rank, (layer, expert, score) in enumerate(ranking, start=1):
        table.add_row(
            str(rank),
            str(layer),
            str(expert),
            f"{freq['a'][layer][expert]:.3f}",
            f"{freq['b'][layer][expert]:.3f}",
            f"{score:+.3f}",
            "✓" if (layer, expert) in selected else "dropped (layer full)" if (layer, expert) in dropped else "",
        )
    return table


def effect_table(output: dict[str, Any], side: str, rows: list[dict[str, Any]], names: tuple[str, str]) -> Table:
    """Held-out loss on A and B with 0, k, 2k, ... of `side`'s top experts switched (`steering_effect` rows)."""
    action = output["action"]
    unit = "per layer" if output["per_layer"] else "in all"
    source = names[0] if side == "A" else names[1]
    table = Table(title=f"Held-out mean token loss (nats) with the top {side} experts ({source}) {action}d")
    layer_names = " ".join(str(layer) for layer in sorted({s[0] for s in output["scores"]}))
    columns = (f"k ({unit})", "experts", f"per layer ({layer_names})", f"loss A ({names[0]})", "Δ A")
    for col in (*columns, f"loss B ({names[1]})", "Δ B"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            str(row["k"]),
            str(row["experts"]),
            " ".join(f"{n}" for n in row["per_layer"].values()),
            f"{row['loss_a']:.4f}",
            f"{row['delta_a']:+.4f}",
            f"{row['loss_b']:.4f}",
            f"{row['delta_b']:+.4f}",
        )
    return table
