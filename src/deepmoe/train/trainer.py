"""The trainer (docs/design.md#t1-trainer and #t3-checkpoints): AdamW, warmup + cosine or WSD schedule,
gradient clipping and
accumulation, the aux losses and MTP loss (in the model's loss), the aux-loss-free bias update after
every step, optional bfloat16 autocast, a progress bar, a JSONL log, held-out evaluation, atomic
resumable checkpoints, and an end-of-run report with plots.

Files of a run directory DIR:
  step-N/            HF-format checkpoint + training state (see `deepmoe.train.checkpoint`)
  last               names the newest complete checkpoint
  train_config.json  the run's options (the authoritative copy is in each checkpoint)
  log.jsonl          one line per optimizer step; eval.jsonl: one line per held-out evaluation
  report.json, loss.png, expert_load.png   at the end of the run

Expert parallelism (docs/design.md#d1-expert-parallelism; `expert_parallel` = D > 1, launched by
`torchrun --nproc-per-node D`): the D
ranks shard the routed experts and are data-parallel for everything else. `batch_size` stays the global
batch: every rank draws the same batch and trains on its 1/D of the sequences, so a D-rank run follows the
1-process run of the same options (exactly, when no batch-level quantity — capacity, B1–B3 — is involved:
those are per rank's batch). Gradients of replicated weights are averaged, experts' scaled to the same
global mean; the bias update uses the loads of all ranks; only rank 0 writes files; checkpoints are
gathered into the ordinary full format, so they load and resume with any number of ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from deepmoe import parallel
from deepmoe.argtypes import positive_int
from deepmoe.config import DeepSeekConfig, check, is_int, is_real
from deepmoe.evaluate import Evaluation, evaluate, fp8_error_per_layer
from deepmoe.io.checkpoint import CheckpointError, load_config, read_json
from deepmoe.io.files import atomic_write, claim_directory, visible_entries, write_json
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe.balance import RoutingStats, coefficient_of_variation, max_violation
from deepmoe.presets import PRESETS, count_parameters, get_preset
from deepmoe.train import checkpoint as ckpt

DEFAULT_PRESET, DEFAULT_VOCAB_SIZE = "tiny-v3", 4096
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda")
LOG_NAME, EVAL_LOG_NAME, REPORT_NAME, CONFIG_NAME = "log.jsonl", "eval.jsonl", "report.json", "train_config.json"
RESUME_OVERRIDABLE = frozenset(
    {"steps", "schedule_steps", "lr", "min_lr", "grad_clip", "eval_every", "eval_batches", "save_every",
     "keep_last", "device", "progress", "expert_parallel"}
)  # fmt: skip


class TrainingError(RuntimeError):
    """The run had to stop (non-finite loss or gradient, a failed checkpoint write); the message says why
    and which checkpoint is intact."""


def option(default: Any, help: str, flag: str | None = "", **argparse_options: Any) -> Any:
    """A TrainConfig field that declares its command-line flag once: `help`, `flag` ("" = --field-name,
    None = no flag: a --config file only) and argparse options (type, choices, metavar)."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_options})


