"""The end-of-run report of a training run: the numbers of `report.json` (held-out loss against the
unigram entropy, balance per MoE layer, throughput) and its plots (`loss.png`, `expert_load.png`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deepmoe import report as plots
from deepmoe.config import DeepSeekConfig
from deepmoe.evaluate import Evaluation
from deepmoe.model.parameters import count_parameters
from deepmoe.moe.balance import coefficient_of_variation, max_violation
from deepmoe.train.checkpoint import EVAL_LOG_NAME, LOG_NAME, REPORT_NAME
from deepmoe.train.config import TrainConfig
from deepmoe.train.inputs import unigram_entropy


def run_report(
    run_dir: Path,
    step: int,
    evaluation: Evaluation,
    moe_layers: list[int],
    totals: dict[str, Any],
    model_config: DeepSeekConfig,
    config: TrainConfig,
    corpus: Any,
    layout: dict[str, Any],
    bf16: bool,
    device: str,
) -> dict[str, Any]:
    """report.json's content: the final held-out evaluation (over `heldout_tokens` tokens: the first
    `final_eval_batches` batches of the held-out set, or all of it), the expert loads
    it routed per MoE layer (MaxVio, CV, dead experts), the dropped fraction and throughput over the run
    (`totals`, summed over its sessions), the parallel `layout` (ranks, expert_parallel, data_parallel) with
    the bytes each rank holds, and the run's options."""
    layers = [i for i in moe_layers if i in evaluation.load]
    loads = [evaluation.load[i] for i in layers]
    routed, dropped = totals["routed_slots"], totals["dropped_slots"]
    total_routed = sum(routed.get(str(i), 0) for i in layers)
    params = count_parameters(model_config)
    entropy = unigram_entropy(corpus)
    log = plots.read_jsonl(run_dir / LOG_NAME)
    report = {
        "steps": step,
        "heldout_loss": evaluation.loss,
        "heldout_perplexity": evaluation.perplexity,
        "heldout_tokens": evaluation.tokens,
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
        "tokens_per_second": totals["tokens"] / totals["train_time_s"] if totals["train_time_s"] else 0.0,
        "tokens_seen": totals["tokens"],
        "train_time_s": totals["train_time_s"],
        "final_train_loss": log[-1]["loss"] if log else None,  # kept for compatibility: LM + aux + MTP losses
        "final_train_lm_loss": log[-1].get("lm_loss") if log else None,  # the LM loss alone (the progress bar's)
        **layout,  # ranks, expert_parallel, data_parallel
        "parameters": params.total,  # without the MTP modules (mtp_parameters)
        "mtp_parameters": params.mtp,
        "active_parameters": params.active,
        "preset": config.preset,
        "corpus_id": getattr(corpus, "corpus_id", None),
        "bf16": bf16,
        "device": device,
        "config": config.to_dict(),
    }
    held = [r for r in log if "parameter_bytes" in r]
    if held:  # measured after the first step of the run's last session, the largest over the ranks
        report["bytes_per_rank"] = {k: held[-1][k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes")}
    comm = [r["comm_bytes_per_rank"] for r in log if "comm_bytes_per_rank" in r]
    if comm:
        report["comm_bytes_per_step_per_rank"] = sum(comm) / len(comm)
    return report


def write_run_files(run_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, loss.png (the logs against the unigram entropy) and expert_load.png."""
    log, evals = plots.read_jsonl(run_dir / LOG_NAME), plots.read_jsonl(run_dir / EVAL_LOG_NAME)
    return [
        plots.write_report(run_dir / REPORT_NAME, report),
        plots.plot_losses(log, evals, run_dir / "loss.png", report["unigram_entropy"]),
        plots.plot_expert_load(report["expert_load"], report["moe_layers"], run_dir / "expert_load.png"),
    ]
