"""The options of a training run and what follows from them alone: `TrainConfig` (each field declares
its command-line option once), the learning-rate schedule, the model config and the optimizer."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from deepmoe.config import DeepSeekConfig, MoEConfig, check, is_int, is_real
from deepmoe.model.lora import LORA_TARGETS
from deepmoe.parallel.mesh import DATA_PARALLEL
from deepmoe.presets import PRESETS, get_preset

DEFAULT_PRESET, DEFAULT_VOCAB_SIZE = "tiny-v3", 4096
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda")
SPARSE_ATTENTION = ("dsa", "nsa")
NSA_DEFAULTS = dict(
    nsa_compress_block=16, nsa_compress_stride=8, nsa_select_block=16, nsa_select_count=4, nsa_window=32
)
"""`--sparse-attention nsa`'s block sizes where the preset and model_overrides set none (l, d, l', n, w)."""
RESUME_OVERRIDABLE = frozenset(
    {"steps", "schedule_steps", "lr", "min_lr", "grad_clip", "eval_every", "eval_batches", "save_every",
     "keep_last", "device", "progress", "expert_parallel", "data_parallel", "activation_checkpointing",
     "final_eval_batches", "peak_tflops"}
)  # fmt: skip
"""Options a resumed run may change; the others are the run's."""


def option(default: Any, help: str, flag: str | None = "", minimum: int | None = None, **details: Any) -> Any:
    """A TrainConfig field that declares its command-line option once: `help`, `flag` ("" = --field-name,
    None = no flag: a --config file only), the `minimum` of an integer, and `choices`/`metavar`."""
    return field(default=default, metadata={"help": help, "flag": flag, "minimum": minimum, "details": details})