@dataclass
class TrainConfig:
    """Options of a training run; validated on construction (ValueError naming the field)."""

    preset: str | None = option(None, "model preset (default tiny-v3; none with --init-from)", choices=tuple(PRESETS))
    data: str | None = option(None, "text file or directory (default: the corpus bundled with deepmoe)")
    vocab_size: int | None = option(
        None, "vocabulary of the tokenizer trained on the corpus (default 4096; the model gets the tokenizer's; "
        "none with --init-from, whose tokenizer.json is used)"
    )  # fmt: skip
    seq_len: int = option(256, "tokens per sequence", type=positive_int)
    batch_size: int = option(16, "sequences per micro-batch over all ranks (each expert-parallel rank trains on "
                                 "its share)", type=positive_int)  # fmt: skip
    grad_accum: int = option(1, "micro-batches per optimizer step", type=positive_int)
    steps: int = option(1000, "optimizer steps in total", type=positive_int)
    lr: float = option(2e-3, "peak learning rate")
    min_lr: float = option(2e-4, "final learning rate")
    warmup_steps: int = option(100, "linear warmup steps")
    schedule: str = option("cosine", "cosine: warmup then cosine decay to min_lr; wsd: warmup, stable, linear "
                                     "decay in the last decay_fraction of the steps", choices=SCHEDULES)  # fmt: skip
    decay_fraction: float = option(0.2, "WSD: fraction of the steps that decay")
    schedule_steps: int | None = option(
        None, "length of the LR schedule (default: steps); resuming with more steps keeps the run's schedule "
        "length (min_lr past its end) unless this is given"
    )  # fmt: skip
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW β1")
    beta2: float = option(0.95, "AdamW β2")
    eps: float = option(1e-8, "AdamW ε")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0: off")
    eval_every: int = option(200, "held-out evaluation every N steps (0: only at the end, on the whole set)")
    eval_batches: int = option(20, "held-out batches per periodic evaluation (0: all; the final one uses all)")
    save_every: int = option(500, "checkpoint every N steps (0: only at the end; also at the end and on Ctrl-C)")
    keep_last: int = option(3, "checkpoints kept (0: all)")
    seed: int = option(0, "seed of the weights and the data order")
    bf16: bool = option(False, "bfloat16 autocast (weights and optimizer state stay float32)")
    device: str = option("auto", "auto: cuda if available", choices=DEVICES)
    out: str = option("runs/deepmoe", "run directory")
    model_overrides: dict[str, Any] | None = option(
        None, "DeepSeekConfig fields over the preset's (HF names); a 'moe' dict updates the MoE fields, 'moe': "
        "null makes every layer dense (in a --config file only)", flag=None
    )  # fmt: skip
    init_from: str | None = option(
        None, "start from this HF-format checkpoint's model and tokenizer.json (e.g. an upcycled model); the model's "
        "shape comes from it", metavar="DIR"
    )  # fmt: skip
    layers: int | None = option(None, "override the preset's number of layers")
    hidden_size: int | None = option(None, "override the preset's hidden size (and its MoE layers')", flag="--hidden")
    bias_update_speed: float | None = option(
        None, "γ of aux-loss-free balancing, b_i += γ·sign(mean load − load_i) (default: the model's)"
    )  # fmt: skip
    fp8_experts: bool = option(
        False, "routed experts' products in fine-grained FP8, simulated on the CPU (the report gets the per-layer "
        "FP8 error of the final model)"
    )  # fmt: skip
    expert_parallel: int = option(
        1, "shard the routed experts over N ranks launched by torchrun --nproc-per-node N (NCCL on GPUs, gloo on "
        "CPUs); batch_size must be divisible by N", type=positive_int, metavar="N"
    )  # fmt: skip
    progress: bool = option(True, "progress bar")

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            check(self, False, name, allowed)

        for name in ("data", "init_from"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                fail(name, "must be a path or None")
        if self.init_from is not None:
            for name in ("preset", "vocab_size", "layers", "hidden_size", "model_overrides"):
                if getattr(self, name) is not None:
                    fail(name, f"cannot be set with init_from={os.fspath(self.init_from)!r}: the model and its "
                         "tokenizer come from that checkpoint")  # fmt: skip
        else:
            self.preset = DEFAULT_PRESET if self.preset is None else self.preset
            self.vocab_size = DEFAULT_VOCAB_SIZE if self.vocab_size is None else self.vocab_size
            if self.preset not in PRESETS:
                fail("preset", f"must be one of {', '.join(PRESETS)}")
        if self.model_overrides is not None and not isinstance(self.model_overrides, dict):
            fail("model_overrides", "must be None or a dict of DeepSeekConfig fields")
        if self.vocab_size is not None and (not is_int(self.vocab_size) or self.vocab_size < 1):
            fail("vocab_size", "must be an integer >= 1")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "expert_parallel"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        if self.batch_size % self.expert_parallel:
            fail("batch_size", f"must be divisible by expert_parallel={self.expert_parallel} (it is the global batch)")
        if self.seq_len < 2:
            fail("seq_len", "must be >= 2 (a sequence predicts its next tokens)")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be an integer >= 0")
        for name in ("schedule_steps", "layers", "hidden_size"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                fail(name, "must be None or an integer >= 1")
        if self.bias_update_speed is not None and (not is_real(self.bias_update_speed) or self.bias_update_speed < 0):
            fail("bias_update_speed", "must be None or a finite number >= 0")
        if not is_real(self.lr) or self.lr <= 0:
            fail("lr", "must be a finite number > 0")
        if not is_real(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"must be in [0, lr={self.lr}]")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {SCHEDULES}")
        if not is_real(self.decay_fraction) or not 0 <= self.decay_fraction <= 1:
            fail("decay_fraction", "must be in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            if not is_real(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            if not is_real(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1)")
        if not is_real(self.eps) or self.eps <= 0:
            fail("eps", "must be a finite number > 0")
        if self.device not in DEVICES:
            fail("device", f"must be one of {DEVICES}")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            fail("out", "must be a directory path")
        for name in ("bf16", "fp8_experts", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(map(repr, unknown))}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(self).items()}


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer update number `step + 1` (`step` = updates done before it).

    Warmup: lr·(step+1)/warmup_steps for step < warmup_steps. Then, with T = schedule_steps or steps,
    cosine: min_lr + (lr − min_lr)·½(1 + cos(π·p)), p = (step − warmup)/(T − 1 − warmup) clamped to [0, 1];
    wsd: lr until the last round(decay_fraction·T) updates, which decay linearly to min_lr (reached at
    the last update).
    """
    peak, floor, warm = config.lr, config.min_lr, config.warmup_steps
    total = config.schedule_steps or config.steps
    if step < warm:
        return peak * (step + 1) / warm
    if config.schedule == "cosine":
        p = min(1.0, max(0.0, (step - warm) / max(1, total - 1 - warm)))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    decay_start = max(warm, total - round(config.decay_fraction * total))
    if step < decay_start:
        return peak
    p = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return peak + (floor - peak) * p


def build_model_config(config: TrainConfig, vocab_size: int, eot_id: int | None = None) -> DeepSeekConfig:
    """The preset's config with the tokenizer's vocab_size and the run's model overrides."""
    fields = get_preset(config.preset).to_dict()
    for name, value in (config.model_overrides or {}).items():
        if name == "moe" and isinstance(value, dict) and fields.get("moe"):
            fields["moe"] = {**fields["moe"], **value}
        else:
            fields[name] = value
    fields.update(vocab_size=vocab_size, bos_token_id=None, eos_token_id=eot_id, pad_token_id=None)
    if config.layers is not None:
        fields["num_hidden_layers"] = config.layers
        fields["first_k_dense_replace"] = min(fields["first_k_dense_replace"], config.layers)
        per_layer = fields.get("moe_experts_per_layer")
        if per_layer is not None and config.layers > len(per_layer):
            raise ValueError(
                f"TrainConfig.layers={config.layers} is invalid: moe_experts_per_layer gives {len(per_layer)} layers' "
                f"expert counts; set model_overrides.moe_experts_per_layer for {config.layers} layers"
            )
        if per_layer is not None:  # the first layers of a pyramid
            fields["moe_experts_per_layer"] = per_layer[: config.layers]
    if config.hidden_size is not None:
        fields["hidden_size"] = config.hidden_size
        if fields.get("moe"):
            fields["moe"]["hidden_size"] = config.hidden_size
    if config.bias_update_speed is not None and fields.get("moe"):
        fields["moe"]["bias_update_speed"] = config.bias_update_speed
    if fields.get("moe"):
        fields["moe"]["fp8_experts"] = config.fp8_experts
    model_config = DeepSeekConfig.from_dict(fields)
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"TrainConfig.seq_len={config.seq_len} is invalid: preset {config.preset!r} allows at most "
            f"max_position_embeddings={model_config.max_position_embeddings}"
        )
    return model_config


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2), none on norms and other vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr_at(0, config), betas=(config.beta1, config.beta2), eps=config.eps
    )


