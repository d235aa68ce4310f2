"""The architecture and balancing study: the DeepSeekMoE and aux-loss-free claims, measured at CPU scale.

`deepmoe study architectures` trains, with the same tokens, steps, seed and optimizer, models whose
tokens all use the same FFN width A in every layer (equal *active* parameters):

- dense: a SwiGLU FFN of width A;
- GShard: N experts of width A/2, top-2, softmax gate, expert-level aux loss (B1);
- Switch: N experts of width A, top-1;
- fine-grained: mN experts of width A/(2m), top-2m (DeepSeekMoE §3.1 without shared experts);
- DeepSeekMoE: K_s shared + (mN − K_s) routed experts of width A/(2m), top-(2m − K_s) (§3.2);
- Pyramid-MoE and Residual-MoE (DeepSpeed-MoE), at the same active width;
- dense ×N/2: a dense FFN of width N·A/2, the total FFN width of the GShard and fine-grained models
  (the upper bound DeepSeekMoE §4 compares with).

and then the DeepSeekMoE redundancy test (§4.5): per token, disable its top-scored routed experts and
measure the held-out loss. `deepmoe study balancing` trains the DeepSeekMoE model with the V3 gate
under each balancing method (none, B1 at several α, B4, the R4 bias at several γ, bias + B4) and reports
loss, MaxVio (per training batch and over the held-out set, as in Wang et al. 2024) and dead experts.
`deepmoe study attention` trains the same MLA MoE model (tiny-v3's shapes) with dense attention, DSA (the
lightning indexer's top-k) and NSA (compressed, selected and sliding-window branches) on sequences 4× the
scale's, k equal to NSA's uncompressed budget (docs/study.md#sparse-attention-dense-dsa-and-nsa).

Every run is an ordinary `deepmoe train` run (a preset plus `model_overrides`) in `OUT/runs/NAME`; a
finished run is reused and an interrupted one resumed, so a killed study continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from deepmoe import data
from deepmoe.evaluate import heldout_loss
from deepmoe.io.files import atomic_write, claim_directory, visible_entries, write_json
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.parameters import count_parameters
from deepmoe.report import figure, integer_ticks, read_jsonl, save_figure
from deepmoe.train.checkpoint import EVAL_LOG_NAME, LOG_NAME, REPORT_NAME, read_last
from deepmoe.train.config import NSA_DEFAULTS, TrainConfig, build_model_config, build_optimizer
from deepmoe.train.trainer import resume, train

logger = logging.getLogger(__name__)

BASE_PRESET = "tiny-deepseek-moe"
"""MHA attention, softmax gate, no MTP: the DeepSeekMoE paper's setting."""

STUDIES = ("architectures", "balancing", "attention")
DISABLED_FRACTIONS = (0.0, 0.125, 0.25, 0.375)
"""Fractions of the routed experts disabled per token in the redundancy test."""


@dataclass(frozen=True)
class StudyScale:
    """Model and run size of a study. Layer 0 is dense in every model; layers 1.. are the compared FFNs."""

    hidden_size: int
    layers: int
    active_ffn: int
    """A: the FFN width every token uses in every layer (a dense width, or the sum of the chosen experts')."""
    n_experts: int
    """N: experts of the GShard and Switch baselines."""
    granularity: int
    """m: fine-grained experts are m times as many and 1/m as wide."""
    shared: int
    """K_s: shared experts of the DeepSeekMoE model."""
    seq_len: int
    batch_size: int
    steps: int
    warmup_steps: int
    lr: float
    eval_every: int
    eval_batches: int
    """Held-out batches of the periodic evaluations and of the redundancy test."""
    vocab_size: int = 4096

    def __post_init__(self) -> None:
        m, n = self.granularity, self.n_experts
        if self.active_ffn % (2 * m):
            raise ValueError(f"StudyScale.active_ffn={self.active_ffn} must be divisible by 2·granularity={2 * m}")
        if not 0 <= self.shared < 2 * m:
            raise ValueError(f"StudyScale.shared={self.shared} must be in [0, 2·granularity={2 * m})")
        if n < 2 or self.layers < 2:
            raise ValueError("StudyScale needs n_experts >= 2 and layers >= 2 (layer 0 is dense)")


