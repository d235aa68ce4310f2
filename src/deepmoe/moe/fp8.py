"""Fine-grained FP8 GEMMs (docs/design.md#t4-fine-grained-fp8; DeepSeek-V3 report §3.3).

Activations are quantised per 1×128 tile (one token, 128 channels of the contraction
dimension K), weights per 128×128 block, to `float8_e4m3fn` with one float32 scale per
tile/block: scale = amax / 448, so that `q = x / scale` fills e4m3's range [−448, 448] and
`x ≈ q · scale`. Dimensions that are not multiples of 128 end in a partial tile/block, which
gets its own scale from the values it has. A tile whose amax is 0 (or so small that amax / 448
underflows to 0 in float32) gets scale 1, so scales are always positive and finite, and its
values quantise to 0.

The product is computed from the quantised values with the scales applied per tile and
accumulated in float32 (the report's "increased accumulation precision"):

* On devices without FP8 matrix units (CPU, older GPUs) it is simulated:
  quantise → dequantise → float32 matmul. Since dequantising is q·s per tile and the
  accumulation is float32, this equals scaling inside the product up to float32 rounding.
* On CUDA devices of compute capability 9.x (Hopper) it uses
  `torch.nn.functional.scaled_mm` with `ScalingType.BlockWise1x128` (activations) and
  `ScalingType.BlockWise128x128` (weights), which torch 2.13 implements with cuBLASLt ≥ 12.9
  on SM90 only (torch raises NotImplementedError for this recipe on SM89 and SM100+), with
  `use_fast_accum=False`. It is taken only when K and N are multiples of 128; anything that
  fails there falls back to the simulation (with one warning). This path is untested here
  (no GPU was available when it was written).

Autograd is straight-through: the backward pass is that of the unquantised product
(`grad_x = g @ wᵀ`, `grad_w = xᵀ @ g`, in the inputs' precision). DeepSeek-V3 also runs the
backward GEMMs (Dgrad, Wgrad) in FP8; that is not simulated here.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
TILE = 128

Backend = Literal["auto", "simulate", "scaled_mm"]

_SCALED_MM = getattr(F, "scaled_mm", None)
_SCALING_TYPE = getattr(F, "ScalingType", None)
_scaled_mm_broken: set[str] = set()  # devices where the blockwise scaled_mm call failed once


# --------------------------------------------------------------------------- quantisation


def _scales_from_amax(amax: Tensor) -> Tensor:
    """scale = amax / 448 in float32, replaced by 1 where it is 0 (all-zero or tiny tiles)."""
    scale = amax.float() / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale rounded to e4m3 (clamped: amax / (amax / 448) may round just above 448)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_activation_tiles(x: Tensor, tile: int = TILE) -> tuple[Tensor, Tensor]:
    """Per-(1 × tile) quantisation along the last dimension.

    x [..., K] → (q [..., K] float8_e4m3fn, scales [..., ceil(K / tile)] float32), with
    x ≈ q · scales (each scale repeated over its tile; the last tile may be partial).
    """
    k = x.shape[-1]
    n_tiles = math.ceil(k / tile)
    padded = F.pad(x.float(), (0, n_tiles * tile - k))  # zeros leave every amax unchanged
    tiles = padded.reshape(*x.shape[:-1], n_tiles, tile)
    scales = _scales_from_amax(tiles.abs().amax(dim=-1))
    q = _to_fp8(tiles, scales.unsqueeze(-1)).reshape(padded.shape)[..., :k]
    return q, scales


def quantize_weight_blocks(w: Tensor, block: int = TILE) -> tuple[Tensor, Tensor]:
    """Per-(block × block) quantisation of the last two dimensions.

    w [..., K, N] (the right operand of `x @ w`, or a stack [E, K, N]; views are fine) →
    (q [..., K, N] float8_e4m3fn, scales [..., ceil(K / block), ceil(N / block)] float32).
    """
    k, n = w.shape[-2:]
    kb, nb = math.ceil(k / block), math.ceil(n / block)
    padded = F.pad(w.float(), (0, nb * block - n, 0, kb * block - k))
    blocks = padded.reshape(*w.shape[:-2], kb, block, nb, block)
    scales = _scales_from_amax(blocks.abs().amax(dim=(-3, -1)))
    q = _to_fp8(blocks, scales[..., :, None, :, None]).reshape(padded.shape)[..., :k, :n]
    return q, scales


def dequantize_tiles(q: Tensor, scales: Tensor, tile: int = TILE, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize_activation_tiles`: q [..., K] · scales [..., ceil(K / tile)] → [..., K]."""
    expanded = scales.repeat_interleave(tile, dim=-1)[..., : q.shape[-1]]
    return (q.float() * expanded).to(dtype)