def merge_routing_stats(stats: list[dict[int, RoutingStats]]) -> dict[int, RoutingStats]:
    """Routing statistics of several micro-batches as one: loads summed, metrics recomputed."""
    merged: dict[int, RoutingStats] = {}
    for idx in sorted({i for s in stats for i in s}):
        parts = [s[idx] for s in stats if idx in s]
        load = torch.stack([p.tokens_per_expert for p in parts]).sum(0)
        kept = torch.stack([p.kept_per_expert for p in parts]).sum(0)
        merged[idx] = RoutingStats(
            tokens_per_expert=load,
            kept_per_expert=kept,
            max_vio=max_violation(load),
            cv=coefficient_of_variation(load),
            entropy=torch.stack([p.entropy.float() for p in parts]).mean(),
            dead_experts=(load == 0).sum(),
            dropped_fraction=1.0 - kept.sum().float() / load.sum().clamp_min(1).float(),
        )
    return merged


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done (in total, over every session of the run)."""
    out_dir: Path
    checkpoint: Path | None
    """The newest complete checkpoint (what `last` names)."""
    interrupted: bool = False
    report: dict[str, Any] | None = None


# ---- public entry points ------------------------------------------------------------------------


def train(config: TrainConfig, corpus: Any = None) -> TrainResult:
    """Train a new run in `config.out` (refused if it already holds one: resume it instead).

    `corpus`: a `TokenizedCorpus`-like object; None: `prepare_corpus(config.data, config.vocab_size)`.
    Ctrl-C stops after the current step and saves; returns with `interrupted=True`.
    """
    out = Path(config.out)
    if (out / ckpt.LAST_NAME).exists():
        raise ValueError(f"{out} already holds a run ({out / ckpt.LAST_NAME}): continue it with --resume {out}")
    for name in ("data", "init_from"):  # saved with the run: --resume may run from another directory
        if getattr(config, name) is not None:
            config = dataclasses.replace(config, **{name: os.path.abspath(getattr(config, name))})
    with _hold_run_directory(out, _is_unstarted_run):
        return _Run(config, _load_corpus(config, corpus)).run()


def resume(out_dir: str | os.PathLike, corpus: Any = None, **overrides: Any) -> TrainResult:
    """Continue the run in `out_dir` from its newest checkpoint until `steps` (an override, else the saved
    value) optimizer steps in total. Only the options in `RESUME_OVERRIDABLE` may change; a run
    interrupted and resumed with the same options ends bitwise equal (on CPU) to an uninterrupted one.
    """
    out = Path(out_dir)
    step_dir = ckpt.read_last(out)
    if step_dir is None:
        raise ValueError(f"{out}: no complete checkpoint to resume from ({out / ckpt.LAST_NAME} not found)")
    with _hold_run_directory(out, lambda _: True):
        return _resume(out, step_dir, corpus, overrides)


def _resume(out: Path, step_dir: Path, corpus: Any, overrides: dict[str, Any]) -> TrainResult:
    state, tensors = ckpt.read_training_state(step_dir)
    saved = dict(state["train_config"])
    if saved.get("init_from") is not None:  # runs saved before init_from refused them: the values were unused
        saved.update(preset=None, vocab_size=None)
    if overrides.get("steps", saved["steps"]) != saved["steps"] and "schedule_steps" not in overrides:
        overrides = {**overrides, "schedule_steps": saved.get("schedule_steps") or saved["steps"]}
    changed = sorted(k for k, v in overrides.items() if k not in RESUME_OVERRIDABLE and saved.get(k) != v)
    changed = [k for k in changed if not (k == "out" and Path(overrides[k]).resolve() == out.resolve())]
    if changed:
        raise ValueError(
            f"cannot change {', '.join(changed)} when resuming (the run in {out} was started with "
            + ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
            + ")"
        )
    config = TrainConfig.from_dict({**saved, **overrides, "out": os.fspath(out)})
    if state["step"] > config.steps:
        raise ValueError(f"the run in {out} is already at step {state['step']}, past --steps {config.steps}")
    corpus = _load_corpus(config, corpus, step_dir)
    if getattr(corpus, "corpus_id", None) != state.get("corpus_id"):
        raise ValueError(
            f"the corpus differs from the one the run in {out} was trained on "
            f"(corpus_id {getattr(corpus, 'corpus_id', None)!r}, expected {state.get('corpus_id')!r})"
        )
    return _Run(config, corpus, resume_from=(step_dir, state, tensors)).run()


def _hold_run_directory(out: Path, replaceable):
    """`claim_directory` of the run directory, on rank 0 of an expert-parallel run (the others write nothing)."""
    if os.environ.get("RANK", "0") != "0":
        return nullcontext(out)
    return claim_directory(out, "deepmoe run directory", replaceable)


def _is_unstarted_run(directory: Path) -> bool:
    """A run that stopped before its first checkpoint: its options and logs only (a new run replaces them)."""
    names = set(visible_entries(directory))
    return CONFIG_NAME in names and names <= {CONFIG_NAME, LOG_NAME, EVAL_LOG_NAME}


def _load_corpus(config: TrainConfig, corpus: Any, step_dir: Path | None = None) -> Any:
    """`corpus`, or the run's corpus tokenized with the tokenizer saved in the resumed checkpoint `step_dir`,
    else `init_from`'s, else one trained on the corpus (deterministic: a resumed run gets the same)."""
    if corpus is not None:
        return corpus
    if step_dir is not None and (step_dir / ckpt.TOKENIZER_NAME).is_file():
        source = step_dir
    elif config.init_from is not None:
        source = Path(config.init_from)
    else:
        return _data().prepare_corpus(config.data, vocab_size=config.vocab_size)
    tokenizer = _data().load_tokenizer(source, needed_for="init_from (the tokenizer its model was trained with)")
    eos = read_json(source / "config.json", "model config").get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return _data().prepare_corpus(config.data, tokenizer=tokenizer, eot_id=eos)


