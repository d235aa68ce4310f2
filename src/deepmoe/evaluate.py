"""Evaluating a model, one implementation for every caller (the trainer, ESFT, steering, the study):
the held-out next-token loss with the expert loads it routed, and how far the routed experts'
fine-grained FP8 products are from exact, layer by layer.

FP8 error:

The model runs once on `input_ids`; each MoE layer's routed-experts inputs (rows sorted by expert,
tokens per expert, gate weight per row) are captured and the experts' output is recomputed from
them three ways: in float64 (the reference), with FP8 products (`RoutedExperts.fp8`, float32
otherwise) and in bfloat16 (weights and rows cast, no FP8). The errors are relative Frobenius
norms against the reference, so the FP8 error is seen next to that of plain bf16 training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deepmoe.data.prepared import IGNORE_INDEX, split_batch
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe.experts import RoutedExperts


@dataclass
class Evaluation:
    """Sums of a held-out pass: `loss_sum` nats over `tokens` predicted tokens, the routed slots per
    expert (`load`, per MoE layer index), so that several processes' sums add up."""

    loss_sum: float = 0.0
    tokens: int = 0
    load: dict[int, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Mean next-token loss (nats per predicted token); NaN when there was nothing to predict."""
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


@torch.no_grad()
def evaluate(
    model: DeepSeekForCausalLM,
    batches: Iterable[Tensor],
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    share: Callable[[Tensor], tuple[Tensor, bool]] | None = None,
) -> Evaluation:
    """The next-token loss (lm loss only, no MTP) of `model` over `batches` ([B, S] ids each, or
    `LabeledBatch`es whose -100 labels do not count) in eval mode,
    and the expert loads. `share(batch)` gives this process's part of a batch and whether it counts (an
    expert-parallel trainer's split); the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result = Evaluation()
    try:
        for batch in batches:
            batch, counted = share(batch) if share is not None else (batch, True)
            input_ids, labels = split_batch(batch)
            if input_ids.shape[1] < 2:
                continue
            n = int((labels[:, 1:] != IGNORE_INDEX).sum()) * int(counted)  # the predicted tokens that count
            with autocast():
                out = model(input_ids.to(device), labels=labels.to(device), output_mtp=False)
            if n:  # a batch whose labels are all ignored has a NaN mean loss and no weight
                result.loss_sum += float(out.lm_loss.float()) * n
            result.tokens += n
            for idx, s in out.routing_stats.items():
                result.load[idx] = result.load.get(idx, 0) + s.tokens_per_expert.to("cpu") * int(counted)
    finally:
        model.train(was_training)
    return result


def heldout_loss(model: DeepSeekForCausalLM, batches: Iterable[Tensor]) -> float:
    """Mean next-token loss (nats per predicted token) of `model` over `batches`; ValueError when no
    sequence has 2 tokens."""
    result = evaluate(model, batches)
    if result.tokens == 0:
        raise ValueError("no tokens to evaluate on (sequences need at least 2 tokens)")
    return result.loss


def _relative_error(out: Tensor, ref: Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _experts_output(experts: RoutedExperts, inputs: tuple, dtype: torch.dtype, fp8: bool) -> Tensor:
    """The experts' output on `inputs` = (rows, tokens_per_expert, row_weight), computed by a copy of
    `experts` in `dtype` (or by `experts` itself with FP8 products when `fp8`)."""
    rows, tokens_per_expert, row_weight = inputs
    if fp8:
        module, previous = experts, experts.fp8
        experts.fp8 = True
    else:
        module, previous = copy.deepcopy(experts).to(dtype), None
        module.fp8 = False
    try:
        weight = None if row_weight is None else row_weight.to(dtype)
        return module(rows.to(dtype), tokens_per_expert, weight)
    finally:
        if fp8:
            experts.fp8 = previous


@torch.no_grad()
def fp8_error_per_layer(model: DeepSeekForCausalLM, input_ids: Tensor) -> dict[int, dict[str, float]]:
    """Per MoE layer index (MTP blocks included): {"fp8": e_fp8, "bf16": e_bf16, "fp8_over_bf16": ratio},
    e = ‖out − out_float64‖_F / ‖out_float64‖_F of the routed experts' output on `input_ids`.

    The model must have float32 weights; it runs in eval mode without autocast, and its training
    mode and every expert's `fp8` flag are left as they were.
    """
    layers = model.moe_layers()
    for idx, layer in layers.items():
        if (dtype := layer.experts.gate_up_proj.dtype) != torch.float32:
            raise ValueError(f"fp8_error_per_layer needs float32 weights; MoE layer {idx} has {dtype}")
    captured: dict[int, tuple] = {}

    def capture(idx: int):
        def hook(module, args, output):  # args: rows, tokens_per_expert[, row_weight]
            captured[idx] = (*args, None)[:3]

        return hook

    handles = [layer.experts.register_forward_hook(capture(idx)) for idx, layer in layers.items()]
    was_training = model.training
    model.eval()
    device = input_ids.device.type
    try:
        with torch.autocast(device, enabled=False):
            model(input_ids, output_mtp=True)
            errors = {}
            for idx in sorted(captured):
                experts, inputs = layers[idx].experts, captured[idx]
                ref = _experts_output(experts, inputs, torch.float64, fp8=False)
                fp8 = _relative_error(_experts_output(experts, inputs, torch.float32, fp8=True), ref)
                bf16 = _relative_error(_experts_output(experts, inputs, torch.bfloat16, fp8=False), ref)
                errors[idx] = {"fp8": fp8, "bf16": bf16, "fp8_over_bf16": fp8 / bf16 if bf16 > 0 else float("inf")}
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return errors
