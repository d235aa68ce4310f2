"""Expert-specialised fine-tuning (docs/design.md#s3-expert-specialised-fine-tuning;
Wang et al. 2024, "Let the Expert Stick to His Last: Expert-
Specialized Fine-Tuning for Sparse Architectural Large Language Models", DeepSeek's ESFT).

1. Score the routed experts of every MoE layer on task data (`collect_routing` over a slice of it), with
   one of ESFT's two relevance scores (paper §3.2), T = tokens seen, K = experts per token, g_i,t = the
   gate weight of expert i for token t as the router returns it, i.e. the weight its output is multiplied
   by (after the top-K normalisation and routed_scaling_factor; 0 when i is not among the token's top K):

   - average gate score ("gate"):  g_i = (1/T) Σ_t g_i,t, the raw average, NOT normalised over the layer.
     A layer's scores sum to the mean total gate weight per token: 1 with normalised top-K weights,
     routed_scaling_factor with V3's scaling (2.5 on tiny-v3), about 0.26-0.53 on DeepSeek-V2-Lite whose
     top-6 softmax weights are not normalised.
   - token selection ratio ("token"): r_i = (1/(T·K)) Σ_t 1[i ∈ TopK_t], which sums to 1.

   The paper averages over the tokens of each sample, then over samples; the windows scored here all have
   the same length, so that is the same as (1/T) Σ_t. The authors' published scores (deepseek-ai/ESFT,
   results/expert_scores/*/summary.json) are these raw averages: gate layer sums 0.26-0.53, token sums 1.
   (Their scripts/expert/generate_expert_config.py divides by np.sum(..., axis=0), a sum over layers,
   which does not reproduce those files; the weights are those DeepSeek-V2's MoEGate returns, which for
   V2-Lite, norm_topk_prob=False and routed_scaling_factor=1, are the top-6 softmax probabilities.)

2. Select per layer the smallest set of experts, taken by decreasing score (ties: lower index first), whose
   summed score reaches p: Σ ≥ p on the raw scores above, not on shares of the layer's total
   (`select_experts`); a layer whose total is below p gets every expert. This is the paper's rule and
   the authors' scripts/expert/generate_expert_config.py loop, so p means a share of the layer's expert
   choices for "token" (0 < p <= 1) but gate weight for "gate" (a V2-Lite layer never reaches p = 0.6).

3. Fine-tune only those experts' slices of the stacked expert tensors (`esft_finetune`: the AdamW and the
   step of `deepmoe train`, `deepmoe.train.step.optimizer_step`, on the next-token loss); attention,
   embeddings, norms, head, routers (weights and selection bias), shared experts, dense FFNs, MTP modules
   and the unselected experts are frozen and stay bit-identical. The selected slices live in their own
   parameters during training (a parametrisation writes them into a copy of the stacked tensor on each
   forward), so the optimiser, its state and its weight decay never see anything else.

4. Save only those slices as a delta (`deepmoe.io.delta.save_delta`), applied to the base checkpoint by
   `apply_delta` / `from_pretrained(..., delta=...)`.

`esft` is the `deepmoe esft` command's work: it also measures the task loss before and after on held-out task
tokens and, with `--compare-full`, full fine-tuning for the same steps, learning rate and batches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.nn.utils import parametrize

from deepmoe.data import (
    EOT_TOKEN,
    LabeledBatch,
    PackedBatches,
    PreparedCorpus,
    is_prepared,
    load_tokenizer,
    split_batch,
)
from deepmoe.evaluate import heldout_loss
from deepmoe.io.adapter import ADAPTER_CONFIG
from deepmoe.io.checkpoint import SafetensorsCheckpoint, checkpoint_dir
from deepmoe.io.delta import DELTA_FORMAT, DELTA_META, check_selection, delta_size, save_delta
from deepmoe.io.files import claim_directory
from deepmoe.model import from_pretrained
from deepmoe.model.lora import LoRAConfig, apply_lora, is_lora_name, merge_lora, save_adapter
from deepmoe.tools.routing import LayerRouting, collect_routing, fixed_batches, source_tokens
from deepmoe.train.config import build_optimizer
from deepmoe.train.step import NonFiniteError, optimizer_step

METHODS = ("gate", "token")


# ---- 1. scores ------------------------------------------------------------------------------------


def expert_scores(routing: Mapping[int, LayerRouting], method: str = "gate") -> dict[int, Tensor]:
    """Per MoE layer, each routed expert's ESFT relevance score [N] (float64; all 0 for a layer that saw
    no token). `method` "gate": the average gate score g_i = (1/T) Σ_t g_i,t, raw (the layer's scores sum
    to the mean total gate weight per token, e.g. routed_scaling_factor with normalised top-K weights);
    "token": the token selection ratio r_i = (tokens choosing i) / (T·K), which sums to 1. See the module
    doc: `select_experts` compares p with these values as they are."""
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is invalid: choose 'gate' (average gate score) or 'token' (selection ratio)"
        )
    out: dict[int, Tensor] = {}
    for layer, r in routing.items():
        if method == "gate":
            out[layer] = r.average_gate.double()  # (1/T) Σ_t g_i,t, not normalised (ESFT's g_i)
        else:
            value = r.counts.double()  # Σ_t 1[i ∈ TopK_t]; Σ_i of it is T·K
            total = value.sum()
            out[layer] = value / total if total > 0 else torch.zeros_like(value)
    return out


# ---- 2. selection ---------------------------------------------------------------------------------


def select_experts(scores: Mapping[int, Tensor], p: float = 0.2, tolerance: float = 1e-9) -> dict[int, list[int]]:
    """Per layer, the smallest set of experts whose summed score reaches `p` (Σ ≥ p), taken by decreasing
    score, ties broken by lower expert index; returned sorted. ESFT's rule: `p` is compared with the scores
    as given (`expert_scores`), not with shares of the layer's total, so for the token selection ratio p is
    a share of the layer's expert choices, for the average gate score an amount of gate weight.

    A layer whose scores sum to less than `p` gets every expert (zero-scored ones included), as in the
    ESFT authors' selection script; otherwise experts scoring 0 are never needed. `p` > 0 (above 1 only
    the gate score of a layer with routed_scaling_factor > 1 can reach it). `tolerance` absorbs rounding
    in the cumulative sum.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < math.inf:
        raise ValueError(f"p={p!r} is invalid: must be a finite number > 0")
    out: dict[int, list[int]] = {}
    for layer, score in scores.items():
        values = [float(v) for v in torch.as_tensor(score, dtype=torch.float64).flatten()]
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError(f"layer {layer}: scores must be finite and >= 0")
        chosen: list[int] = []
        cumulative = 0.0
        for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
            if cumulative >= p - tolerance:
                break
            chosen.append(i)
            cumulative += values[i]
        out[layer] = sorted(chosen)
    return out