def _data():
    """`deepmoe.data`, looked up when needed (tests may stand in for it)."""
    return importlib.import_module("deepmoe.data")


# ---- the run ------------------------------------------------------------------------------------


def _initial_model(config: TrainConfig, vocab_size: int) -> DeepSeekForCausalLM:
    """The float32 model saved in `config.init_from`, with the run's MoE training options (γ, FP8 experts),
    checked against the tokenizer's vocabulary."""
    model_config = load_config(config.init_from)
    if model_config.moe is not None:
        changes = {"fp8_experts": config.fp8_experts}
        if config.bias_update_speed is not None:
            changes["bias_update_speed"] = config.bias_update_speed
        model_config = dataclasses.replace(model_config, moe=dataclasses.replace(model_config.moe, **changes))
    elif config.bias_update_speed is not None or config.fp8_experts:
        raise ValueError(f"init_from={config.init_from!r} is a dense model: bias_update_speed and fp8_experts "
                         "apply to MoE layers only")  # fmt: skip
    if vocab_size > model_config.vocab_size:
        raise ValueError(
            f"init_from={config.init_from!r} has vocab_size={model_config.vocab_size}, but its tokenizer has "
            f"{vocab_size} tokens"
        )
    model = DeepSeekForCausalLM(model_config)
    ckpt.load_model_weights(model, config.init_from)
    return model


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' is invalid: no CUDA device is available")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StopOnSigint:
    """While active (main thread only), a first Ctrl-C asks the loop to stop after the current step;
    a second one raises KeyboardInterrupt at once."""

    def __init__(self, console):
        self.requested = False
        self.console = console
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("[yellow]Ctrl-C: stopping after this step and saving (Ctrl-C again to stop now)[/yellow]")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _Run:
    def __init__(self, config: TrainConfig, corpus: Any, resume_from: tuple | None = None):
        from rich.console import Console

        self.cfg = config
        self.corpus = corpus
        self.out = Path(config.out)
        self.device = _resolve_device(config.device)
        self.rank, self.world = self._init_expert_parallel()
        self.is_main = self.rank == 0
        self.console = Console(stderr=True, quiet=not self.is_main)
        self.autocast = config.bf16
        if config.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.console.print("[yellow]bfloat16 autocast is not supported on this GPU: training in float32[/yellow]")
            self.autocast = False
        data = _data()
        if resume_from is None:
            _seed_everything(config.seed)
            if config.init_from is None:
                self.model_config = build_model_config(config, corpus.vocab_size, getattr(corpus, "eot_id", None))
                self.model = DeepSeekForCausalLM(self.model_config)
            else:
                self.model = _initial_model(config, corpus.vocab_size)
                self.model_config = self.model.config
            self.step = 0
            self.totals = {"tokens": 0, "train_time_s": 0.0, "routed_slots": {}, "dropped_slots": {}}
        else:
            step_dir, state, tensors = resume_from
            self.model_config = DeepSeekConfig.from_dict(state["model_config"])
            self.model = DeepSeekForCausalLM(self.model_config)
            ckpt.load_model_weights(self.model, step_dir)
            self.step = int(state["step"])
            self.totals = state["totals"]
        if self.world > 1:
            self.model.enable_expert_parallel()
        self.model.to(self.device).train()
        self.optimizer = build_optimizer(self.model, config)
        self.batches = data.PackedBatches(corpus.train, config.batch_size, config.seq_len, config.seed)
        if corpus.heldout.numel() < config.seq_len:
            raise ValueError(
                f"the held-out split has {corpus.heldout.numel()} tokens, fewer than one sequence of "
                f"seq_len={config.seq_len}: use a larger corpus or a smaller --seq-len"
            )
        self.moe_layers = sorted(i for i in self.model.moe_layers() if i < self.model_config.num_hidden_layers)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_staging(self.out)
            write_json(self.out / CONFIG_NAME, config.to_dict())
        if resume_from is None:
            if self.is_main:  # files a run that died before its first checkpoint may have left
                for name in (LOG_NAME, EVAL_LOG_NAME, REPORT_NAME, "loss.png", "expert_load.png"):
                    (self.out / name).unlink(missing_ok=True)
        else:
            if self.world > 1:  # the checkpoint holds every expert's optimizer state: keep this rank's
                tensors = parallel.shard_experts(tensors, self.model, prefix="optimizer.")
            ckpt.load_optimizer_state(self.optimizer, self.model, state["optimizer"], tensors)
            self.batches.load_state_dict(state["data"])
            ckpt.set_rng_state(state["rng"], tensors)
            if self.is_main:
                for name in (LOG_NAME, EVAL_LOG_NAME):
                    _truncate_log(self.out / name, self.step)
        self.last_saved = ckpt.read_last(self.out)
        self._boundary = self._snapshot()
        self._in_update = False
        self._eval_batches: list[Tensor] | None = None

    def _init_expert_parallel(self) -> tuple[int, int]:
        """(rank, D): join torchrun's process group when `expert_parallel` > 1 (its size must be D)."""
        want = self.cfg.expert_parallel
        if want == 1:
            return 0, 1
        rank, world = parallel.init_from_env(self.device.type)
        if world != want:
            raise ValueError(
                f"TrainConfig.expert_parallel={want} is invalid: this run has {world} process(es); "
                f"launch it with torchrun --nproc-per-node {want} -m deepmoe train ..."
            )
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        return rank, world

    def _all_reduce(self, values: list[float], mean: bool = True) -> list[float]:
        """Means (or sums) over the ranks; the values themselves on one process."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world if mean else t).tolist()

    def _local(self, batch: Tensor) -> Tensor:
        """This rank's share of a global batch."""
        share = batch.shape[0] // self.world
        return batch[self.rank * share : (self.rank + 1) * share]

    # -- state ------------------------------------------------------------------------------------
    def _snapshot(self) -> tuple[dict[str, Any], tuple]:
        """Data position and RNG states at the current step boundary."""
        return self.batches.state_dict(), ckpt.rng_state()

    def _autocast(self):
        if not self.autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def save(self, boundary: tuple | None = None) -> Path:
        data_state, rng = boundary or self._snapshot()
        info = {
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "scheduler": {
                "schedule": self.cfg.schedule,
                "step": self.step,
                "last_lr": self.optimizer.param_groups[0]["lr"],
            },
            "data": data_state,
            "corpus_id": getattr(self.corpus, "corpus_id", None),
            "totals": self.totals,
            "torch_version": torch.__version__,
        }
        tokenizer = getattr(self.corpus, "tokenizer", None)
        weights, optimizer = self.model.state_dict(), ckpt.optimizer_state(self.optimizer, self.model)
        if self.world > 1:  # every rank's experts, gathered on rank 0
            weights = parallel.gather_experts(weights, self.model)
            optimizer = optimizer[0], parallel.gather_experts(optimizer[1], self.model, prefix="optimizer.")
        path, error = self.out / ckpt.step_dir_name(self.step), None
        if self.is_main:
            try:
                path = ckpt.save_training_checkpoint(
                    self.out, self.step, weights, self.model_config, optimizer, info, rng, tokenizer
                )
                ckpt.prune_checkpoints(self.out, self.cfg.keep_last)
            except (OSError, ValueError) as err:
                error = str(err)
        if self.world > 1 and self._all_reduce([float(error is not None)])[0]:
            error = error or "it failed on rank 0"
        if error is not None:
            intact = f"{self.last_saved} is intact" if self.last_saved else "no earlier checkpoint exists"
            raise TrainingError(f"writing the checkpoint of step {self.step} failed ({error}); {intact}")
        self.last_saved = path
        return path

    # -- one step ---------------------------------------------------------------------------------
    def _stop_message(self, what: str) -> str:
        if self.last_saved is not None:
            kept = f"the last good checkpoint {self.last_saved} is kept (resume with --resume {self.out})"
        else:
            kept = "no checkpoint had been written yet"
        return f"training stopped at step {self.step + 1}: {what}; nothing was saved after step {self.step}, {kept}"

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self._take_traffic()  # what evaluations sent is not this step's
        sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "mtp_loss": 0.0}
        stats = []
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = next(self.batches)
            tokens += batch.numel()
            batch = self._local(batch).to(self.device, non_blocking=True)
            try:
                with self._autocast():
                    out = self.model(batch, labels=batch)
            except ValueError as err:
                raise TrainingError(self._stop_message(f"the forward pass failed ({err})")) from err
            loss = out.loss.float()
            value = self._all_reduce([loss.item()])[0]
            if not math.isfinite(value):
                raise TrainingError(
                    self._stop_message(f"the loss is {value} (micro-batch {micro + 1} of {cfg.grad_accum})")
                )
            (loss / cfg.grad_accum).backward()
            sums["loss"] += value
            for name in ("lm_loss", "aux_loss", "mtp_loss"):
                part = getattr(out, name)
                sums[name] += float(part.detach()) if part is not None else 0.0
            stats.append(out.routing_stats)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if self.world > 1:
            parallel.sync_gradients(self.model)
            grad_norm = parallel.clip_grad_norm(self.model, max_norm)
            for name, value in zip(("lm_loss", "aux_loss", "mtp_loss"), self._all_reduce(
                [sums["lm_loss"], sums["aux_loss"], sums["mtp_loss"]]), strict=True):  # fmt: skip
                sums[name] = value
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingError(self._stop_message(f"the gradient norm is {grad_norm}"))
        merged = self._global_stats(merge_routing_stats(stats))
        self._in_update = True
        self.optimizer.step()
        self.model.update_expert_bias(merged)
        self.step += 1
        self._boundary = self._snapshot()
        self._in_update = False
        record = {"step": self.step, "lr": lr}
        record.update({k: v / cfg.grad_accum for k, v in sums.items()})
        record["grad_norm"] = grad_norm
        record["tokens"] = tokens
        if self.world > 1:
            record["comm_bytes_per_rank"] = self._all_reduce([float(self._take_traffic())])[0]
        main = [merged[i] for i in self.moe_layers if i in merged]
        record["layers"] = [i for i in self.moe_layers if i in merged]
        record["maxvio"] = [float(s.max_vio) for s in main]
        routed = sum(int(s.tokens_per_expert.sum()) for s in main)
        kept = sum(int(s.kept_per_expert.sum()) for s in main)
        record["dropped_fraction"] = 1.0 - kept / routed if routed else 0.0
        for idx in record["layers"]:
            key = str(idx)
            slots, kept_slots = int(merged[idx].tokens_per_expert.sum()), int(merged[idx].kept_per_expert.sum())
            self.totals["routed_slots"][key] = self.totals["routed_slots"].get(key, 0) + slots
            self.totals["dropped_slots"][key] = self.totals["dropped_slots"].get(key, 0) + slots - kept_slots
        return record

    def _take_traffic(self) -> int:
        """Bytes this rank's MoE layers sent to other ranks since the last call (forward and backward)."""
        layers = [m for m in self.model.moe_layers().values() if m.expert_parallel]
        return sum(m.dispatcher.reset_traffic().total_bytes for m in layers)

    def _global_stats(self, stats: dict[int, RoutingStats]) -> dict[int, RoutingStats]:
        """Routing statistics over every rank's tokens: loads summed, entropy averaged, metrics recomputed."""
        if self.world == 1:
            return stats
        layers = sorted(stats)
        parts = [t for i in layers for t in (stats[i].tokens_per_expert, stats[i].kept_per_expert)]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        loads = flat.split([t.numel() for t in parts])
        entropy = self._all_reduce([float(stats[i].entropy) for i in layers])
        per_layer = {
            i: dataclasses.replace(
                stats[i],
                tokens_per_expert=loads[2 * j],
                kept_per_expert=loads[2 * j + 1],
                entropy=torch.tensor(entropy[j]),
            )
            for j, i in enumerate(layers)
        }
        return merge_routing_stats([per_layer])

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, batches: list[Tensor]) -> Evaluation:
        """`deepmoe.evaluate.evaluate` over every rank: each rank takes its share of a batch; a batch that does
        not split evenly runs whole on every rank and counts once (rank 0's)."""

        def share(batch: Tensor) -> tuple[Tensor, bool]:
            even = batch.shape[0] % self.world == 0
            return (self._local(batch) if even else batch), even or self.is_main

        result = evaluate(self.model, batches, self._autocast, share)
        if self.world > 1:
            total, count = self._all_reduce([result.loss_sum, result.tokens], mean=False)
            result.loss_sum, result.tokens = total, int(count)
            for idx in sorted(result.load):
                reduced = result.load[idx].to(self.device)
                dist.all_reduce(reduced)
                result.load[idx] = reduced.cpu()
        return result

    def periodic_eval(self) -> dict[str, Any]:
        if self._eval_batches is None:
            self._eval_batches = _data().heldout_batches(
                self.corpus.heldout, self.cfg.batch_size, self.cfg.seq_len, max_batches=self.cfg.eval_batches or None
            )
        result = self.evaluate(self._eval_batches)
        record = {"step": self.step, "heldout_loss": result.loss, "heldout_perplexity": result.perplexity}
        record["maxvio"] = [float(max_violation(result.load[i])) for i in self.moe_layers if i in result.load]
        if self.is_main:
            _append_jsonl(self.out / EVAL_LOG_NAME, record)
        return record

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from deepmoe.report import TrainingProgress

        cfg = self.cfg
        stopper = _StopOnSigint(self.console)
        interrupted = False
        bar = TrainingProgress(cfg.steps, self.step, self.console, enabled=cfg.progress and self.is_main)
        if cfg.progress:
            counts = count_parameters(self.model_config)
            params = counts.total + counts.mtp
            ranks = f" x {self.world} ranks (expert parallel)" if self.world > 1 else ""
            schedule = cfg.schedule_steps or cfg.steps
            self.console.print(
                f"{'resuming' if self.step else 'training'} {cfg.preset or cfg.init_from} ({params / 1e6:.2f} M "
                f"parameters, vocab {self.model_config.vocab_size}) on {self.corpus.train.numel():,} tokens, device "
                f"{self.device}{ranks}{', bf16 autocast' if self.autocast else ''}: step {self.step} -> "
                f"{cfg.steps}, run directory {self.out}"
                + (f"; LR schedule of {schedule} steps (min_lr after it)" if schedule != cfg.steps else "")
            )
        log_path = self.out / LOG_NAME if self.is_main else os.devnull
        try:
            with stopper, bar, open(log_path, "a", encoding="utf-8") as log:
                while self.step < cfg.steps:
                    if self.world > 1:  # every rank stops at the same step
                        stopper.requested = bool(self._all_reduce([float(stopper.requested)])[0])
                    if stopper.requested:
                        interrupted = True
                        break
                    start = time.perf_counter()
                    record = self.train_step()
                    elapsed = time.perf_counter() - start
                    record["tokens_per_s"] = record["tokens"] / max(elapsed, 1e-9)
                    self.totals["tokens"] += record["tokens"]
                    self.totals["train_time_s"] += elapsed
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.update(self.step, record)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        ev = self.periodic_eval()
                        bar.print(f"step {self.step}: held-out loss {ev['heldout_loss']:.4f}")
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save()
                if stopper.requested:
                    interrupted = True
        except KeyboardInterrupt:
            interrupted = True
            if self._in_update:
                where = f"{self.last_saved} is intact" if self.last_saved else "no checkpoint exists"
                self.console.print(
                    f"interrupted during the optimizer update of step {self.step + 1}: not saved; {where}"
                )
                return TrainResult(self.step, self.out, self.last_saved, interrupted=True)
        if interrupted:
            path = self.save(self._boundary)
            self.console.print(
                f"interrupted: saved step {self.step} to {path}; continue with deepmoe train --resume {self.out}"
            )
            return TrainResult(self.step, self.out, path, interrupted=True)
        path = self.save()
        try:
            report = self.finish()
        except KeyboardInterrupt:
            self.console.print(f"interrupted while writing the report: step {self.step} is saved in {path}")
            return TrainResult(self.step, self.out, path, interrupted=True)
        return TrainResult(self.step, self.out, path, report=report)

    def finish(self) -> dict[str, Any]:
        """Evaluate on the whole held-out set; write report.json, loss.png, expert_load.png."""
        from deepmoe import report as rep

        data = _data()
        heldout = data.heldout_batches(self.corpus.heldout, self.cfg.batch_size, self.cfg.seq_len)
        result = self.evaluate(heldout)
        if not self.is_main:
            return {}
        _append_jsonl(
            self.out / EVAL_LOG_NAME,
            {
                "step": self.step,
                "heldout_loss": result.loss,
                "heldout_perplexity": result.perplexity,
                "final": True,
            },
        )
        layers = [i for i in self.moe_layers if i in result.load]
        loads = [result.load[i] for i in layers]
        routed = self.totals["routed_slots"]
        dropped = self.totals["dropped_slots"]
        total_routed = sum(routed.get(str(i), 0) for i in layers)
        params = count_parameters(self.model_config)
        entropy = float(data.unigram_entropy(self.corpus.train, self.corpus.vocab_size))
        log = rep.read_jsonl(self.out / LOG_NAME)
        report = {
            "steps": self.step,
            "heldout_loss": result.loss,
            "heldout_perplexity": result.perplexity,
            "heldout_tokens": result.tokens,
            "unigram_entropy": entropy,
            "unigram_perplexity": math.exp(entropy),
            "moe_layers": layers,
            "maxvio": [float(max_violation(x)) for x in loads],
            "cv": [float(coefficient_of_variation(x)) for x in loads],
            "dead_experts": int(sum(int((x == 0).sum()) for x in loads)),
            "dead_experts_per_layer": [int((x == 0).sum()) for x in loads],
            "expert_load": [(x.float() / x.sum().clamp_min(1)).tolist() for x in loads],
            "dropped_fraction": sum(dropped.get(str(i), 0) for i in layers) / total_routed if total_routed else 0.0,
            "dropped_fraction_per_layer": [
                dropped.get(str(i), 0) / routed[str(i)] if routed.get(str(i)) else 0.0 for i in layers
            ],
            "tokens_per_second": self.totals["tokens"] / self.totals["train_time_s"]
            if self.totals["train_time_s"]
            else 0.0,
            "tokens_seen": self.totals["tokens"],
            "train_time_s": self.totals["train_time_s"],
            "final_train_loss": log[-1]["loss"] if log else None,
            "expert_parallel": self.world,
            "parameters": params.total,
            "active_parameters": params.active,
            "preset": self.cfg.preset,
            "corpus_id": getattr(self.corpus, "corpus_id", None),
            "bf16": self.autocast,
            "device": str(self.device),
            "config": self.cfg.to_dict(),
        }
        comm = [r["comm_bytes_per_rank"] for r in log if "comm_bytes_per_rank" in r]
        if comm:
            report["comm_bytes_per_step_per_rank"] = sum(comm) / len(comm)
            if self.cfg.progress:
                self.console.print(
                    f"expert parallel over {self.world} ranks: {report['comm_bytes_per_step_per_rank'] / 1e6:.3f} MB "
                    "sent per step per rank (all-to-all, forward + backward)"
                )
        if self.cfg.fp8_experts and self.world == 1:  # the error report runs the layers alone, not sharded
            report["fp8_error_per_layer"] = fp8_error_per_layer(self.model, heldout[0].to(self.device))
        rep.write_report(self.out / REPORT_NAME, report)
        rep.plot_losses(log, rep.read_jsonl(self.out / EVAL_LOG_NAME), self.out / "loss.png", entropy)
        rep.plot_expert_load(report["expert_load"], layers, self.out / "expert_load.png")
        if self.cfg.progress:
            self.console.print(rep.summary_table(report, self.out))
        return report


