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

Several processes (docs/design.md#d2-sharded-training; launched by `torchrun --nproc-per-node W`): the W ranks
shard the model with FSDP2 (or replicate it, `data_parallel`), and split the routed experts over
`expert_parallel` = E of them (`deepmoe.train.distributed`). `batch_size` stays the global batch: every rank
draws the same batch and trains on its 1/W of the sequences, so a W-rank run follows the 1-process run of the
same options (to float tolerance, when no batch-level quantity — capacity, B1–B3 — is involved: those are per
rank's batch). The bias update uses the loads of all ranks; checkpoints are distributed (every rank writes its
shards; `deepmoe export` makes an HF checkpoint of one) and resume on any number of ranks; rank 0 writes the
other files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from deepmoe import data, parallel
from deepmoe.config import DeepSeekConfig
from deepmoe.evaluate import Evaluation, evaluate, fp8_error_per_layer
from deepmoe.io.checkpoint import load_config
from deepmoe.io.files import write_json
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.lora import LoRAConfig, apply_lora, base_state_dict, is_lora_name, load_adapter, save_adapter
from deepmoe.model.parameters import count_parameters, training_flops_per_token
from deepmoe.moe.balance import RoutingStats, max_violation, merge_routing_stats
from deepmoe.parallel.checkpoint import load_full_optimizer_state
from deepmoe.train import checkpoint as ckpt
from deepmoe.train.checkpoint import CONFIG_NAME, EVAL_LOG_NAME, LOG_NAME
from deepmoe.train.config import RESUME_OVERRIDABLE, TrainConfig, build_model_config, build_optimizer, lr_at
from deepmoe.train.distributed import Ranks, held_bytes, launch_layout, launched_world
from deepmoe.train.flops import device_peak_tflops, model_flops_utilisation
from deepmoe.train.inputs import (
    data_sources,
    heldout_batches,
    initial_model,
    load_corpus,
    train_tokens,
    training_batches,
)
from deepmoe.train.report import run_report, write_run_files
from deepmoe.train.step import NonFiniteError, optimizer_step

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
"""A LoRA run's checkpoint: the adapter's directory (PEFT format) inside `step-N/`, beside the unchanged base."""

FINAL_EVAL_BATCHES = 200
"""The final evaluation's bound when `final_eval_batches` is not given (and the run is longer)."""


class TrainingError(RuntimeError):
    """The run had to stop (non-finite loss or gradient, a failed checkpoint write); the message says why
    and which checkpoint is intact."""


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done (in total, over every session of the run)."""
    out_dir: Path
    checkpoint: Path | None
    """The newest complete checkpoint (what `last` names)."""
    interrupted: bool = False
    report: dict[str, Any] | None = None


@dataclass
class RunStart:
    """What a run tells its observer when it starts."""

    step: int
    """Steps already done (a resumed run's)."""
    steps: int
    description: str
    """One line: model, parameters, tokens, device, run directory."""
    show_progress: bool
    """The run's `progress` option, on the process that writes (rank 0)."""


class TrainingObserver:
    """Watches a run (the command line draws its progress bar): override what you need."""

    def start(self, run: RunStart) -> None:
        """Before the first step."""

    def step(self, record: dict[str, Any]) -> None:
        """After each optimizer step: the log.jsonl record (step, loss, lr, grad norm, tokens/s, MaxVio...)."""

    def evaluation(self, record: dict[str, Any]) -> None:
        """After each periodic held-out evaluation: the eval.jsonl record."""

    def end(self) -> None:
        """After the last step (or the interruption), before the final evaluation and report."""


# ---- public entry points ------------------------------------------------------------------------


def train(config: TrainConfig, corpus: Any = None, observer: TrainingObserver | None = None) -> TrainResult:
    """Train a new run in `config.out` (refused if it already holds one: resume it instead).

    `corpus`: a `TokenizedCorpus`-like object; None: `prepare_corpus(config.data, config.vocab_size)`.
    `observer` is told the run's start, each step and each evaluation (messages go to `logging`).
    Ctrl-C stops after the current step and saves; returns with `interrupted=True`.
    """
    out = Path(config.out)
    if (out / ckpt.LAST_NAME).exists():
        raise ValueError(f"{out} already holds a run ({out / ckpt.LAST_NAME}): continue it with --resume {out}")
    # saved with the run: --resume may run from another directory
    if config.init_from is not None:
        config = dataclasses.replace(config, init_from=os.path.abspath(config.init_from))
    if config.data is not None:
        absolute = [f"{os.path.abspath(path)}:{weight:g}" for path, weight in data_sources(config)]
        config = dataclasses.replace(
            config, data=absolute if isinstance(config.data, list) else os.path.abspath(config.data)
        )
    with ckpt.hold_run_directory(out, ckpt.is_unstarted_run):
        model_config = load_config(config.init_from) if config.init_from else build_model_config(config, 1)
        launch_layout(config.expert_parallel, config.data_parallel).check(model_config, config.batch_size)
        return _Run(config, load_corpus(config, corpus), observer or TrainingObserver()).run()


def resume(
    out_dir: str | os.PathLike, corpus: Any = None, observer: TrainingObserver | None = None, **overrides: Any
) -> TrainResult:
    """Continue the run in `out_dir` from its newest checkpoint until `steps` (an override, else the saved
    value) optimizer steps in total. Only the options in `RESUME_OVERRIDABLE` may change; a run
    interrupted and resumed with the same options ends bitwise equal (on CPU) to an uninterrupted one.
    """
    out = Path(out_dir)
    step_dir = ckpt.read_last(out)
    if step_dir is None and (out / "config.json").is_file() and (out.parent / ckpt.LAST_NAME).is_file():
        raise ValueError(f"{out} is a checkpoint of the run {out.parent}: resume the run directory ({out.parent})")
    if step_dir is None:
        raise ValueError(f"{out}: no complete checkpoint to resume from ({out / ckpt.LAST_NAME} not found)")
    with ckpt.hold_run_directory(out, lambda _: True):
        return _resume(out, step_dir, corpus, observer or TrainingObserver(), overrides)


def _resume(
    out: Path, step_dir: Path, corpus: Any, observer: TrainingObserver, overrides: dict[str, Any]
) -> TrainResult:
    state, tensors = ckpt.read_training_state(step_dir)
    saved = dict(state["train_config"])
    if saved.get("init_from") is not None:  # runs saved before init_from refused them: the values were unused
        saved.update(preset=None, vocab_size=None)
    if overrides.get("steps", saved["steps"]) != saved["steps"] and "schedule_steps" not in overrides:
        overrides = {**overrides, "schedule_steps": saved.get("schedule_steps") or saved["steps"]}
    if launched_world() == 1 and saved.get("expert_parallel", 1) > 1 and "expert_parallel" not in overrides:
        logger.info("resuming a run of expert_parallel=%d in one process: all experts on this one",
                    saved["expert_parallel"])  # fmt: skip
        overrides = {**overrides, "expert_parallel": 1}
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
    model_config = DeepSeekConfig.from_dict(state["model_config"])
    launch_layout(config.expert_parallel, config.data_parallel).check(model_config, config.batch_size)
    corpus = load_corpus(config, corpus, step_dir)
    if getattr(corpus, "corpus_id", None) != state.get("corpus_id"):
        raise ValueError(
            f"the corpus differs from the one the run in {out} was trained on "
            f"(corpus_id {getattr(corpus, 'corpus_id', None)!r}, expected {state.get('corpus_id')!r})"
        )
    return _Run(config, corpus, observer, resume_from=(step_dir, state, tensors)).run()


# ---- the run ------------------------------------------------------------------------------------


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


_PARTS = ("lm_loss", "aux_loss", "mtp_loss", "indexer_loss")


def _loss_parts(out: Any) -> tuple[list[float], dict[int, RoutingStats]]:
    """What a step's record keeps of a micro-batch's output: its loss parts (0 when absent), its routing."""
    parts = [getattr(out, name) for name in _PARTS]
    return [float(p.detach()) if p is not None else 0.0 for p in parts], out.routing_stats


class _StopOnSigint:
    """While active (main thread only), a first Ctrl-C asks the loop to stop after the current step;
    a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after this step and saving (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _Run:
    def __init__(self, config: TrainConfig, corpus: Any, observer: TrainingObserver, resume_from: tuple | None = None):
        self.cfg = config
        self.observer = observer
        self.corpus = corpus
        self.out = Path(config.out)
        self.ranks = Ranks(_resolve_device(config.device), config.expert_parallel, config.data_parallel)
        self.device, self.rank, self.world = self.ranks.device, self.ranks.rank, self.ranks.world
        self.is_main = self.ranks.is_main
        self.bf16 = config.bf16
        if config.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            logger.warning("bfloat16 is not supported on this GPU: training in float32")
            self.bf16 = False
        self.autocast = self.bf16 and self.world == 1  # several ranks: FSDP2's mixed precision instead
        distributed_checkpoint = resume_from is not None and "distributed" in resume_from[1]
        if resume_from is None:
            _seed_everything(config.seed)
            if config.init_from is None:
                self.model_config = build_model_config(config, corpus.vocab_size, getattr(corpus, "eot_id", None))
                self.model = DeepSeekForCausalLM(self.model_config)
            else:
                self.model = initial_model(config, corpus.vocab_size)
                self.model_config = self.model.config
            self.step = 0
            self.totals = {"tokens": 0, "train_time_s": 0.0, "routed_slots": {}, "dropped_slots": {}}
        else:
            step_dir, state, tensors = resume_from
            self.model_config = DeepSeekConfig.from_dict(state["model_config"])
            self.model = DeepSeekForCausalLM(self.model_config)
            if not distributed_checkpoint:  # whole weights, loaded before sharding
                ckpt.load_model_weights(self.model, step_dir)
            self.step = int(state["step"])
            self.totals = state["totals"]
        if config.indexer_warmup and not self.model_config.has_indexer:
            raise ValueError(
                f"TrainConfig.indexer_warmup={config.indexer_warmup} is invalid: the model has no lightning indexer "
                "to warm up; add one with TrainConfig.sparse_attention='dsa'"
            )
        self.model.indexer_loss_weight = config.indexer_loss_weight
        self._indexer_warmup: bool | None = None  # set by the first step (`_set_indexer_warmup`)
        self.lora = self._add_lora(resume_from[0] if resume_from is not None else None)
        self.model.to(self.device).train()
        trainable = {id(p) for p in self.model.trainable_parameters()}  # PESC: adapters and routers only
        for p in self.model.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
        self.ranks.shard(self.model, self.model_config, config.batch_size, bf16=self.bf16,
                         activation_checkpointing=config.activation_checkpointing)  # fmt: skip
        self.optimizer = build_optimizer(self.model, config)
        self.batches = training_batches(corpus, config, self.ranks.rows(config.batch_size))
        heldout_batches(corpus, config, 1)  # a clear error now when there is no held-out sequence
        self.moe_layers = sorted(i for i in self.model.moe_layers() if i < self.model_config.num_hidden_layers)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_staging(self.out)
            write_json(self.out / CONFIG_NAME, config.to_dict())
        if resume_from is None:
            if self.is_main:  # files a run that died before its first checkpoint may have left
                for name in (LOG_NAME, EVAL_LOG_NAME):
                    (self.out / name).unlink(missing_ok=True)
        else:
            if distributed_checkpoint:  # written on any layout: each rank reads the shards it now holds
                self.ranks.load(step_dir, self.model, self.optimizer, state)
            else:
                if self.world > 1:  # one process's whole optimizer state: each rank keeps its shards
                    saved = ckpt.optimizer_state_by_name(state["optimizer"], tensors)
                    load_full_optimizer_state(self.model, self.optimizer, saved)
                else:
                    ckpt.load_optimizer_state(self.optimizer, self.model, state["optimizer"], tensors)
                ckpt.set_rng_state(state["rng"], tensors)
            self.batches.load_state_dict(state["data"])
            if self.is_main:
                for name in (LOG_NAME, EVAL_LOG_NAME):
                    ckpt.truncate_log(self.out / name, self.step)
        self.last_saved = ckpt.read_last(self.out)
        self._boundary = self._snapshot()
        self._in_update = False
        self._eval_batches: list[Tensor] | None = None
        self._held: dict[str, int] | None = None
        self.flops_per_token = training_flops_per_token(self.model_config, config.seq_len)
        self.peak_tflops = device_peak_tflops(self.device, config.peak_tflops)

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
        path, error = self.out / ckpt.step_dir_name(self.step), None
        try:
            if self.world > 1:  # every rank writes its shards
                rng_per_rank = self.ranks.all_ranks(ckpt.rng_to_json(rng))
                path = self.ranks.save(self.out, self.step, self.model, self.optimizer, self.model_config, info,
                                       rng_per_rank, tokenizer)  # fmt: skip
            elif self.is_main:
                optimizer = ckpt.optimizer_state(self.optimizer, self.model)
                weights, extra = self.model.state_dict(), None
                if self.lora is not None:  # the unchanged base, and the adapter beside it
                    weights, extra = base_state_dict(self.model), self._save_adapter
                path = ckpt.save_training_checkpoint(
                    self.out, self.step, weights, self.model_config, optimizer, info, rng, tokenizer, extra
                )
            if self.is_main:
                ckpt.prune_checkpoints(self.out, self.cfg.keep_last)
        except (OSError, ValueError, RuntimeError, CheckpointException) as err:
            error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if self.world > 1:
            try:  # a failure on one rank (rank 0's files) stops every rank
                failed = self.ranks.all_reduce([float(error is not None)])[0]
            except RuntimeError:  # a rank is gone: the process group cannot run collectives any more
                failed, error = 1.0, error or "a rank stopped answering"
            if failed:
                error = error or "it failed on another rank"
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
        self._take_traffic()  # what evaluations sent is not this step's
        batches = [next(self.batches) for _ in range(cfg.grad_accum)]
        warmup = self._set_indexer_warmup(self.step < cfg.indexer_warmup)
        try:
            result = optimizer_step(
                self.model,
                self.optimizer,
                [batch.to(self.device, non_blocking=True) for batch in batches],  # this rank's rows
                max_norm=cfg.grad_clip,
                loss=attrgetter("indexer_loss" if warmup else "loss"),
                forward=self._forward,
                context=self._autocast,
                reduce=lambda value: self.ranks.all_reduce([value])[0],
                collect=_loss_parts,
                before_update=self._begin_update,
            )
        except NonFiniteError as err:
            raise TrainingError(self._stop_message(str(err))) from err
        except ValueError as err:
            raise TrainingError(self._stop_message(f"the forward pass failed ({err})")) from err
        sums = {"loss": sum(result.losses)}
        parts = [sum(micro[i] for micro, _ in result.collected) for i in range(len(_PARTS))]
        sums.update(zip(_PARTS, self.ranks.all_reduce(parts), strict=True))
        merged = self.ranks.global_stats(merge_routing_stats([stats for _, stats in result.collected]))
        if not warmup and self.lora is None:  # the warm-up trains the indexers alone: the routing's bias stays too;
            self.model.update_expert_bias(merged)  # LoRA keeps it too (the base with the adapter is the model)
        self.step += 1
        self._boundary = self._snapshot()
        self._in_update = False
        record = {"step": self.step, "lr": lr}
        record.update({k: v / cfg.grad_accum for k, v in sums.items()})
        record["grad_norm"] = result.grad_norm
        record["tokens"] = cfg.grad_accum * cfg.batch_size * cfg.seq_len  # the global batch's
        if self.ranks.layout.expert_parallel > 1:
            record["comm_bytes_per_rank"] = self.ranks.all_reduce([float(self._take_traffic())])[0]
        if self._held is None:  # once per session, after the first step made the gradients and moments
            held = held_bytes(self.model, self.optimizer)
            every_rank = self.ranks.all_ranks(held)
            self._held = {key: max(r[key] for r in every_rank) for key in held}  # the largest over the ranks
            record.update(self._held)
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

    def _set_indexer_warmup(self, warmup: bool) -> bool:
        """DSA's dense warm-up on (dense attention; every parameter but the indexers' frozen, and the step trains on
        the indexers' KL alone) or off (sparse attention, everything trains on `loss`); returns `warmup`."""
        if warmup != self._indexer_warmup:
            self.model.set_indexer_warmup(warmup)
            indexer = {id(p) for p in self.model.indexer_parameters()}
            trainable = {id(p) for p in self.model.trainable_parameters()}  # the sharded parameters, once sharded
            if self.lora is not None:  # LoRA: its factors only
                trainable &= {id(p) for name, p in self.model.named_parameters() if is_lora_name(name)}
            for p in self.model.parameters():
                if id(p) not in indexer:
                    p.requires_grad_(not warmup and id(p) in trainable)
            self._indexer_warmup = warmup
        return warmup

    def _add_lora(self, step_dir: Path | None) -> LoRAConfig | None:
        """`lora_rank`: adapters on the model (a resumed run's from its checkpoint), every other weight frozen."""
        cfg = self.cfg
        if cfg.lora_rank is None:
            return None
        if self.world > 1:
            raise ValueError(f"TrainConfig.lora_rank={cfg.lora_rank} is invalid with {self.world} ranks: LoRA training "
                             "runs in one process")  # fmt: skip
        if step_dir is not None:
            return load_adapter(self.model, step_dir / ADAPTER_DIR).lora_config
        return apply_lora(self.model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)).lora_config

    def _save_adapter(self, staging: Path) -> None:
        save_adapter(self.model, staging / ADAPTER_DIR, base_model_name_or_path=self.cfg.init_from)

    def _forward(self, batch: Tensor | data.LabeledBatch) -> Any:
        input_ids, labels = data.split_batch(batch)
        return self.model(input_ids, labels=labels)

    def _begin_update(self) -> None:
        """From the optimizer's update to the step's end, a Ctrl-C leaves no consistent state to save."""
        self._in_update = True

    def _take_traffic(self) -> int:
        """Bytes this rank's MoE layers sent to other ranks since the last call (forward and backward)."""
        return sum(m.dispatcher.reset_traffic().total_bytes for m in parallel.expert_parallel_layers(self.model))

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, batches: list[Tensor]) -> Evaluation:
        """`deepmoe.evaluate.evaluate` over every rank: each rank takes its share of a batch; a batch that does
        not split evenly runs whole on every rank and counts once (rank 0's)."""

        def share(batch: Tensor) -> tuple[Tensor, bool]:
            even = batch.shape[0] % self.world == 0
            return (self.ranks.local(batch) if even else batch), even or self.is_main

        result = evaluate(self.model, batches, self._autocast, share)
        if self.world > 1:
            self.model.reshard()  # FSDP2 keeps the root's weights gathered after a forward without backward
            total, count = self.ranks.all_reduce([result.loss_sum, result.tokens], mean=False)
            result.loss_sum, result.tokens = total, int(count)
            for idx in sorted(result.load):
                result.load[idx] = self.ranks.sum(result.load[idx])
        return result

    def periodic_eval(self) -> dict[str, Any]:
        if self._eval_batches is None:
            self._eval_batches = heldout_batches(self.corpus, self.cfg, self.cfg.eval_batches or None)
        result = self.evaluate(self._eval_batches)
        record = {"step": self.step, "heldout_loss": result.loss, "heldout_perplexity": result.perplexity}
        record["maxvio"] = [float(max_violation(result.load[i])) for i in self.moe_layers if i in result.load]
        if self.is_main:
            ckpt.append_jsonl(self.out / EVAL_LOG_NAME, record)
        return record

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Steps until `steps`, with periodic evaluations and checkpoints; then the final checkpoint and the
        report. Ctrl-C stops after the current step and saves."""
        cfg, stopper = self.cfg, _StopOnSigint()
        if cfg.warmup_steps > (cfg.schedule_steps or cfg.steps) and self.is_main:
            logger.warning("warmup_steps=%d is longer than the %d-step schedule: the learning rate never reaches "
                           "lr=%g (set --warmup-steps)", cfg.warmup_steps, cfg.schedule_steps or cfg.steps,
                           cfg.lr)  # fmt: skip
        self.observer.start(RunStart(self.step, cfg.steps, self._description(), cfg.progress and self.is_main))
        try:
            with stopper, open(self.out / LOG_NAME if self.is_main else os.devnull, "a", encoding="utf-8") as log:
                while self.step < cfg.steps and not self._stop_requested(stopper):
                    record = self.timed_step()
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    self.observer.step(record)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        self.observer.evaluation(self.periodic_eval())
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save()
        except KeyboardInterrupt:
            stopper.requested = True
            if self._in_update:
                where = f"{self.last_saved} is intact" if self.last_saved else "no checkpoint exists"
                logger.warning(
                    "interrupted during the optimizer update of step %d: not saved; %s", self.step + 1, where
                )
                return TrainResult(self.step, self.out, self.last_saved, interrupted=True)
        finally:
            self.observer.end()
        if stopper.requested:
            path = self.save(self._boundary)
            logger.warning("interrupted: saved step %d to %s; continue with deepmoe train --resume %s", self.step,
                           path, self.out)  # fmt: skip
            return TrainResult(self.step, self.out, path, interrupted=True)
        path = self.save()
        try:
            report = self.finish()
        except KeyboardInterrupt:
            logger.warning("interrupted while writing the report: step %d is saved in %s", self.step, path)
            return TrainResult(self.step, self.out, path, interrupted=True)
        return TrainResult(self.step, self.out, path, report=report)

    def _stop_requested(self, stopper: _StopOnSigint) -> bool:
        """Whether Ctrl-C asked to stop (on any rank: every rank stops at the same step)."""
        if self.world > 1:
            stopper.requested = bool(self.ranks.all_reduce([float(stopper.requested)])[0])
        return stopper.requested

    def timed_step(self) -> dict[str, Any]:
        """`train_step`, with its time, tokens/s (all ranks'), model FLOPs per token and MFU (when the devices'
        peak is known) added to the record, and the run's totals."""
        start = time.perf_counter()
        record = self.train_step()
        elapsed = time.perf_counter() - start
        record["tokens_per_s"] = record["tokens"] / max(elapsed, 1e-9)
        record["flops_per_token"] = self.flops_per_token
        if self.peak_tflops is not None:
            record["mfu"] = model_flops_utilisation(record["tokens_per_s"], self.flops_per_token, self.peak_tflops,
                                                    self.world)  # fmt: skip
        self.totals["tokens"] += record["tokens"]
        self.totals["train_time_s"] += elapsed
        return record

    def _description(self) -> str:
        cfg, counts = self.cfg, count_parameters(self.model_config)
        ranks = self.ranks.describe()
        mtp = f" + {counts.mtp / 1e6:.2f} M MTP" if counts.mtp else ""  # report.json's parameters, mtp_parameters
        schedule = cfg.schedule_steps or cfg.steps
        if self.model_config.has_indexer:  # DSA: the dense warm-up (indexers only), then sparse attention
            warm = f"{cfg.indexer_warmup} dense warm-up steps (indexers only), then " if cfg.indexer_warmup else ""
            ranks += f", sparse attention (DSA): {warm}top-{self.model_config.index_topk} keys"
        return (
            f"{'resuming' if self.step else 'training'} {cfg.preset or cfg.init_from} "
            f"({counts.total / 1e6:.2f} M parameters{mtp}, vocab {self.model_config.vocab_size}) on "
            f"{train_tokens(self.corpus):,} tokens, device {self.device}{ranks}"
            f"{', bf16' if self.bf16 else ''}: step {self.step} -> {cfg.steps}, run directory {self.out}"
            + (f"; LR schedule of {schedule} steps (min_lr after it)" if schedule != cfg.steps else "")
        )

    def _layout(self) -> dict[str, Any]:
        layout = self.ranks.layout
        return {"ranks": self.world, "expert_parallel": layout.expert_parallel, "data_parallel": layout.data_parallel}

    def finish(self) -> dict[str, Any]:
        """Evaluate on the first `final_eval_batches` held-out batches (see `TrainConfig`; report.json's
        heldout_tokens says how many tokens); write report.json, loss.png, expert_load.png (rank 0)."""
        bound = self.cfg.final_eval_batches
        if bound is None:  # a normal run: 200 batches at most; a smoke run: no more than it trained on
            bound = min(FINAL_EVAL_BATCHES, max(1, self.step * self.cfg.grad_accum))
        heldout = heldout_batches(self.corpus, self.cfg, bound or None)
        result = self.evaluate(heldout)
        if not self.is_main:
            return {}
        final = {"step": self.step, "heldout_loss": result.loss, "heldout_perplexity": result.perplexity}
        ckpt.append_jsonl(self.out / EVAL_LOG_NAME, {**final, "final": True})
        report = run_report(self.out, self.step, result, self.moe_layers, self.totals, self.model_config, self.cfg,
                            self.corpus, self._layout(), self.bf16, str(self.device))  # fmt: skip
        report["flops_per_token"] = self.flops_per_token
        if self.peak_tflops is not None:
            report["peak_tflops"] = self.peak_tflops
            report["mfu"] = model_flops_utilisation(report["tokens_per_second"], self.flops_per_token,
                                                    self.peak_tflops, self.world)  # fmt: skip
        if hasattr(self.batches, "tokens_per_source"):  # prepared data: the tokens drawn from each source
            report["tokens_per_source"] = dict(zip(self.corpus.paths, self.batches.tokens_per_source, strict=True))
        if self.cfg.fp8_experts and self.world == 1:  # the error report runs the layers alone, not sharded
            report["fp8_error_per_layer"] = fp8_error_per_layer(self.model, heldout[0].to(self.device))
        if "comm_bytes_per_step_per_rank" in report:
            logger.info("expert parallel over %d of the %d ranks: %.3f MB sent per step per rank (all-to-all, forward "
                        "+ backward)", self.ranks.layout.expert_parallel, self.world,
                        report["comm_bytes_per_step_per_rank"] / 1e6)  # fmt: skip
        if "bytes_per_rank" in report and self.world > 1:
            held = report["bytes_per_rank"]
            logger.info("held per rank (the largest): %.2f MB parameters, %.2f MB gradients, %.2f MB optimizer state",
                        held["parameter_bytes"] / 1e6, held["gradient_bytes"] / 1e6,
                        held["optimizer_bytes"] / 1e6)  # fmt: skip
        write_run_files(self.out, report)
        return report