# ---- 3. training ----------------------------------------------------------------------------------


class _SelectedExperts(nn.Module):
    """Parametrisation of a stacked expert tensor [E, ...]: the frozen tensor with the rows `index`
    replaced by the trainable `rows` (a copy; the original is never written during training)."""

    def __init__(self, original: Tensor, index: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=original.device), persistent=False)
        self.rows = nn.Parameter(original.detach()[self.index].clone())

    def forward(self, original: Tensor) -> Tensor:
        return original.index_copy(0, self.index, self.rows)


def _batches(train_batches: Iterable[Tensor], steps: int) -> Iterator[Tensor]:
    """`steps` batches; a finite re-iterable (a list) is cycled, an iterator must last."""
    iterator = iter(train_batches)
    for step in range(steps):
        try:
            yield next(iterator)
        except StopIteration:
            if iterator is train_batches or step == 0:
                raise ValueError(f"train_batches ran out after {step} batches (needed {steps})") from None
            iterator = iter(train_batches)
            yield next(iterator)


def _lm_forward(model: nn.Module, batch: Tensor | LabeledBatch) -> Any:
    """The model on a batch, labels included (a `LabeledBatch`'s -100 labels do not count), no MTP."""
    input_ids, labels = split_batch(batch)
    return model(input_ids, labels=labels, output_mtp=False)


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    train_batches: Iterable[Tensor],
    steps: int,
    adamw: dict[str, Any],
    grad_clip: float | None,
    on_step: Callable[[int, float], None] | None,
    forward_context: Callable[[], Any],
) -> list[float]:
    """`steps` steps of the training step `deepmoe train` takes (`optimizer_step`, one micro-batch each)
    with its AdamW (`build_optimizer` over `params`, `adamw` its lr, weight_decay, betas, eps), on the
    next-token loss (lm loss; no balance or MTP loss: routers and MTP modules are not trained); returns the
    loss of each step. Raises ValueError on a non-finite loss or gradient norm."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    lr = adamw["lr"]
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    optimizer = build_optimizer(params, **adamw)
    device = params[0].device
    losses = []
    model.train()
    for step, batch in enumerate(_batches(train_batches, steps), start=1):
        try:
            result = optimizer_step(
                model,
                optimizer,
                [batch.to(device)],
                max_norm=grad_clip,
                loss=attrgetter("lm_loss"),
                forward=partial(_lm_forward, model),
                context=forward_context,
            )
        except NonFiniteError as err:
            raise ValueError(
                f"the {err.what} is {err.value} at step {step}: fine-tuning stopped (lower --lr?)"
            ) from err
        losses.append(result.losses[0])
        if on_step is not None:
            on_step(step, result.losses[0])
    return losses


def esft_finetune(
    model: nn.Module,
    selection: Mapping[int, list[int]],
    train_batches: Iterable[Tensor],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Fine-tune only the selected routed experts of `model` ({layer: [experts]}) in place; returns it.

    AdamW (decoupled `weight_decay`, applied to the selected slices only) on the next-token loss of
    `steps` batches ([B, S] token ids; a list is cycled). Every other tensor, and the unselected expert
    slices of the stacked expert tensors, stay bit-identical: the optimiser holds only the selected slices.
    On an error (e.g. a non-finite loss) the model is left as it was before. Training mode and the
    `requires_grad` flags are restored at the end.
    """
    config = model.config
    chosen = {layer: experts for layer, experts in check_selection(config, selection).items() if experts}
    if not chosen:
        raise ValueError("the selection holds no expert: nothing to fine-tune")
    mtp = [layer for layer in chosen if layer >= config.num_hidden_layers]
    if mtp:
        raise ValueError(
            f"selection: layer {mtp[0]} is a multi-token-prediction block, which the next-token loss that ESFT "
            "trains on does not reach"
        )
    moe_layers = model.moe_layers()
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    patched: list[tuple[nn.Module, str, _SelectedExperts]] = []
    ok = False
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer, experts in chosen.items():
            module = moe_layers[layer].experts
            for name in ("gate_up_proj", "down_proj"):
                parametrisation = _SelectedExperts(getattr(module, name), experts)
                parametrize.register_parametrization(module, name, parametrisation)
                patched.append((module, name, parametrisation))
        rows = [pt.rows for _, _, pt in patched]
        adamw = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        _train(model, rows, train_batches, steps, adamw, grad_clip, on_step, parametrize.cached)
        ok = True
    finally:
        with torch.no_grad():
            for module, name, parametrisation in patched:
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                if ok:
                    getattr(module, name).index_copy_(0, parametrisation.index, parametrisation.rows.detach())
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return model


