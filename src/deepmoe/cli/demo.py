"""`deepmoe demo`: the main job on a small built-in default."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deepmoe.cli import common
from deepmoe.cli.argtypes import positive_int
from deepmoe.cli.common import load_tokenizer
from deepmoe.cli.train import ProgressView, report_table
from deepmoe.model import from_pretrained
from deepmoe.model.generate import generate
from deepmoe.train.checkpoint import REPORT_NAME, read_last
from deepmoe.train.trainer import TrainConfig, resume, train

HELP = "train the tiny model on the bundled corpus, report, plot, sample"
DESCRIPTION = (
    "The main job on a small built-in default: train tiny-v3 on the bundled corpus (continuing the run if "
    "OUT already holds one), print the report and generate samples."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)


DEMO_PROMPTS = ("ROMEO:\n", "def fibonacci(n):\n")


def run(args: argparse.Namespace) -> int:
    """Train tiny-v3 on the bundled corpus (or continue that run), then report, plot and sample."""
    out = Path(args.out)
    console = common.console()
    if read_last(out) is None:
        console.print(f"[bold]Training tiny-v3[/bold] ({args.steps} steps) on the bundled corpus → {out}")
        config = TrainConfig(
            preset="tiny-v3",
            steps=args.steps,
            out=str(out),
            bias_update_speed=0.01,
            eval_every=100,
            save_every=100,
            seed=args.seed,
        )
        result = train(config, observer=ProgressView())
    else:
        console.print(f"[bold]Continuing the run in {out}[/bold] up to {args.steps} steps")
        result = resume(out, steps=args.steps, observer=ProgressView())
    if result.interrupted:
        return 130
    console.print(report_table(json.loads((out / REPORT_NAME).read_text()), out))
    console.print(f"plots: {out}/loss.png, {out}/expert_load.png; report: {out}/report.json")

    checkpoint = result.checkpoint
    model = from_pretrained(checkpoint)
    tokenizer = load_tokenizer(str(checkpoint))
    generator = torch.Generator().manual_seed(args.seed)
    for prompt in DEMO_PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        tokens = generate(
            model, ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95, generator=generator
        )
        console.rule(f"sample from {prompt!r}")
        print(tokenizer.decode(tokens[0].tolist()))
    return 0