@dataclass
class TrainConfig:
    """Options of a training run; validated on construction (ValueError naming the field)."""

    preset: str | None = option(None, "model preset (default tiny-v3; none with --init-from)", choices=tuple(PRESETS))
    data: str | list[str] | None = option(
        None, "a text file or folder, or a directory made by `deepmoe data prepare` (read memory-mapped); repeat "
        "as PATH:WEIGHT to mix prepared directories by weight (default: the corpus bundled with deepmoe)",
        action="append", metavar="PATH[:WEIGHT]"
    )  # fmt: skip
    vocab_size: int | None = option(
        None, "vocabulary of the tokenizer trained on the corpus (default 4096; the model gets the tokenizer's; "
        "none with --init-from, whose tokenizer.json is used)"
    )  # fmt: skip
    seq_len: int = option(256, "tokens per sequence", minimum=1)
    batch_size: int = option(16, "sequences per micro-batch over all ranks (each expert-parallel rank trains on "
                                 "its share)", minimum=1)  # fmt: skip
    grad_accum: int = option(1, "micro-batches per optimizer step", minimum=1)
    steps: int = option(1000, "optimizer steps in total", minimum=1)
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
    eval_every: int = option(200, "held-out evaluation every N steps (0: only the final one)")
    eval_batches: int = option(20, "held-out batches per periodic evaluation (0: all)")
    final_eval_batches: int | None = option(
        None, "held-out batches of the final evaluation (0: the whole held-out set; default: at most 200, and no "
        "more than the run's micro-batches, so that a smoke run's evaluation stays as short as its training; "
        "report.json's heldout_tokens says how many tokens it covered)"
    )  # fmt: skip
    save_every: int = option(500, "checkpoint every N steps (0: only at the end; also at the end and on Ctrl-C)")
    keep_last: int = option(3, "checkpoints kept (0: all)")
    seed: int = option(0, "seed of the weights and the data order")
    bf16: bool = option(False, "bfloat16 compute: autocast on one process, FSDP2 mixed precision (fp32 gradient "
                               "reduction) on several; weights and optimizer state stay float32")  # fmt: skip
    device: str = option("auto", "auto: cuda if available", choices=DEVICES)
    out: str = option("runs/deepmoe", "run directory")
    model_overrides: dict[str, Any] | None = option(
        None, "DeepSeekConfig fields over the preset's (HF names) and MoEConfig fields, at the top level (e.g. "
        "{\"num_hidden_layers\": 2, \"n_routed_experts\": 8}) or in a 'moe' dict; hidden_size sets both; 'moe': "
        "null makes every layer dense; an unknown field is refused (in a --config file only)", flag=None
    )  # fmt: skip
    init_from: str | None = option(
        None, "start from this HF-format checkpoint's model and tokenizer.json (e.g. an upcycled model); the model's "
        "shape comes from it", metavar="DIR"
    )  # fmt: skip
    layers: int | None = option(None, "override the preset's number of layers")
    hidden_size: int | None = option(None, "override the preset's hidden size (and its MoE layers')", flag="--hidden")
    sparse_attention: str | None = option(
        None, "dsa: give every MLA layer DeepSeek-V3.2's lightning indexer (DSA; model_type deepseek_v32): each token "
        "attends to the indexer's top --index-topk keys, the indexer trained by its KL to the main attention (MLA "
        "presets with query compression, q_lora_rank); nsa: Native Sparse Attention on every MLA layer (new models: "
        "compressed, selected and sliding-window branches with per-head gates; block sizes from the preset or "
        "model_overrides' nsa_* fields, else l=16, d=8, l'=16, n=4, w=32)", choices=SPARSE_ATTENTION
    )  # fmt: skip
    index_topk: int | None = option(
        None, "DSA: keys each token attends to (default: the preset's; needed when it has none); below --seq-len",
        minimum=1, metavar="K"
    )  # fmt: skip
    indexer_warmup: int = option(
        0, "DSA: steps of dense warm-up first, in which attention stays dense and only the indexers train (on their "
        "KL to the main attention); then sparse training", metavar="N"
    )  # fmt: skip
    indexer_loss_weight: float = option(1.0, "DSA: weight of the indexers' KL in the loss (it trains them alone)")
    bias_update_speed: float | None = option(
        None, "γ of aux-loss-free balancing, b_i += γ·sign(mean load − load_i) (default: the model's)"
    )  # fmt: skip
    fp8_experts: bool = option(
        False, "routed experts' products in fine-grained FP8, simulated on the CPU (the report gets the per-layer "
        "FP8 error of the final model)"
    )  # fmt: skip
    expert_parallel: int = option(
        1, "E: split each MoE layer's routed experts over E ranks (all-to-all dispatch); E divides the ranks "
        "torchrun launches and every layer's routed experts", minimum=1, metavar="E"
    )  # fmt: skip
    data_parallel: str = option(
        "fsdp", "with several ranks (torchrun): fsdp shards every weight and its optimizer state over the ranks "
        "(FSDP2; the experts over their W/E copies); replicate keeps whole copies and all-reduces the gradients",
        choices=DATA_PARALLEL
    )  # fmt: skip
    activation_checkpointing: bool = option(
        False, "recompute each block's activations in the backward pass (less memory, about one more forward)"
    )  # fmt: skip
    lora_rank: int | None = option(
        None, "LoRA: train only rank-R adapters W + (α/R)·B·A on --lora-targets, every other weight (and the routers' "
        "selection bias) frozen; checkpoints hold the unchanged base and the adapter in PEFT's format (adapter/)",
        minimum=1, metavar="R"
    )  # fmt: skip
    lora_alpha: float | None = option(None, "LoRA: α (default: the rank, so α/R = 1)", metavar="ALPHA")
    lora_targets: str = option(
        "experts", "LoRA: comma-separated, of experts (per-expert adapters on the routed experts' stacked tensors) "
        "and attention (the attention projections)", metavar="TARGETS"
    )  # fmt: skip
    peak_tflops: float | None = option(
        None, "peak TFLOP/s of one device for the MFU in the log and report (default: the dense bf16 peak of a "
        "known GPU, e.g. 989 for an H100/H200; none on a CPU)", metavar="TFLOPS"
    )  # fmt: skip
    progress: bool = option(True, "progress bar")

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            check(self, False, name, allowed)

        if isinstance(self.data, (list, tuple)):  # one entry is the path itself; several are a mixture
            if not self.data or not all(isinstance(d, (str, os.PathLike)) for d in self.data):
                fail("data", "must be a path, a list of PATH[:WEIGHT] entries, or None")
            self.data = os.fspath(self.data[0]) if len(self.data) == 1 else [os.fspath(d) for d in self.data]
        for name in ("data", "init_from"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike, list)):
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
        if self.data_parallel not in DATA_PARALLEL:
            fail("data_parallel", f"must be one of {', '.join(DATA_PARALLEL)}")
        if self.seq_len < 2:
            fail("seq_len", "must be >= 2 (a sequence predicts its next tokens)")
        if self.sparse_attention is not None and self.sparse_attention not in SPARSE_ATTENTION:
            fail("sparse_attention", f"must be None or one of {', '.join(SPARSE_ATTENTION)}")
        if self.sparse_attention == "nsa" and self.init_from is not None:
            fail("sparse_attention", "'nsa' trains new models (its compression MLP and gates start from scratch); "
                 "it cannot be added to init_from's checkpoint")  # fmt: skip
        if self.index_topk is not None and (not is_int(self.index_topk) or self.index_topk < 1):
            fail("index_topk", "must be None or an integer >= 1")
        if self.index_topk is not None and self.index_topk >= self.seq_len:
            fail("index_topk", f"must be below seq_len={self.seq_len}: with k >= the sequence every token attends to "
                 "all its keys, and sparse training is dense")  # fmt: skip
        if not is_real(self.indexer_loss_weight) or self.indexer_loss_weight < 0:
            fail("indexer_loss_weight", "must be a finite number >= 0")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "seed",
                     "indexer_warmup"):  # fmt: skip
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be an integer >= 0")
        if self.final_eval_batches is not None and (not is_int(self.final_eval_batches) or self.final_eval_batches < 0):
            fail("final_eval_batches", "must be None or an integer >= 0")
        for name in ("schedule_steps", "layers", "hidden_size"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                fail(name, "must be None or an integer >= 1")
        if self.bias_update_speed is not None and (not is_real(self.bias_update_speed) or self.bias_update_speed < 0):
            fail("bias_update_speed", "must be None or a finite number >= 0")
        if self.peak_tflops is not None and (not is_real(self.peak_tflops) or not self.peak_tflops > 0):
            fail("peak_tflops", "must be a number > 0 (the TFLOP/s of one device)")
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
        self._check_lora(fail)

    def _check_lora(self, fail: Any) -> None:
        if self.lora_rank is not None and (not is_int(self.lora_rank) or self.lora_rank < 1):
            fail("lora_rank", "must be None or an integer >= 1")
        if self.lora_alpha is not None and (not is_real(self.lora_alpha) or not self.lora_alpha > 0):
            fail("lora_alpha", "must be None or a finite number > 0")
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else None
        if targets is None or not targets or not set(targets) <= set(LORA_TARGETS):
            fail("lora_targets", f"must be comma-separated names among {', '.join(LORA_TARGETS)}")
        if self.lora_rank is None:
            for name, unset in (("lora_alpha", None), ("lora_targets", "experts")):
                if getattr(self, name) != unset:
                    fail(name, "needs lora_rank (LoRA is off without it)")
        elif self.indexer_warmup:
            fail("indexer_warmup", "trains the full indexers, which LoRA (lora_rank) keeps frozen")

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


_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(DeepSeekConfig))
_MOE_FIELDS = frozenset(f.name for f in dataclasses.fields(MoEConfig))


