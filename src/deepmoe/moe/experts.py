"""Expert FFNs (DeepSeekMoE §3.1–3.2; docs/design.md, E1–E3): a dense SwiGLU and the stacked routed experts.

Routed experts are stored as HF's `DeepseekV3Experts` stores them:
`gate_up_proj` [N_r, 2I, H] (gate rows first) and `down_proj` [N_r, H, I].
They compute on tokens already sorted by expert, with one grouped matrix
product per projection (`torch.nn.functional.grouped_mm` / `torch._grouped_mm`),
or a loop over the experts' contiguous slices where that kernel is missing.

The product is the custom operator `torch.ops.deepmoe.grouped_mm` (with its own backward): what it does
inside (kernel or loop, the alignment check, the loop's group sizes read on the host) is opaque to
`torch.compile` and `torch.func`, which only see a [S, in] × [G, in, out] → [S, out] product. So the layer
compiles with fullgraph=True for every dtype, and `torch.func.grad` works. Under compilation, bfloat16 calls
torch's grouped product directly (the only dtype its compiler kernel takes), so that Inductor can lower it.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from deepmoe.moe.fp8 import fp8_grouped_matmul

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)), HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def reset_parameters(self) -> None:
        """nn.Linear's init of the three projections, in the constructor's order (same seed, same values)."""
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            proj.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.swiglu_limit))


def swiglu(gate: Tensor, up: Tensor, limit: float | None = None) -> Tensor:
    """silu(gate) · up; with V4's `limit`, silu(min(gate, limit)) · clamp(up, −limit, limit)."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


@cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build has a working grouped product for (device, dtype)."""
    if _GROUPED_MM is None:
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        out = _GROUPED_MM(a, b, offs=torch.tensor([2, 4], dtype=torch.int32, device=device_type))
        return bool((out == 8).all())
    except (RuntimeError, NotImplementedError):
        return False


def _aligned(t: Tensor) -> bool:
    """Grouped kernels want 16-byte aligned rows and storage (`t` a real tensor)."""
    return t.data_ptr() % 16 == 0 and _strides_aligned(t)


def _strides_aligned(t: Tensor) -> bool:
    """16-byte aligned rows: what can be checked of a traced (fake) tensor."""
    size = t.element_size()
    return all(s * size % 16 == 0 for s in t.stride() if s != 1)


def _bounds(offsets: Tensor) -> list[int]:
    """[0, offsets...] on the host (a device→host copy: only the loops, inside the operators, read it)."""
    return [0, *offsets.tolist()]


def _grouped_matmul_eager(x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
    if use_kernel and grouped_mm_available(x.device.type, x.dtype) and _aligned(x) and _aligned(weight):
        return _GROUPED_MM(x, weight, offs=offsets)
    bounds = _bounds(offsets)
    out = x.new_empty(x.shape[0], weight.shape[-1])
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if b > a:
            torch.matmul(x[a:b], weight[g], out=out[a:b])
    return out


@torch.library.custom_op("deepmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
    """x [S, in] sorted by group, weight [G, in, out], offsets [G] int32 (offsets[-1] == S) → [S, out]."""
    return _grouped_matmul_eager(x, weight, offsets, use_kernel)


@_grouped_mm_op.register_fake
def _(x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("deepmoe::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x: Tensor, grad: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
    """The weight gradient of `grouped_mm`: [G, in, out], group g = x[rows of g]ᵀ @ grad[rows of g]."""
    xt = x.t()
    if use_kernel and grouped_mm_available(x.device.type, x.dtype) and _aligned(xt) and _aligned(grad):
        return _GROUPED_MM(xt, grad, offs=offsets)
    bounds = _bounds(offsets)
    out = grad.new_zeros(offsets.shape[0], x.shape[1], grad.shape[1])
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if b > a:
            torch.matmul(xt[:, a:b], grad[a:b], out=out[g])
    return out


@_weight_grad_op.register_fake
def _(x: Tensor, grad: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
    return grad.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


class _GroupedMatMul(torch.autograd.Function):
    """Autograd of `grouped_mm` (forward, setup_context and backward apart, as `torch.func` needs; the
    operators' own autograd wrapper does not work under `torch.func.grad`)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
        return _grouped_mm_op(x, weight, offsets, use_kernel)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, offsets, use_kernel = inputs
        ctx.save_for_backward(x, weight, offsets)
        ctx.use_kernel = use_kernel

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _GroupedMatMul.apply(grad, weight.transpose(1, 2), offsets, ctx.use_kernel)
        if ctx.needs_input_grad[1]:
            if weight.transpose(1, 2).is_contiguous():  # a transposed parameter ([G, out, in] in memory, as the
                # experts' are): its gradient in that layout, gradᵀ·x, so autograd hands it on without a copy
                grad_w = _GroupedWeightGrad.apply(grad, x, offsets, ctx.use_kernel).transpose(1, 2)
            else:
                grad_w = _GroupedWeightGrad.apply(x, grad, offsets, ctx.use_kernel)
        return grad_x, grad_w, None, None


class _GroupedWeightGrad(torch.autograd.Function):
    """Autograd of `grouped_mm_weight_grad` (double backward, and `torch.func` calling it in a backward)."""

    @staticmethod
    def forward(x: Tensor, grad: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
        return _weight_grad_op(x, grad, offsets, use_kernel)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, grad, offsets, use_kernel = inputs
        ctx.save_for_backward(x, grad, offsets)
        ctx.use_kernel = use_kernel

    @staticmethod
    def backward(ctx, dw: Tensor):
        x, grad, offsets = ctx.saved_tensors
        d_x = d_grad = None
        if ctx.needs_input_grad[0]:  # w_g = x_gᵀ grad_g: d x_g = grad_g dw_gᵀ
            d_x = _GroupedMatMul.apply(grad, dw.transpose(1, 2), offsets, ctx.use_kernel)
        if ctx.needs_input_grad[1]:  # d grad_g = x_g dw_g
            d_grad = _GroupedMatMul.apply(x, dw, offsets, ctx.use_kernel)
        return d_x, d_grad, None, None


@torch.compiler.assume_constant_result
def _compiler_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether compiled code may call torch's grouped product itself: its compiler (fake) kernel takes bf16 only."""
    return dtype == torch.bfloat16 and grouped_mm_available(device_type, dtype)


def grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
    """y[rows of group g] = x[rows of group g] @ weight[g].

    x [S, in], weight [G, in, out], offsets [G] int32 = cumulative rows (offsets[-1] == S). `use_kernel`: take
    the grouped kernel where this build has it for (device, dtype) and the operands are aligned; else (or
    with False) one product per group, whose sizes are read on the host.
    """
    if use_kernel and torch.compiler.is_compiling() and _compiler_kernel(x.device.type, x.dtype):
        # traced tensors have no address: the experts pass fresh activations and (views of) whole parameters
        if _strides_aligned(x) and _strides_aligned(weight):
            return _GROUPED_MM(x, weight, offs=offsets)
    return _GroupedMatMul.apply(x, weight, offsets, use_kernel)


def _local(weight: Tensor) -> Tensor:
    """This rank's experts of an expert-parallel weight (a DTensor sharded over the expert-parallel ranks,
    `deepmoe.parallel.parallelize`); any other tensor as it is."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class RoutedExperts(nn.Module):
    """N_r SwiGLU experts of width I, computed on expert-sorted tokens."""

    def __init__(
        self,
        n_experts: int,
        hidden_size: int,
        intermediate_size: int,
        implementation: str = "auto",
        fp8: bool = False,
        swiglu_limit: float | None = None,
    ):
        super().__init__()
        self.n_experts = n_experts
        self.swiglu_limit = swiglu_limit
        self.implementation = implementation
        self.fp8 = fp8
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per-expert init of nn.Linear: U(−1/√fan_in, 1/√fan_in)."""
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def use_kernel(self, x: Tensor) -> bool:
        """Whether to take the grouped kernel (where it exists for x's device and dtype): not for "loop", nor
        ("auto") for fewer rows than experts on the CPU (decoding), where the CPU kernel's product per expert,
        empty ones included, costs more than a loop over the experts that got rows."""
        if self.implementation == "loop":
            return False
        if self.implementation == "grouped_mm" and _GROUPED_MM is None:
            raise RuntimeError("experts_implementation='grouped_mm' but this torch build has no grouped_mm")
        small_batch = x.device.type == "cpu" and x.shape[0] < self.n_experts and not torch.compiler.is_compiling()
        return not (self.implementation == "auto" and small_batch)

    def _matmul(self, x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
        if self.fp8:
            return fp8_grouped_matmul(x, weight, offsets)
        return grouped_matmul(x, weight, offsets, use_kernel)

    def _project(self, name: str, x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
        """One stacked projection `name` ("gate_up_proj" or "down_proj", `weight` [G, out, in]) of the sorted
        rows x [S, in] → [S, out] (`deepmoe.moe.lora.LoRAExperts` adds its low-rank term here)."""
        return self._matmul(x, weight.transpose(1, 2), offsets, use_kernel)

    def forward(self, x: Tensor, tokens_per_expert: Tensor, row_weight: Tensor | None = None) -> Tensor:
        """x [S, H] sorted by expert, tokens_per_expert [N_r] → [S, H].

        `row_weight` [S] (the gate g_i,t of each row) scales a row's I-wide activation before
        the down projection: the same as scaling its H-wide output, on H/I times fewer values.
        """
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast-aware
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        elif x.dtype != gate_up.dtype:
            x = x.to(gate_up.dtype)
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        use_kernel = self.use_kernel(x)
        gate, up = self._project("gate_up_proj", x, gate_up, offsets, use_kernel).chunk(2, dim=-1)
        hidden = swiglu(gate, up, self.swiglu_limit)  # [S, I]
        if row_weight is not None:
            hidden = hidden * row_weight.unsqueeze(-1).to(hidden.dtype)
        return self._project("down_proj", hidden, down, offsets, use_kernel)