def dequantize_blocks(q: Tensor, scales: Tensor, block: int = TILE, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize_weight_blocks`: q [..., K, N] · scales [..., kb, nb] → [..., K, N]."""
    k, n = q.shape[-2:]
    expanded = scales.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :k, :n]
    return (q.float() * expanded).to(dtype)


# --------------------------------------------------------------------------- forward products


def _simulated(x: Tensor, w: Tensor) -> Tensor:
    """float32 product of the dequantised operands (x [M, K], w [K, N])."""
    xd = dequantize_tiles(*quantize_activation_tiles(x))
    wd = dequantize_blocks(*quantize_weight_blocks(w))
    with torch.autocast(x.device.type, enabled=False):  # keep the float32 accumulation
        return xd @ wd


def scaled_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether `torch.nn.functional.scaled_mm` with 1×128 / 128×128 scales can run this product."""
    if not (x.is_cuda and w.is_cuda) or _SCALED_MM is None or _SCALING_TYPE is None:
        return False
    if str(x.device) in _scaled_mm_broken:
        return False
    if torch.cuda.get_device_capability(x.device)[0] != 9:  # torch: "only supported in CUDA for SM90"
        return False
    return x.shape[-1] % TILE == 0 and w.shape[-1] % TILE == 0


def _scaled_mm(x: Tensor, w: Tensor) -> Tensor:
    """FP8 tensor-core product on Hopper (untested here). x [M, K], w [K, N] → [M, N] float32/x.dtype.

    Layouts torch 2.13 checks for BLOCK_1x128_128x128: A row-major; scale_a [M, K/128] with
    strides (1, M); B column-major; scale_b [round_up(K/128, 4), N/128] with strides (1, that).
    """
    m = x.shape[0]
    pad_m = -m % 16  # keeps scale_a's column stride 16-byte aligned
    xq, xs = quantize_activation_tiles(F.pad(x, (0, 0, 0, pad_m)))
    wq, ws = quantize_weight_blocks(w)
    kb = ws.shape[0]
    scale_a = xs.t().contiguous().t()
    scale_b = F.pad(ws.t().contiguous(), (0, -kb % 4)).t()
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    out = _SCALED_MM(
        xq,
        wq.t().contiguous().t(),
        scale_a,
        _SCALING_TYPE.BlockWise1x128,
        scale_b,
        _SCALING_TYPE.BlockWise128x128,
        output_dtype=out_dtype,
        use_fast_accum=False,
    )
    return out[:m]


def _fp8_forward(x: Tensor, w: Tensor, backend: Backend) -> Tensor:
    if backend == "scaled_mm" or (backend == "auto" and scaled_mm_supported(x, w)):
        try:
            return _scaled_mm(x, w)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            if backend == "scaled_mm":
                raise
            _scaled_mm_broken.add(str(x.device))
            warnings.warn(f"blockwise FP8 scaled_mm failed ({err}); simulating FP8 instead", stacklevel=3)
    return _simulated(x, w)


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "simulate", "scaled_mm"):
        raise ValueError(f"backend must be 'auto', 'simulate' or 'scaled_mm', got {backend!r}")


class _FP8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, backend: Backend) -> Tensor:
        ctx.save_for_backward(x, w)
        return _fp8_forward(x, w, backend).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w.t().to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (x.t().to(grad.dtype) @ grad).to(w.dtype)
        return grad_x, grad_w, None


class _FP8GroupedMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor, backend: Backend) -> Tensor:
        bounds = [0, *offsets.tolist()]
        ctx.save_for_backward(x, weight)
        ctx.bounds = bounds
        out = x.new_empty(x.shape[0], weight.shape[-1])
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if b > a:
                out[a:b] = _fp8_forward(x[a:b], weight[g], backend).to(x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        bounds = ctx.bounds
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if b == a:
                continue
            if grad_x is not None:
                grad_x[a:b] = grad[a:b] @ weight[g].t().to(grad.dtype)
            if grad_w is not None:
                grad_w[g] = x[a:b].t().to(grad.dtype) @ grad[a:b]
        return grad_x, grad_w, None, None


# --------------------------------------------------------------------------- public products


def fp8_matmul(x: Tensor, w: Tensor, backend: Backend = "auto") -> Tensor:
    """x [..., K] @ w [K, N] through fine-grained FP8 (1×128 tiles × 128×128 blocks), in x.dtype.

    backend: "auto" (blockwise `scaled_mm` on Hopper when K, N are multiples of 128, else the
    float32 simulation), "simulate" (always simulate) or "scaled_mm" (require the kernel).
    Autograd is straight-through: gradients are those of the unquantised product x @ w,
    computed in the inputs' precision (DeepSeek-V3 also quantises the backward GEMMs to FP8;
    that is not simulated).
    """
    _check_backend(backend)
    lead = x.shape[:-1]
    out = _FP8MatMul.apply(x.reshape(-1, x.shape[-1]), w, backend)
    return out.reshape(*lead, w.shape[-1])


def fp8_grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor, backend: Backend = "auto") -> Tensor:
    """Same contract as `experts.grouped_matmul`, each group's product in fine-grained FP8.

    x [S, K] sorted by group, weight [G, K, N] (a transposed view is fine), offsets [G] =
    cumulative rows (offsets[-1] == S). Rows of group g get `fp8_matmul(x[rows], weight[g])`.
    Autograd is straight-through, as in `fp8_matmul`.
    """
    _check_backend(backend)
    return _FP8GroupedMatMul.apply(x, weight, offsets, backend)


@torch.no_grad()
def fp8_relative_error(x: Tensor, w: Tensor, backend: Backend = "auto") -> float:
    """‖fp8_matmul(x, w) − x @ w‖_F / ‖x @ w‖_F with the exact product taken in float64."""
    exact = x.double() @ w.double()
    return ((fp8_matmul(x, w, backend).double() - exact).norm() / exact.norm()).item()