def _apply_model_overrides(fields: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Put `TrainConfig.model_overrides` into a preset's `DeepSeekConfig.to_dict()`: DeepSeekConfig fields and
    MoEConfig fields at the top level or under "moe"; ValueError naming an unknown field."""

    def moe_fields(name: str) -> dict[str, Any]:
        if not fields.get("moe"):
            raise ValueError(f"TrainConfig.model_overrides.{name} is invalid: the model has no MoE layers (moe=null)")
        return fields["moe"]

    for name, value in overrides.items():
        if name == "moe" and isinstance(value, dict):
            unknown = sorted(set(value) - _MOE_FIELDS)
            if unknown:
                raise ValueError(f"TrainConfig.model_overrides.moe.{unknown[0]} is not a MoEConfig field")
            fields["moe"] = {**(fields.get("moe") or {}), **value}
        elif name in _MODEL_FIELDS:
            fields[name] = value
            if name == "hidden_size" and fields.get("moe"):
                fields["moe"]["hidden_size"] = value
        elif name in _MOE_FIELDS:
            moe_fields(name)[name] = value
        else:
            raise ValueError(f"TrainConfig.model_overrides.{name} is not a DeepSeekConfig or MoEConfig field")


def add_indexer(fields: dict[str, Any], config: TrainConfig) -> None:
    """`sparse_attention="dsa"` and `index_topk` on a preset's (or init_from's) config fields: model_type
    deepseek_v32 with the indexer's shape kept where the config (or model_overrides) has one, else
    D = 2·qk_rope_head_dim and H^I = n_h / 2 (V3.2's 128 and 64 on V3's shapes); ValueError naming the option for
    MHA, no q_lora_rank, or no k."""
    name = f"preset {config.preset!r}" if config.init_from is None else f"init_from={os.fspath(config.init_from)!r}"
    if config.sparse_attention == "dsa":
        if fields.get("attention_type") != "mla":
            raise ValueError(
                f"TrainConfig.sparse_attention='dsa' is invalid: {name} uses multi-head attention (MHA), and DSA's "
                "lightning indexer works on MLA with query compression (q_lora_rank): use an MLA preset such as "
                "tiny-v3"
            )
        if fields.get("q_lora_rank") is None:
            raise ValueError(
                f"TrainConfig.sparse_attention='dsa' is invalid: {name} has no query compression (q_lora_rank=None), "
                "and DSA's lightning indexer reads MLA's compressed query: use a preset with q_lora_rank such as "
                "tiny-v3, or set model_overrides.q_lora_rank"
            )
        fields["model_type"] = "deepseek_v32"  # V3's architecture plus the indexer (V2 routing: save warns)
        if fields.get("index_head_dim") is None:
            fields["index_head_dim"] = 2 * fields["qk_rope_head_dim"]
        if fields.get("index_n_heads") is None:
            fields["index_n_heads"] = max(1, fields["num_attention_heads"] // 2)
    elif config.index_topk is not None and fields.get("model_type") != "deepseek_v32":
        raise ValueError(
            f"TrainConfig.index_topk={config.index_topk} is invalid: {name} has no lightning indexer; add one with "
            "TrainConfig.sparse_attention='dsa'"
        )
    if config.index_topk is not None:
        fields["index_topk"] = config.index_topk
    if fields.get("model_type") == "deepseek_v32" and fields.get("index_topk") is None:
        raise ValueError(
            f"TrainConfig.index_topk is needed with TrainConfig.sparse_attention='dsa': {name} has no index_topk (the "
            "keys each token attends to)"
        )
    if config.sparse_attention == "dsa" and fields["index_topk"] >= config.seq_len:
        raise ValueError(
            f"TrainConfig.sparse_attention='dsa' is invalid: {name}'s index_topk={fields['index_topk']} is not below "
            f"TrainConfig.seq_len={config.seq_len}, so sparse training would be dense; give TrainConfig.index_topk"
        )


def add_native_sparse_attention(fields: dict[str, Any], config: TrainConfig) -> None:
    """`sparse_attention="nsa"` on a preset's config fields: the nsa_* fields the preset or model_overrides set,
    the others from `NSA_DEFAULTS`; ValueError naming the option for MHA or when the selection alone would cover
    every token of seq_len (sparse training would be dense)."""
    if config.sparse_attention != "nsa":
        return
    name = f"preset {config.preset!r}"
    if fields.get("attention_type") != "mla":
        raise ValueError(
            f"TrainConfig.sparse_attention='nsa' is invalid: {name} uses multi-head attention (MHA), and deepmoe's "
            "NSA compresses MLA's latents: use an MLA preset such as tiny-v3"
        )
    for key, value in NSA_DEFAULTS.items():
        if fields.get(key) is None:
            fields[key] = value
    covered = fields["nsa_select_count"] * fields["nsa_select_block"]
    if covered >= config.seq_len:
        raise ValueError(
            f"TrainConfig.sparse_attention='nsa' is invalid: nsa_select_count × nsa_select_block = {covered} is not "
            f"below TrainConfig.seq_len={config.seq_len}, so every token would be selected and training dense; set "
            "smaller nsa_* fields in model_overrides or a longer seq_len"
        )


def build_model_config(config: TrainConfig, vocab_size: int, eot_id: int | None = None) -> DeepSeekConfig:
    """The preset's config with the tokenizer's vocab_size and the run's model overrides."""
    fields = get_preset(config.preset).to_dict()
    _apply_model_overrides(fields, config.model_overrides or {})
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
    add_indexer(fields, config)
    add_native_sparse_attention(fields, config)
    if config.bias_update_speed is not None and fields.get("moe"):
        fields["moe"]["bias_update_speed"] = config.bias_update_speed
    if fields.get("moe"):
        fields["moe"]["fp8_experts"] = config.fp8_experts
    try:
        model_config = DeepSeekConfig.from_dict(fields)
    except (TypeError, ValueError) as error:  # one line naming the field, without the MoEConfig's repr
        message = re.sub(r"=MoEConfig\(.*\) is invalid", " is invalid", str(error).splitlines()[0])
        raise ValueError(f"TrainConfig.model_overrides: {message}") from None
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"TrainConfig.seq_len={config.seq_len} is invalid: preset {config.preset!r} allows at most "
            f"max_position_embeddings={model_config.max_position_embeddings}"
        )
    return model_config


def build_optimizer(
    model: torch.nn.Module | Iterable[torch.nn.Parameter],
    config: TrainConfig | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the parameters of `model` that require gradients (`model` a module, or the parameters
    themselves: the filter, e.g. ESFT's selected expert slices); weight decay on matrices (dim >= 2), none
    on norms and other vectors. The hyper-parameters are `config`'s (the learning rate of step 0), each
    replaced by its keyword when given; without `config` all four keywords are needed."""
    if config is not None:
        lr = lr_at(0, config) if lr is None else lr
        weight_decay = config.weight_decay if weight_decay is None else weight_decay
        betas = (config.beta1, config.beta2) if betas is None else betas
        eps = config.eps if eps is None else eps
    if lr is None or weight_decay is None or betas is None or eps is None:
        raise TypeError("build_optimizer needs a TrainConfig or all of lr, weight_decay, betas and eps")
    params = list(model.parameters() if isinstance(model, torch.nn.Module) else model)
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    rest = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # PyTorch's fused kernel (one pass over each tensor instead of a dozen) for plain CPU/CUDA tensors; the
    # sharded DTensors of a distributed run take the default (foreach) implementation
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for p in decay + rest)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused or None)