# ---- logs -----------------------------------------------------------------------------------------


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic_write(path, "".join(line + "\n" for line in keep))


# ---- command line -------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `deepmoe train`, one per TrainConfig field (its type, default and help declared on
    the field). Every flag defaults to None (= not given), so that a JSON `--config` file and the options
    saved with a run (`--resume`) fill in what the flags leave out."""
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
        options = dict(f.metadata["argparse"])
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.setdefault("type", kind)
        shown = f" (default {f.default})" if f.default is not None and "default" not in f.metadata["help"] else ""
        parser.add_argument(
            flag or "--" + f.name.replace("_", "-"), dest=f.name, default=None, help=f.metadata["help"] + shown,
            **options,
        )  # fmt: skip
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields from a `--config` file, overridden by the flags given."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        options.update(read_json(path, "training config"))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            options[f.name] = value
    return options


def run_from_args(args: argparse.Namespace) -> int:
    """`deepmoe train`: 0 when the run finished, 130 when Ctrl-C stopped it (after saving), 1 on an error."""
    try:
        options = options_from_args(args)
        if getattr(args, "resume", None):
            result = resume(args.resume, **options)
        else:
            result = train(TrainConfig.from_dict(options))
    except (TrainingError, CheckpointError, ValueError, OSError) as err:
        print(f"deepmoe train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop (checkpoints are atomic)
        print("deepmoe train: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():  # an expert-parallel run under torchrun
            dist.destroy_process_group()
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank: one line for the whole expert-parallel run
        print(f"trained {result.step} steps: checkpoint {result.checkpoint}, report {result.out_dir / REPORT_NAME}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m deepmoe.train.trainer ...` (the same as `deepmoe train ...`)."""
    parser = add_train_arguments(
        argparse.ArgumentParser(prog="deepmoe train", description="Train a DeepSeek-style MoE LM.")
    )
    return run_from_args(parser.parse_args(argv))


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "add_train_arguments",
    "build_model_config",
    "build_optimizer",
    "lr_at",
    "merge_routing_stats",
    "options_from_args",
    "resume",
    "run_from_args",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
