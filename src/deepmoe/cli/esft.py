"""`deepmoe esft`: parse, `deepmoe.tools.esft.esft` (with a progress bar), print the summary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from deepmoe.cli import common
from deepmoe.cli.argtypes import positive_int
from deepmoe.io.checkpoint import CheckpointError
from deepmoe.tools.esft import METHODS, esft

HELP = "expert-specialised fine-tuning: train only the experts a task uses, save a small delta"
DESCRIPTION = (
    "Rank experts per layer on task data (average gate score or token selection ratio), keep the smallest "
    "set reaching share p, fine-tune only those expert slices and save them as a delta that "
    "from_pretrained(..., delta=DIR) applies on the base checkpoint."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe esft MODEL --data SRC --out DELTA_DIR ...`."""
    add = parser.add_argument
    add("model", metavar="MODEL", help="base checkpoint directory (config.json, safetensors, tokenizer.json)")
    add(
        "--data",
        required=True,
        metavar="SRC",
        help="task text: a file or folder, or bundled:english / bundled:code (held-out bundled documents)",
    )
    add("--out", required=True, metavar="DELTA_DIR", help="where to write the expert delta")
    add(
        "--method",
        choices=METHODS,
        default="gate",
        help="expert score (default gate): gate = average gate score, each expert's mean gate weight per token, "
        "not normalised, so a layer's scores sum to its mean total gate weight per token (1 with normalised "
        "top-K weights, routed_scaling_factor = 2.5 on V3-style models, 0.26-0.53 in ESFT's V2-Lite scores); "
        "token = token selection ratio, each expert's share of the layer's expert choices (sums to 1)",
    )
    add(
        "--p",
        type=float,
        default=0.2,
        help="per layer, take experts by decreasing score until their summed score reaches P (ESFT's threshold, "
        "on the raw scores, not on shares of the layer's total): a share of the expert choices with --method "
        "token (0 < P <= 1), an amount of gate weight with --method gate (P > 0); a layer whose scores sum to "
        "less than P gets every expert (default 0.2)",
    )
    add("--steps", type=positive_int, default=100, help="fine-tuning steps (default 100)")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default 1e-4)")
    add("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0)")
    add("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = none (default 1.0)")
    add("--batch-size", type=positive_int, default=8, help="sequences per step (default 8)")
    add("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    add(
        "--score-tokens",
        type=int,
        default=32768,
        help="task tokens used to score the experts (default 32768, from the training part)",
    )
    add(
        "--eval-data",
        metavar="SRC",
        default=None,
        help="held-out task text for the loss before/after (default: the last --eval-fraction of --data)",
    )
    add(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="share of the --data tokens held out for evaluation when there is no --eval-data (default 0.2)",
    )
    add("--eval-tokens", type=int, default=65536, help="at most this many evaluation tokens (default 65536)")
    add(
        "--compare-full",
        action="store_true",
        help="also fine-tune every parameter for the same steps and compare (the delta is ESFT's)",
    )
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    add("--seed", type=int, default=0, help="order of the training windows (default 0)")
    add("--tokenizer", metavar="PATH", help=common.TOKENIZER_HELP)
    add(
        "--lora",
        type=positive_int,
        default=None,
        metavar="R",
        help="train rank-R LoRA adapters on the selected experts instead of the experts themselves, and write them "
        "to --out as a PEFT adapter directory (from_pretrained(MODEL, adapter=DIR); deepmoe merge-adapter)",
    )
    add("--lora-alpha", type=float, default=None, metavar="ALPHA", help="LoRA's α (default: R, so α/R = 1)")
    add("--json", action="store_true", help="print the summary as one JSON object")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


class _ProgressBar:
    """`esft`'s progress callback as a transient rich bar on stderr, one per fine-tuning phase."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, phase: str, step: int, steps: int, loss: float | None) -> None:

        if step == 0:
            self.close()
            self.bar = Progress(
                TextColumn(f"[bold]{phase}[/bold]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=Console(stderr=True),
                transient=True,
            )  # fmt: skip
            self.bar.add_task(phase, total=steps, loss="-")
            self.bar.start()
        elif self.bar is not None:
            self.bar.update(self.bar.task_ids[0], completed=step, loss=f"{loss:.4f}")
            if step >= steps:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    """Score, select, fine-tune, evaluate, write the delta, print a summary. 0 on success, 1 on an error
    (one line on stderr), 130 on Ctrl-C (nothing written)."""

    bar = _ProgressBar() if args.progress else None
    try:
        summary = esft(
            args.model, args.data, args.out, method=args.method, p=args.p, steps=args.steps, lr=args.lr,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_size=args.batch_size,
            seq_len=args.seq_len, score_tokens=args.score_tokens, eval_data=args.eval_data,
            eval_fraction=args.eval_fraction, eval_tokens=args.eval_tokens, compare_full=args.compare_full,
            device=args.device, seed=args.seed, progress=bar, tokenizer=args.tokenizer, lora_rank=args.lora,
            lora_alpha=args.lora_alpha,
        )  # fmt: skip
    except (CheckpointError, ValueError, OSError) as err:
        print(f"deepmoe esft: error: {common.error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deepmoe esft: interrupted (no delta written)", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0


def print_summary(s: dict[str, Any]) -> None:
    """The selection per layer, then parameters, delta size and task losses."""
    console = common.console()
    layers = Table(title=f"ESFT expert selection ({s['method']} score, p={s['p']})")
    for column in ("layer", "experts", "selected", "Σ score (vs p)", "layer total", "share"):
        layers.add_column(column, justify="right")
    for layer, experts in s["selection"].items():
        layers.add_row(
            layer,
            str(len(experts)),
            " ".join(map(str, experts)),
            f"{s['selected_score'][layer]:.3f}",
            f"{s['layer_score'][layer]:.3f}",
            f"{s['selected_share'][layer]:.1%}",
        )
    console.print(layers)
    table = Table(title=f"ESFT on {s['model']} → {s['delta']}", show_header=False)
    trainable, total, routed = s["trainable_parameters"], s["total_parameters"], s["routed_expert_parameters"]
    table.add_row(
        "trainable parameters",
        f"{trainable:,} ({trainable / total:.2%} of {total:,}; {trainable / routed:.2%} of the routed experts)",
    )
    size, checkpoint = s["delta_bytes"], s["checkpoint_bytes"]
    table.add_row(
        "adapter size" if s.get("lora_rank") else "delta size",
        f"{size:,} B ({size / max(checkpoint, 1):.2%} of the checkpoint's {checkpoint:,} B)",
    )
    table.add_row("task loss before", f"{s['loss_before']:.4f}")
    table.add_row(f"task loss after ESFT ({s['steps']} steps, lr {s['lr']:g})", f"{s['loss_after_esft']:.4f}")
    if "loss_after_full" in s:
        table.add_row(f"task loss after full fine-tuning ({s['steps']} steps)", f"{s['loss_after_full']:.4f}")
    table.add_row(
        "tokens (train / eval / scoring)", f"{s['train_tokens']:,} / {s['eval_tokens']:,} / {s['score_tokens']:,}"
    )
    console.print(table)
