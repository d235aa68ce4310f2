"""One optimizer step over a list of micro-batches: the training step that `deepmoe train` (`trainer`) and
expert-specialised fine-tuning (`deepmoe.tools.esft`) share.

    zero the gradients -> per micro-batch: forward (under `context`), loss, finite check, backward of
    loss / (number of micro-batches) -> `grad_hook` -> global-norm clipping -> finite check -> optimizer.step

The callers differ only in what they pass: the loss (the trainer's `out.loss` with the aux and MTP losses,
ESFT's `out.lm_loss`), the forward context (bf16 autocast; ESFT's `parametrize.cached`), the parameters
(the optimizer's: ESFT's holds only the selected expert slices), and for expert parallelism the hooks that
average the loss over the ranks, sync the gradients and clip over the sharded model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn

from deepmoe.parallel.gradients import clip_grad_norm_


class NonFiniteError(ArithmeticError):
    """A non-finite loss (raised before its backward) or gradient norm (raised before the update): the
    parameters and the optimizer's state are untouched (the gradients are not). The caller words its own
    message from `what` ("loss" or "gradient norm"), `value` and, for a loss, `micro` (1-based) of `count`."""

    def __init__(self, what: str, value: float, micro: int | None = None, count: int | None = None):
        self.what, self.value, self.micro, self.count = what, value, micro, count
        where = f" (micro-batch {micro} of {count})" if micro is not None else ""
        super().__init__(f"the {what} is {value}{where}")


@dataclass
class StepResult:
    losses: list[float]
    """Each micro-batch's loss (after `reduce`), unscaled."""
    collected: list[Any]
    """`collect(output)` of each micro-batch (empty without `collect`)."""
    grad_norm: float
    """The global gradient norm before clipping."""


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Tensor],
    *,
    max_norm: float | None = None,
    loss: Callable[[Any], Tensor] = attrgetter("loss"),
    forward: Callable[[Tensor], Any] | None = None,
    context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    reduce: Callable[[float], float] | None = None,
    collect: Callable[[Any], Any] | None = None,
    grad_hook: Callable[[], None] | None = None,
    clip: Callable[[float], float] | None = None,
    before_update: Callable[[], None] | None = None,
) -> StepResult:
    """One optimizer step of `optimizer` (its learning rate as set) on the mean loss of `micro_batches`.

    - `forward(batch)` (default `model(batch, labels=batch)`) runs under `context()`; `loss(output)` is the
      scalar trained on (default `output.loss`), taken in float32 and backpropagated divided by the number
      of micro-batches. Its value, through `reduce` (e.g. the mean over expert-parallel ranks), must be
      finite, else `NonFiniteError`; `collect(output)` is kept per micro-batch (the output itself is not).
    - `grad_hook()` runs after the last backward, before clipping (gradient sync, gradient masks).
    - `clip(max_norm)` clips and returns the norm before clipping; by default `clip_grad_norm_` over the
      optimizer's parameters in the model's order. `max_norm` None or <= 0: no clipping (the norm is still
      measured). A non-finite norm raises `NonFiniteError`; then `before_update()`, and `optimizer.step()`.

    Parameters the optimizer does not hold are never written: that is the parameter filter (ESFT's).
    A forward pass's own errors (ValueError on bad inputs) propagate unchanged.
    """
    count = len(micro_batches)
    if count < 1:
        raise ValueError("optimizer_step needs at least one micro-batch")
    limit = max_norm if max_norm is not None and max_norm > 0 else math.inf
    optimizer.zero_grad(set_to_none=True)
    losses: list[float] = []
    collected: list[Any] = []
    for micro, batch in enumerate(micro_batches, start=1):
        with context():
            output = model(batch, labels=batch) if forward is None else forward(batch)
        value_t = loss(output).float()
        value = value_t.item()
        if reduce is not None:
            value = reduce(value)
        if not math.isfinite(value):
            raise NonFiniteError("loss", value, micro, count)
        (value_t / count).backward()
        losses.append(value)
        if collect is not None:
            collected.append(collect(output))
        del output, value_t
    if grad_hook is not None:
        grad_hook()
    grad_norm = _clip_held(model, optimizer, limit) if clip is None else clip(limit)
    if not math.isfinite(grad_norm):
        raise NonFiniteError("gradient norm", grad_norm)
    if before_update is not None:
        before_update()
    optimizer.step()
    return StepResult(losses, collected, grad_norm)


def _clip_held(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """`clip_grad_norm_` (torch's; over DTensors of several meshes for a sharded model) over the parameters
    `optimizer` holds, in the order of `model.parameters()` (the
    norm's summation order; others after them)."""
    held = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    ordered = [p for p in model.parameters() if held.pop(id(p), None) is not None]
    return clip_grad_norm_(ordered + list(held.values()), max_norm)


__all__ = ["NonFiniteError", "StepResult", "optimizer_step"]
