"""`deepmoe train`: the flags come from `TrainConfig`'s fields (type, default and help declared there);
the run draws a progress bar and prints its report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from deepmoe.cli import common
from deepmoe.cli.argtypes import positive_int
from deepmoe.io.checkpoint import CheckpointError, read_json
from deepmoe.train.checkpoint import REPORT_NAME
from deepmoe.train.config import TrainConfig
from deepmoe.train.trainer import TrainingError, resume, train

HELP = "train a model on the bundled corpus or your own text"
DESCRIPTION = (
    "Train a DeepSeek-style MoE LM (AdamW, warmup + cosine/WSD, aux losses, bias balancing, MTP) with atomic, "
    "resumable checkpoints."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. Every flag defaults to None (= not given), so that a JSON `--config`
    file and the options saved with a run (`--resume`) fill in what the flags leave out."""

    parser.add_argument(
        "--config", metavar="FILE", help="JSON file of options (TrainConfig field names); flags override it"
    )
    parser.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR (its saved options) up to --steps in total"
    )
    types = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata["flag"]
        if flag is None:
            continue
        kind = next(t for t in (bool, int, float, str) if t is types[f.name] or t in typing.get_args(types[f.name]))
        options: dict[str, Any] = dict(f.metadata["details"])
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = positive_int if f.metadata["minimum"] == 1 else kind
        shown = f" (default {f.default})" if f.default is not None and "default" not in f.metadata["help"] else ""
        parser.add_argument(
            flag or "--" + f.name.replace("_", "-"), dest=f.name, default=None, help=f.metadata["help"] + shown,
            **options,
        )  # fmt: skip


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields from a `--config` file, overridden by the flags given."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        options.update(read_json(Path(args.config), "training config"))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            options[f.name] = value
    return options


def flag_names(message: str) -> str:
    """An error message with each `TrainConfig.<field>` (how the library names an option) as its flag: `--lr`
    for `TrainConfig.lr`; a field without a flag (a --config file's only) keeps its name."""

    def flag(match: re.Match) -> str:
        f = next((f for f in dataclasses.fields(TrainConfig) if f.name == match[1]), None)
        if f is None or f.metadata["flag"] is None:
            return match[0]
        return f.metadata["flag"] or "--" + f.name.replace("_", "-")

    return re.sub(r"\bTrainConfig\.(\w+)", flag, message)


def run(args: argparse.Namespace) -> int:
    """0 when the run finished, 130 when Ctrl-C stopped it (after saving), 1 on an error (one line)."""
    view = ProgressView()
    try:
        options = options_from_args(args)
        if getattr(args, "resume", None):
            result = resume(args.resume, observer=view, **options)
        else:
            result = train(TrainConfig.from_dict(options), observer=view)
    except (TrainingError, CheckpointError, ValueError) as err:
        raise ValueError(flag_names(str(err))) from err  # `deepmoe.cli.main` prints it as one line, exit status 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop (checkpoints are atomic)
        common.error_console().print("deepmoe train: interrupted")
        return 130
    finally:
        if dist.is_initialized():  # an expert-parallel run under torchrun
            dist.destroy_process_group()
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank: one line for the whole expert-parallel run
        if result.report is not None and view.started:  # rank 0 (--no-progress hides only the bar)
            common.console().print(report_table(result.report, result.out_dir))
        print(f"trained {result.step} steps: checkpoint {result.checkpoint}, report {result.out_dir / REPORT_NAME}")
    return 0


class ProgressView:
    """A `TrainingObserver` printing the run's banner and held-out losses and drawing a rich progress bar
    (step, LM loss, tokens/s, MaxVio: mean over layers); `--no-progress` hides only the bar."""

    def __init__(self) -> None:
        self.started = False
        """Whether the run started on this process and it prints (torchrun's rank 0, or the only process)."""
        self._progress: Progress | None = None

    def start(self, run) -> None:
        self.started = os.environ.get("RANK", "0") == "0"
        if not self.started:
            return
        console = common.error_console()
        console.print(run.description)
        if not run.show_progress:
            return
        self._progress = Progress(
            TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("lm loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("MaxVio {task.fields[maxvio]}"), TimeRemainingColumn(),
            console=console,
        )  # fmt: skip
        self._task = self._progress.add_task("train", total=run.steps, completed=run.step, loss="-", tps="-",
                                             maxvio="-")  # fmt: skip
        self._progress.start()

    def step(self, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        maxvio = record.get("maxvio") or []
        self._progress.update(
            self._task,
            completed=record["step"],
            loss=f"{record['lm_loss']:.4f}",
            tps=f"{record.get('tokens_per_s', 0.0):,.0f}",
            maxvio=f"{sum(maxvio) / len(maxvio):.3f}" if maxvio else "-",
        )

    def evaluation(self, record: dict[str, Any]) -> None:
        if not self.started:
            return
        console = self._progress.console if self._progress is not None else common.error_console()
        console.print(f"step {record['step']}: held-out loss {record['heldout_loss']:.4f}")

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def report_table(report: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Table:
    """The headline numbers of a run's report.json."""
    table = Table(title=f"training report{f' ({out_dir})' if out_dir else ''}", show_header=False)

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return ", ".join(fmt(v) for v in value)
        return str(value)

    keys = ("steps", "final_train_lm_loss", "heldout_loss", "heldout_perplexity", "heldout_tokens", "unigram_entropy",
            "maxvio", "dead_experts", "dropped_fraction", "tokens_per_second")  # fmt: skip
    for key in keys:
        table.add_row(key, fmt(report.get(key)))
    return table