def esft_lora_finetune(
    model: nn.Module,
    selection: Mapping[int, list[int]],
    train_batches: Iterable[Tensor],
    steps: int,
    rank: int,
    alpha: float | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """ESFT with LoRA (docs/design.md#lora-adapters): rank-`rank` adapters on the selected experts only
    (`apply_lora` with `LoRAConfig.experts=selection`: the other experts' factors stay exactly 0), trained as
    `esft_finetune` trains the slices; every base weight stays bit-identical. The model keeps its adapters
    (`deepmoe.model.lora.save_adapter` writes them, `merge_lora` folds them in); returns it."""
    config = model.config
    chosen = {layer: experts for layer, experts in check_selection(config, selection).items() if experts}
    if not chosen:
        raise ValueError("the selection holds no expert: nothing to fine-tune")
    if any(layer >= config.num_hidden_layers for layer in chosen):
        raise ValueError("selection: LoRA adapts the decoder layers' experts, not a multi-token-prediction block")
    apply_lora(model, LoRAConfig(rank=rank, alpha=alpha, targets=("experts",), experts=chosen))
    factors = [p for name, p in model.named_parameters() if is_lora_name(name)]
    adamw = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
    _train(model, factors, train_batches, steps, adamw, grad_clip, on_step, nullcontext)
    return model


def full_finetune(
    model: nn.Module,
    train_batches: Iterable[Tensor],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """The baseline: every parameter trained with the same loss, optimiser and batches as `esft_finetune`
    (weight decay on matrices only, as in `deepmoe train`). In place; returns the model."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        adamw = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        _train(model, list(model.parameters()), train_batches, steps, adamw, grad_clip, on_step, nullcontext)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return model


@torch.no_grad()
def trainable_parameters(model: nn.Module, selection: Mapping[int, list[int]]) -> int:
    """Parameters ESFT trains for `selection`: |experts| × (gate + up + down) per layer."""
    moe_layers = model.moe_layers()
    total = 0
    for layer, experts in check_selection(model.config, selection).items():
        module = moe_layers[layer].experts
        per_expert = module.gate_up_proj[0].numel() + module.down_proj[0].numel()
        total += len(experts) * per_expert
    return total


def lora_trainable_parameters(model: nn.Module, selection: Mapping[int, list[int]], rank: int) -> int:
    """Parameters ESFT with LoRA trains: |experts| × r × (H + 2I + I + H) per layer (A and B of both projections)."""
    moe_layers = model.moe_layers()
    total = 0
    for layer, experts in check_selection(model.config, selection).items():
        module = moe_layers[layer].experts
        total += len(experts) * rank * sum(sum(getattr(module, p).shape[1:]) for p in ("gate_up_proj", "down_proj"))
    return total


def routed_expert_parameters(model: nn.Module) -> int:
    return sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers().values())


# ---- 4. the command -------------------------------------------------------------------------------


def _check_arguments(
    method: str, p: float, steps: int, lr: float, weight_decay: float, grad_clip: float, batch_size: int,
    seq_len: int, score_tokens: int, eval_fraction: float, eval_tokens: int,
) -> None:  # fmt: skip
    counts = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "score_tokens": score_tokens}
    for name, value in {**counts, "eval_tokens": eval_tokens}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is invalid: choose 'gate' (average gate score) or 'token' (selection ratio)"
        )
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    if not 0.0 < p < math.inf:
        raise ValueError(f"p={p} must be a finite number > 0")
    if method == "token" and p > 1.0:
        raise ValueError(f"p={p}: token selection ratios sum to 1 in every layer, so p must be <= 1")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr={lr} must be a finite number > 0")
    if weight_decay < 0 or grad_clip < 0:
        raise ValueError("weight_decay and grad_clip must be >= 0")


def is_adapter(directory: Path) -> bool:
    """Whether `directory` is a LoRA adapter directory (its adapter_config.json), which a new one may replace."""
    try:
        return json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("peft_type") == "LORA"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def is_delta(directory: Path) -> bool:
    """Whether `directory` is an expert delta (its deepmoe delta.json), which a new delta may replace."""
    try:
        return json.loads((directory / DELTA_META).read_text(encoding="utf-8")).get("format") == DELTA_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _task_tokens(
    data: str, eval_data: str | None, eval_fraction: float, eval_tokens: int, seq_len: int, tokenizer, eot_id
) -> tuple[Tensor, Tensor]:
    """(train tokens, eval tokens) of the task: `eval_data`, or a split of `data` at a token position
    (the tail is held out; at most one document straddles the cut)."""
    tokens = source_tokens(data, tokenizer, eot_id)
    if eval_data is not None:
        train, held = tokens, source_tokens(eval_data, tokenizer, eot_id)
    else:
        n_eval = round(tokens.numel() * eval_fraction)
        train, held = tokens[: tokens.numel() - n_eval], tokens[tokens.numel() - n_eval :]
    for what, t in (("training", train), ("evaluation", held)):
        if t.numel() < seq_len + 1:
            raise ValueError(
                f"the task's {what} part has {t.numel()} tokens, fewer than one sequence of seq_len={seq_len}: "
                "give more text or a smaller seq_len"
            )
    return train, held[:eval_tokens]


@dataclass
class _Task:
    """The task data of an ESFT run: batches to score the experts on, to evaluate on, and to train on."""

    score_batches: list[Any]
    eval_batches: list[Any]
    train_batches: Callable[[int], Any]
    """seed -> endless training batches."""
    train_tokens: int
    max_id: int


def _task(data: str, eval_data: str | None, eval_fraction: float, eval_tokens: int, seq_len: int, batch_size: int,
          score_tokens: int, tokenizer) -> _Task:  # fmt: skip
    """Text (`_task_tokens`), or a prepared directory (`deepmoe data prepare`, made with the model's tokenizer;
    chat data trains on the assistant's tokens only): its train split scored and trained on, its held-out
    split evaluated on."""
    if not is_prepared(data):
        train, held = _task_tokens(
            data, eval_data, eval_fraction, eval_tokens, seq_len, tokenizer, tokenizer.token_to_id(EOT_TOKEN)
        )
        return _Task(fixed_batches(train, seq_len, batch_size, score_tokens), fixed_batches(held, seq_len, batch_size),
                     lambda seed: PackedBatches(train, batch_size, seq_len, seed), int(train.numel()),
                     int(max(train.max(), held.max())))  # fmt: skip
    if eval_data is not None:
        raise ValueError(f"{data} is prepared data: it has its own held-out split (leave out --eval-data)")
    corpus = PreparedCorpus([(data, 1.0)], tokenizer, "the model")
    score = corpus.ordered_batches("train", batch_size, seq_len, max(1, score_tokens // (batch_size * seq_len)))
    held = corpus.heldout_batches(batch_size, seq_len, max(1, eval_tokens // (batch_size * seq_len)))
    return _Task(score, held, lambda seed: corpus.batches(batch_size, seq_len, seed), corpus.train_tokens,
                 corpus.vocab_size - 1)  # fmt: skip


Progress = Callable[[str, int, int, float | None], None]
"""progress(phase, step, steps, loss): `esft` calls it with step 0 and loss None when a fine-tuning phase
("esft", then "full" with `compare_full`) starts, then after each of its `steps` steps with that step's loss."""


def esft(
    model_dir: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    *,
    method: str = "gate",
    p: float = 0.2,
    steps: int = 100,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    batch_size: int = 8,
    seq_len: int = 256,
    score_tokens: int = 32768,
    eval_data: str | None = None,
    eval_fraction: float = 0.2,
    eval_tokens: int = 65536,
    compare_full: bool = False,
    device: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> dict[str, Any]:
    """`deepmoe esft` as a function: score the routed experts of the checkpoint `model_dir` on the task text
    `data` (a file or folder, or `bundled:DOMAIN`; the first `score_tokens` tokens of its training part),
    select them (`select_experts` with `p`), fine-tune them (`esft_finetune`, `steps` AdamW steps of
    `batch_size` windows of `seq_len` tokens, in an order set by `seed`), and save the delta to `out`.
    The task loss is measured before and after on held-out tokens: `eval_data`, or the last `eval_fraction`
    of `data` (at most `eval_tokens`); with `compare_full`, also after full fine-tuning of the base model for
    the same steps, learning rate and batches (the delta stays ESFT's). `grad_clip` 0 means none.
    `tokenizer` (a `Tokenizer`, or a tokenizer.json file or its directory) replaces the checkpoint's.
    `lora_rank`: train rank-r LoRA adapters on the selected experts instead (`esft_lora_finetune`, α `lora_alpha`)
    and save them to `out` as a PEFT adapter directory (`from_pretrained(model_dir, adapter=out)` loads them).

    `out` is claimed before any work (`claim_directory`: an empty or missing directory, or an earlier delta)
    and released at the end, so a refused target costs nothing and an interrupted run leaves no delta.
    Returns the summary: selection, scores, parameter counts, delta and checkpoint sizes, losses.
    ValueError (or CheckpointError, OSError) on unusable inputs.
    """
    if lora_rank is not None:
        LoRAConfig(rank=lora_rank, alpha=lora_alpha)  # its errors before any work
    claim = (claim_directory(out, f"delta directory ({DELTA_META})", is_delta) if lora_rank is None
             else claim_directory(out, f"LoRA adapter directory ({ADAPTER_CONFIG})", is_adapter))  # fmt: skip
    with claim:
        return _esft(
            model_dir, data, out, method, p, steps, lr, weight_decay, grad_clip, batch_size, seq_len, score_tokens,
            eval_data, eval_fraction, eval_tokens, compare_full, device, seed, progress, tokenizer, lora_rank,
            lora_alpha,
        )  # fmt: skip


def _esft(
    model_dir, data, out, method, p, steps, lr, weight_decay, grad_clip, batch_size, seq_len, score_tokens,
    eval_data, eval_fraction, eval_tokens, compare_full, device, seed, progress, tokenizer=None, lora_rank=None,
    lora_alpha=None,
) -> dict[str, Any]:  # fmt: skip

    _check_arguments(
        method, p, steps, lr, weight_decay, grad_clip, batch_size, seq_len, score_tokens, eval_fraction, eval_tokens
    )
    model_dir = checkpoint_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, needed_for="ESFT (reading the task text)", tokenizer=tokenizer)
    device = _device(device)
    model = from_pretrained(model_dir, device=device)
    if model.config.moe is None:
        raise ValueError(f"{model_dir}: a dense model has no experts to fine-tune")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds max_position_embeddings={model.config.max_position_embeddings}")
    task = _task(data, eval_data, eval_fraction, eval_tokens, seq_len, batch_size, score_tokens, tokenizer)
    if task.max_id >= model.config.vocab_size:
        raise ValueError(f"the tokenizer yields ids beyond the model's vocab_size={model.config.vocab_size}")

    score_batches, eval_batches = task.score_batches, task.eval_batches
    routing = collect_routing(model, [split_batch(b)[0].to(device) for b in score_batches])
    scores = expert_scores(routing, method)
    selection = select_experts(scores, p)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_before = heldout_loss(model, eval_batches)
    results: dict[str, dict[str, Any]] = {}

    def finetune(label: str, fn: Callable[..., nn.Module], *extra: Any) -> None:
        batches = task.train_batches(seed)
        losses: list[float] = []
        if progress is not None:
            progress(label, 0, steps, None)

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            if progress is not None:
                progress(label, step, steps, loss)

        fn(
            model,
            *extra,
            batches,
            steps,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip or None,
            on_step=on_step,
        )
        results[label] = {"loss_after": heldout_loss(model, eval_batches), "train_loss_first": losses[0],
                          "train_loss_last": losses[-1]}  # fmt: skip

    if lora_rank is None:
        finetune("esft", esft_finetune, selection)
        trainable = trainable_parameters(model, selection)
    else:
        finetune("esft", partial(esft_lora_finetune, rank=lora_rank, alpha=lora_alpha), selection)
        trainable = lora_trainable_parameters(model, selection, lora_rank)
    total_params = sum(param.numel() for name, param in model.named_parameters() if not is_lora_name(name))
    training_meta = {
        "method": method, "p": p, "steps": steps, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
        "seq_len": seq_len, "data": data, "eval_data": eval_data, "base_checkpoint": str(model_dir),
        "loss_before": loss_before, "loss_after": results["esft"]["loss_after"],
    }  # fmt: skip
    if lora_rank is None:
        delta = save_delta(model, base_state, out, selection, metadata=training_meta)
    else:
        delta = save_adapter(model, out, base_model_name_or_path=str(model_dir))
        merge_lora(model)  # the plain model again (its weights are reset below for --compare-full)
    with SafetensorsCheckpoint(model_dir) as ckpt:  # the weight files only (not e.g. a saved optimiser state)
        checkpoint_bytes = sum((model_dir / f).stat().st_size for f in set(ckpt.weight_map.values()))
    summary: dict[str, Any] = {
        "model": str(model_dir),
        "delta": str(delta),
        "method": method,
        "p": p,
        "steps": steps,
        "lr": lr,
        "train_tokens": task.train_tokens,
        "eval_tokens": int(sum(split_batch(b)[0].numel() for b in eval_batches)),
        "score_tokens": int(sum(split_batch(b)[0].numel() for b in score_batches)),
        "selection": {str(k): v for k, v in selection.items()},
        "selected_score": {str(k): float(scores[k][v].sum()) if v else 0.0 for k, v in selection.items()},
        "layer_score": {str(k): float(scores[k].sum()) for k in selection},
        "selected_share": {
            str(k): float(scores[k][v].sum() / scores[k].sum()) if v and scores[k].sum() > 0 else 0.0
            for k, v in selection.items()
        },
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "routed_expert_parameters": routed_expert_parameters(model),
        "delta_bytes": delta_size(delta),
        "checkpoint_bytes": checkpoint_bytes,
        "loss_before": loss_before,
        "loss_after_esft": results["esft"]["loss_after"],
        "lora_rank": lora_rank,
    }
    if compare_full:
        model.load_state_dict(base_state)
        finetune("full", full_finetune)
        summary["loss_after_full"] = results["full"]["loss_after"]
        summary["full_trainable_parameters"] = total_params
    return summary


__all__ = [
    "METHODS",
    "esft",
    "esft_finetune",
    "esft_lora_finetune",
    "expert_scores",
    "full_finetune",
    "is_delta",
    "select_experts",
    "trainable_parameters",
]
