"""DeepSeek-V3's block-scaled FP8 weights (docs/design.md#m5-hugging-face-checkpoints): an e4m3 weight with one
float32 scale per 128×128 block (`<name>_scale_inv`, edge blocks partial), w = q · scale_inv. Dequantised
while reading, and quantised for writing the same format (DeepSeek's `weight_quant`: scale = amax / 448 per
block)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
"""448: the largest finite e4m3 value; a block's amax maps onto it."""


def _check_blocks(shape: tuple[int, ...], scale_shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, int]:
    *lead, m, n = shape
    bm, bn = block_size
    rows, cols = math.ceil(m / bm), math.ceil(n / bn)
    if tuple(scale_shape) != (*lead, rows, cols):
        raise ValueError(
            f"scale_inv has shape {tuple(scale_shape)}, expected {(*lead, rows, cols)} "
            f"for a weight of shape {tuple(shape)} in {bm}x{bn} blocks"
        )
    return rows, cols


def dequantize_fp8(
    weight: Tensor, scale_inv: Tensor, block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """w = fp8 weight × scale_inv of its (bm × bn) block, computed in float32 one row-block at a time.

    weight [..., M, N] (float8), scale_inv [..., ceil(M/bm), ceil(N/bn)] float32 (DeepSeek-V3's
    `<name>_scale_inv`); edge blocks may be partial. Returns [..., M, N] in `dtype`.
    """
    if weight.dim() < 2:
        raise ValueError(f"an FP8 weight must have >= 2 dimensions, got shape {tuple(weight.shape)}")
    *_, m, n = weight.shape
    bm, bn = block_size
    rows, cols = _check_blocks(tuple(weight.shape), tuple(scale_inv.shape), block_size)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    w, o = weight.reshape(-1, m, n), out.view(-1, m, n)
    s = scale_inv.reshape(-1, rows, cols).to(torch.float32)
    for e in range(w.shape[0]):
        for r in range(rows):
            r0, r1 = r * bm, min(m, (r + 1) * bm)
            column_scale = s[e, r].repeat_interleave(bn)[:n]  # [N]: each column block's scale
            o[e, r0:r1] = (w[e, r0:r1].to(torch.float32) * column_scale).to(dtype)
    return out


def quantize_fp8(weight: Tensor, block_size: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """(q, scale_inv): `weight` [..., M, N] as e4m3 with one float32 scale per (bm × bn) block (edge blocks
    partial), scale_inv = amax(|block|) / 448 (1 for an all-zero block), q = weight / scale_inv rounded to e4m3;
    `dequantize_fp8(q, scale_inv)` gives the weight back within e4m3's rounding (3 mantissa bits)."""
    if weight.dim() < 2:
        raise ValueError(f"an FP8 weight must have >= 2 dimensions, got shape {tuple(weight.shape)}")
    *lead, m, n = weight.shape
    bm, bn = block_size
    rows, cols = math.ceil(m / bm), math.ceil(n / bn)
    w = weight.reshape(-1, m, n)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(w.shape[0], rows, cols, dtype=torch.float32, device=weight.device)
    for e in range(w.shape[0]):
        for r in range(rows):
            r0, r1 = r * bm, min(m, (r + 1) * bm)
            block_rows = w[e, r0:r1].to(torch.float32)  # [≤bm, N]
            pad = cols * bn - n
            padded = torch.nn.functional.pad(block_rows, (0, pad)) if pad else block_rows
            amax = padded.abs().reshape(r1 - r0, cols, bn).amax(dim=(0, 2))  # [cols]
            s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
            scale[e, r] = s
            q[e, r0:r1] = (block_rows / s.repeat_interleave(bn)[:n]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(weight.shape), scale.reshape(*lead, rows, cols)