SCALES = {
    # ~2 min per study on 2 quiet cores: a smoke run of the whole pipeline, too small to be evidence
    "quick": StudyScale(
        hidden_size=64, layers=3, active_ffn=128, n_experts=8, granularity=2, shared=1,
        seq_len=64, batch_size=8, steps=150, warmup_steps=15, lr=3e-3, eval_every=50, eval_batches=8,
    ),
    # ~30 min per study on 2 cores (one thread per run)
    "default": StudyScale(
        hidden_size=128, layers=4, active_ffn=256, n_experts=8, granularity=4, shared=1,
        seq_len=128, batch_size=16, steps=500, warmup_steps=50, lr=2e-3, eval_every=50, eval_batches=20,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    model_overrides: dict[str, Any]
    """TrainConfig.model_overrides over BASE_PRESET."""
    equal_active: bool = True
    """False for the upper bound, which has the MoE models' total (not active) FFN width."""
    preset: str = BASE_PRESET
    options: dict[str, Any] | None = None
    """TrainConfig options over the scale's (the attention study's preset shapes, sequence length, sparse
    attention)."""


def _moe(scale: StudyScale, **fields: Any) -> dict[str, Any]:
    """MoE fields of a DeepSeekMoE (V1) layer: softmax gate, unnormalised gates, greedy top-K, B1 at α=0.01
    (the DeepSeekMoE paper's validation setting), no shared experts; `fields` override."""
    base = dict(
        hidden_size=scale.hidden_size, n_shared_experts=0, scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, n_devices=1,
        use_expert_bias=False, aux_loss_alpha=0.01, seq_aux_loss_alpha=0.0, device_aux_loss_alpha=0.0,
        comm_aux_loss_alpha=0.0,
    )  # fmt: skip
    return {**base, **fields}


def _model(scale: StudyScale, moe: dict[str, Any] | None, **fields: Any) -> dict[str, Any]:
    return dict(
        hidden_size=scale.hidden_size, num_hidden_layers=scale.layers, intermediate_size=scale.active_ffn,
        first_k_dense_replace=1, moe_layer_freq=1, moe=moe, **fields,
    )  # fmt: skip


def architecture_variants(scale: StudyScale) -> list[Variant]:
    a, n, m, ks = scale.active_ffn, scale.n_experts, scale.granularity, scale.shared
    fine = a // (2 * m)
    gshard = _moe(scale, n_routed_experts=n, moe_intermediate_size=a // 2, num_experts_per_tok=2)
    switch = _moe(scale, n_routed_experts=n, moe_intermediate_size=a, num_experts_per_tok=1)
    fine_grained = _moe(scale, n_routed_experts=m * n, moe_intermediate_size=fine, num_experts_per_tok=2 * m)
    deepseek = {
        **fine_grained,
        "n_routed_experts": m * n - ks,
        "n_shared_experts": ks,
        "num_experts_per_tok": 2 * m - ks,
    }
    residual = {**gshard, "n_shared_experts": 1, "num_experts_per_tok": 1}
    # Pyramid: DeepSeekMoE layers whose routed experts grow linearly with depth, as many on average
    moe_layers = scale.layers - 1
    counts = [round((m * n - ks) * 2 * (i + 1) / (moe_layers + 1)) for i in range(moe_layers)]
    return [
        Variant("dense", f"dense SwiGLU FFN, width {a}", _model(scale, None)),
        Variant("gshard", f"{n} experts of width {a // 2}, top-2", _model(scale, gshard)),
        Variant("switch", f"{n} experts of width {a}, top-1", _model(scale, switch)),
        Variant("fine-grained", f"{m * n} experts of width {fine}, top-{2 * m}", _model(scale, fine_grained)),
        Variant(
            "deepseekmoe",
            f"{ks} shared + {m * n - ks} routed experts of width {fine}, top-{2 * m - ks}",
            _model(scale, deepseek),
        ),
        Variant(
            "pyramid-moe",
            f"DeepSeekMoE with {'/'.join(map(str, counts))} routed experts in MoE layers 1..{moe_layers}",
            _model(scale, deepseek, moe_experts_per_layer=[0, *counts]),
        ),
        Variant(
            "residual-moe",
            f"dense MLP of width {a // 2} + top-1 of {n} experts of width {a // 2}",
            _model(scale, residual),
        ),
        Variant(
            f"dense-x{n // 2}",
            f"dense SwiGLU FFN, width {n * a // 2} (the MoE total)",
            {**_model(scale, None), "intermediate_size": n * a // 2},
            equal_active=False,
        ),
    ]


def balancing_variants(scale: StudyScale) -> list[Variant]:
    """The DeepSeekMoE model with the V3 gate (sigmoid affinities, top-K weights normalised)."""
    a, n, m, ks = scale.active_ffn, scale.n_experts, scale.granularity, scale.shared
    layer = dict(
        n_routed_experts=m * n - ks, n_shared_experts=ks, moe_intermediate_size=a // (2 * m),
        num_experts_per_tok=2 * m - ks, scoring_func="sigmoid", norm_topk_prob=True, aux_loss_alpha=0.0,
    )  # fmt: skip

    def variant(name: str, description: str, **fields: Any) -> Variant:
        return Variant(name, description, _model(scale, _moe(scale, **{**layer, **fields})))

    bias = dict(use_expert_bias=True, bias_update_speed=1e-2)
    return [
        variant("none", "no balancing"),
        *(variant(f"aux-{x:g}", f"expert-level aux loss α={x:g}", aux_loss_alpha=x) for x in (1e-3, 1e-2, 1e-1)),
        variant("seq-aux-0.01", "sequence-wise aux loss α=0.01", seq_aux_loss_alpha=1e-2),
        *(
            variant(f"bias-{x:g}", f"aux-loss-free bias γ={x:g}", use_expert_bias=True, bias_update_speed=x)
            for x in (1e-3, 1e-2)
        ),
        variant("bias-0.01+seq-0.0001", "bias γ=0.01 + sequence-wise α=1e-4", **bias, seq_aux_loss_alpha=1e-4),
    ]


ATTENTION_PRESET = "tiny-v3"
"""MLA with query compression (what DSA's indexer reads), V3 routing."""


def attention_variants(scale: StudyScale) -> list[Variant]:
    """tiny-v3 at the scale's width and depth (no MTP), sequences of 4 × seq_len: dense MLA, DSA with k = NSA's
    n·l' + w, and NSA with `--sparse-attention nsa`'s sizes (train.config.NSA_DEFAULTS)."""
    nsa = NSA_DEFAULTS
    k = nsa["nsa_select_count"] * nsa["nsa_select_block"] + nsa["nsa_window"]
    options = dict(hidden_size=scale.hidden_size, layers=scale.layers, seq_len=4 * scale.seq_len)
    overrides = dict(num_nextn_predict_layers=0)

    def variant(name: str, description: str, **sparse: Any) -> Variant:
        return Variant(name, description, overrides, preset=ATTENTION_PRESET, options={**options, **sparse})

    return [
        variant("dense", "MLA over every earlier token"),
        variant("dsa", f"DSA: the lightning indexer's top-{k} tokens", sparse_attention="dsa", index_topk=k),
        variant(
            "nsa",
            f"NSA: blocks of {nsa['nsa_compress_block']} at stride {nsa['nsa_compress_stride']} compressed, top-"
            f"{nsa['nsa_select_count']} blocks of {nsa['nsa_select_block']}, window {nsa['nsa_window']}",
            sparse_attention="nsa",
        ),
    ]


def variants_of(study: str, scale: StudyScale) -> list[Variant]:
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}: choose one of {', '.join(STUDIES)}")
    if study == "attention":
        return attention_variants(scale)
    return architecture_variants(scale) if study == "architectures" else balancing_variants(scale)


# ---- running ------------------------------------------------------------------------------------


def train_config(variant: Variant, scale: StudyScale, run_dir: Path, seed: int) -> TrainConfig:
    options = dict(
        preset=variant.preset, model_overrides=variant.model_overrides, vocab_size=scale.vocab_size,
        seq_len=scale.seq_len, batch_size=scale.batch_size, steps=scale.steps, warmup_steps=scale.warmup_steps,
        lr=scale.lr, min_lr=scale.lr / 10, eval_every=scale.eval_every, eval_batches=scale.eval_batches,
        save_every=0, keep_last=1, seed=seed, out=str(run_dir), progress=False,
        final_eval_batches=0,  # the study's held-out loss is over the whole held-out split (docs/study.md)
    )  # fmt: skip
    return TrainConfig(**{**options, **(variant.options or {})})


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def run_variant(variant: Variant, scale: StudyScale, run_dir: Path, corpus: Any, seed: int) -> dict[str, Any]:
    """Train (or reuse, or resume) one variant; its result row."""
    config = train_config(variant, scale, run_dir, seed)
    report_path = run_dir / REPORT_NAME
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        result = train(config, corpus) if read_last(run_dir) is None else resume(run_dir, corpus)
        if result.interrupted:  # saved; the next study run resumes it
            raise KeyboardInterrupt
        report = result.report
    params = count_parameters(build_model_config(config, corpus.vocab_size))
    log = read_jsonl(run_dir / LOG_NAME)
    return {
        "name": variant.name,
        "description": variant.description,
        "equal_active": variant.equal_active,
        "active_params": params.active,
        "total_params": params.total,
        "active_params_non_embedding": params.active_non_embedding,
        "heldout_loss": report["heldout_loss"],
        "maxvio": _mean(report["maxvio"]),
        "maxvio_batch": _mean([_mean(r["maxvio"]) for r in log]),
        "dead_experts": report["dead_experts"],
        "tokens_per_second": report["tokens_per_second"],
        "train_time_s": report["train_time_s"],
        "final_train_loss": report["final_train_loss"],
        "steps": report["steps"],
        "tokens_seen": report["tokens_seen"],
        "run_dir": os.fspath(run_dir),
    }


def redundancy_test(
    checkpoint: str | os.PathLike, batches: Sequence[torch.Tensor], fractions: Sequence[float] = DISABLED_FRACTIONS
) -> list[dict[str, Any]]:
    """DeepSeekMoE §4.5: held-out loss when each token's top-scored routed experts (a fraction of N_r)
    are disabled in every MoE layer and top-K is taken from the rest."""
    model = from_pretrained(checkpoint)
    layers = list(model.moe_layers().values())
    n = min(layer.config.n_routed_experts for layer in layers)
    k = layers[0].config.num_experts_per_tok
    rows = []
    for fraction in fractions:
        disabled = min(round(fraction * n), n - k)
        for layer in layers:
            layer.gate.set_expert_mask(disable_top=disabled)
        rows.append({"fraction": fraction, "disabled": disabled, "heldout_loss": heldout_loss(model, batches)})
    for layer in layers:
        layer.gate.clear_expert_mask()
    base = rows[0]["heldout_loss"]
    for row in rows:
        row["loss_increase"] = row["heldout_loss"] - base
    return rows


def side_by_side_speed(
    variants: Sequence[Variant], scale: StudyScale, corpus: Any, seed: int = 0, rounds: int = 5
) -> dict[str, float]:
    """Training tokens/s of each variant, measured side by side: the models (freshly initialised) take turns
    for `rounds` rounds of 2 steps each (forward, backward, AdamW), and each keeps its median round, so a busy
    machine slows them alike (the runs' own tokens/s were measured at different times)."""

    seq_len = train_config(variants[0], scale, Path("unused"), seed).seq_len  # the study's (attention: 4×)
    batch = corpus.train[: scale.batch_size * seq_len].view(scale.batch_size, seq_len)
    models = {}
    for variant in variants:
        config = train_config(variant, scale, Path("unused"), seed)
        torch.manual_seed(seed)
        model = DeepSeekForCausalLM(build_model_config(config, corpus.vocab_size)).train()
        models[variant.name] = (model, build_optimizer(model, config))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (model, optimizer) in models.items():
            start = perf_counter()
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                model(batch, labels=batch).loss.backward()
                optimizer.step()
            seconds[name].append((perf_counter() - start) / 2)
    return {name: batch.numel() / statistics.median(times) for name, times in seconds.items()}


@dataclass
class StudyResult:
    rows: list[dict[str, Any]]
    redundancy: dict[str, list[dict[str, Any]]]
    """Per model name, the redundancy test's rows (architectures study only)."""
    files: list[Path]


def run_study(
    study: str,
    out: str | os.PathLike,
    scale: StudyScale = SCALES["default"],
    seed: int = 0,
    corpus: Any = None,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Train every variant of `study` into `out/runs/NAME`, then write `out/results.json` (the rows),
    `table.md`, `loss.png`, `maxvio.png` (and, for architectures, `redundancy.json`/`.png`). A non-empty
    `out` is refused unless it holds an earlier study's runs, which are reused or continued.

    `log` receives one line per step of progress (default: this module's logger, at INFO). A run stopped
    by Ctrl-C is saved and KeyboardInterrupt raised: calling again with the same `out` continues it."""
    log = log or logger.info

    with claim_directory(out, "study directory (deepmoe study)", is_study) as out:
        variants = variants_of(study, scale)
        if corpus is None:
            corpus = data.prepare_corpus(None, scale.vocab_size)
        rows = []
        for i, variant in enumerate(variants, 1):
            log(f"[{i}/{len(variants)}] {variant.name}: {variant.description}")
            row = run_variant(variant, scale, out / "runs" / variant.name, corpus, seed)
            log(
                f"    held-out loss {row['heldout_loss']:.4f}, MaxVio {row['maxvio']:.3f}, "
                f"{row['tokens_per_second']:,.0f} tokens/s"
            )
            rows.append(row)
        redundancy: dict[str, list[dict[str, Any]]] = {}
        if study in ("architectures", "attention"):
            log("measuring training speed side by side")
            speeds = side_by_side_speed(variants, scale, corpus, seed)
            for row in rows:
                row["tokens_per_second_side_by_side"] = speeds[row["name"]]
                row["speed_vs_dense"] = speeds[row["name"]] / speeds["dense"]
        if study == "architectures":
            batches = data.heldout_batches(
                corpus.heldout, scale.batch_size, scale.seq_len, max_batches=scale.eval_batches
            )
            for name in ("gshard", "deepseekmoe"):
                redundancy[name] = redundancy_test(read_last(out / "runs" / name), batches)
        files = [write_json(out / "results.json", rows)]
        files.append(atomic_write(out / "table.md", markdown_table(rows, study) + "\n"))
        files.append(plot_curves(rows, "loss", out / "loss.png"))
        files.append(plot_curves(rows, "maxvio", out / "maxvio.png"))
        if redundancy:
            files.append(write_json(out / "redundancy.json", redundancy))
            files.append(atomic_write(out / "redundancy.md", redundancy_table(redundancy) + "\n"))
            files.append(plot_redundancy(redundancy, out / "redundancy.png"))
        return StudyResult(rows, redundancy, files)


_STUDY_FILES = {"runs", "results.json", "table.md", "loss.png", "maxvio.png", "redundancy.json", "redundancy.md",
                "redundancy.png"}  # fmt: skip


def is_study(directory: Path) -> bool:
    """Whether `directory` holds a study's runs (to continue) and only what `run_study` writes."""
    names = visible_entries(directory)
    return "runs" in names and set(names) <= _STUDY_FILES


# ---- tables and plots ---------------------------------------------------------------------------


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f} M"


def markdown_table(rows: Sequence[dict[str, Any]], study: str) -> str:
    if study == "architectures":
        head = (
            "| model | experts | active params (non-emb) | total params | held-out loss | MaxVio "
            "| tokens/s (side by side) | speed vs dense |"
        )
        lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['name']} | {r['description']} | {_millions(r['active_params'])} "
                f"({_millions(r['active_params_non_embedding'])}) | {_millions(r['total_params'])} "
                f"| {r['heldout_loss']:.4f} | {r['maxvio']:.3f} | {r['tokens_per_second_side_by_side']:,.0f} "
                f"| {r['speed_vs_dense']:.2f}× |"
            )
    elif study == "attention":
        head = "| attention | held-out loss | final train loss | tokens/s (side by side) | speed vs dense |"
        lines = [head, "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['description']} | {r['heldout_loss']:.4f} | {r['final_train_loss']:.4f} "
                f"| {r['tokens_per_second_side_by_side']:,.0f} | {r['speed_vs_dense']:.2f}× |"
            )
    else:
        head = "| method | held-out loss | MaxVio (global) | MaxVio (batch) | dead experts |"
        lines = [head, "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['description']} | {r['heldout_loss']:.4f} | {r['maxvio']:.3f} | {r['maxvio_batch']:.3f} "
                f"| {r['dead_experts']} |"
            )
    return "\n".join(lines)


def redundancy_table(redundancy: dict[str, list[dict[str, Any]]]) -> str:
    fractions = [r["fraction"] for r in next(iter(redundancy.values()))]
    lines = ["| model | " + " | ".join(f"{f:.1%} disabled" for f in fractions) + " |"]
    lines.append("|---|" + "---:|" * len(fractions))
    for name, rows in redundancy.items():
        cells = [f"{r['heldout_loss']:.4f} ({r['loss_increase']:+.4f}, {r['disabled']} experts)" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    smoothed, current = [], None
    for v in values:
        current = v if current is None else beta * current + (1 - beta) * v
        smoothed.append(current)
    return smoothed


LINE_STYLES = ("-", "--", "-.", ":")
"""Line styles cycled with the colours, so that 8 or more runs' curves stay apart."""


def plot_curves(rows: Sequence[dict[str, Any]], what: str, path: Path) -> Path:
    """`what` = "loss": training LM loss (EMA) and held-out loss per step, with each run's final held-out
    loss (a star at its last step); "maxvio": per-batch MaxVio (EMA, mean over the MoE layers) per step.
    The runs are ordered by final held-out loss (best first) in the legend, which gives it, and keep the
    same colour and line style in both plots."""
    ranked = sorted(rows, key=lambda row: (row["heldout_loss"] is None, row["heldout_loss"] or 0.0))
    with figure((9.5, 4.8)) as (fig, ax):
        for i, row in enumerate(ranked):
            style = {"color": f"C{i % 10}", "ls": LINE_STYLES[(i // 10 + i) % len(LINE_STYLES)], "lw": 1.2}
            label = row["name"] + (f" ({row['heldout_loss']:.3f})" if row["heldout_loss"] is not None else "")
            log = read_jsonl(Path(row["run_dir"]) / LOG_NAME)
            steps = [r["step"] for r in log]
            if what == "loss":
                ax.plot(steps, _ema([r["lm_loss"] for r in log]), label=label, **style)
                evals = [e for e in read_jsonl(Path(row["run_dir"]) / EVAL_LOG_NAME) if not e.get("final")]
                ax.plot([e["step"] for e in evals], [e["heldout_loss"] for e in evals], "o", color=style["color"], ms=3)
                if row["heldout_loss"] is not None:
                    ax.plot([row["steps"]], [row["heldout_loss"]], "*", color=style["color"], ms=10, mec="black",
                            mew=0.5)  # fmt: skip
            elif any(r["maxvio"] for r in log):
                ax.plot(steps, _ema([_mean(r["maxvio"]) for r in log]), label=label, **style)
        ax.set_xlabel("step")
        integer_ticks(ax.xaxis)
        if what == "loss":
            ax.set_ylabel("LM loss (nats/token)")
            ax.set_title("lines: train (EMA); dots: held-out; stars: final held-out loss", fontsize=9)
            losses = [r["heldout_loss"] for r in rows if r["heldout_loss"] is not None]
            if losses:
                ax.set_ylim(min(losses) - 0.3, max(losses) + 1.5)
        else:
            ax.set_ylabel("MaxVio of the training batch (EMA, mean over MoE layers)")
            ax.set_yscale("log")
        ax.grid(True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="final held-out loss", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        return save_figure(fig, path)


def plot_redundancy(redundancy: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    with figure((6, 4)) as (fig, ax):
        for name, rows in redundancy.items():
            ax.plot([r["fraction"] for r in rows], [r["heldout_loss"] for r in rows], "o-", label=name)
        ax.set_xlabel("fraction of routed experts disabled per token (its top-scored ones)")
        ax.set_ylabel("held-out loss")
        ax.grid(True)
        ax.legend()
        return save_figure(fig, path)


__all__ = [
    "SCALES",
    "STUDIES",
    "StudyResult",
    "StudyScale",
    "Variant",
    "architecture_variants",
    "balancing_variants",
    "markdown_table",
    "redundancy_table",
    "redundancy_test",
    "run_study",
]
