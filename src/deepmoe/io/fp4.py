"""FP4 weights as DeepSeek-V4 stores its routed experts (docs/design.md#fp4-experts-and-deepseeks-v4-layout):
e2m1 values packed two per byte, with one ue8m0 scale per 32 consecutive values of a row (the OCP
microscaling "MXFP4" element and scale formats).

* e2m1: 1 sign bit (bit 3), 2 exponent bits (bits 2-1, bias 1), 1 mantissa bit (bit 0). The 16 codes are
  0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0-7) and their negatives (codes 8-15; code 8 is -0).
* Packing: byte i of a row holds elements 2i (low nibble, bits 3-0) and 2i+1 (high nibble, bits 7-4).
  Verified against DeepSeek-V4-Flash's `inference/convert.py` (`cast_e2m1fn_to_e4m3fn`: `low = x & 0x0F`,
  `high = (x >> 4) & 0x0F`, stacked as [low, high] along the last dimension) and transformers'
  `integrations/finegrained_fp8.py` (`_unpack_fp4`) and `integrations/mxfp4.py` (`lut[blk & 0x0F]` to the even
  columns); the code table is the `FP4_TABLE` of that convert.py. DeepSeek's release stores a packed weight
  [out, in/2] as int8 (`float4_e2m1fn_x2` after its convert.py) and its scales [out, in/32] as
  `float8_e8m0fnu`.
* ue8m0: an unsigned 8-bit exponent, value 2^(byte - 127) (bias 127, no sign, no mantissa; byte 255 is NaN).

Quantisation (`quantize_fp4`): each block of 32 gets the power-of-two scale s = 2^ceil(log2(amax / 6)), the
smallest that keeps amax / s within e2m1's largest magnitude 6 (the ue8m0 rounding of DeepSeek's
`inference/kernel.py`, V3.2 and V4: `fast_round_scale(amax, 1 / max) = 2^ceil(log2(amax / max))`); then x / s is
rounded to the nearest e2m1 value of its sign, ties to the even code (IEEE round half to even; a small negative
value becomes -0, code 8).
A block that is all zeros gets s = 1. x = code value · s is exact in bfloat16 and float32, so a dequantised FP4
weight loses nothing when stored in either.
"""

from __future__ import annotations

import torch
from torch import Tensor

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit e2m1 code 0..15."""
E2M1_MAX = 6.0
BLOCK = 32
"""Elements of a row that share one ue8m0 scale."""
UE8M0_BIAS = 127
PACKED_DTYPES = (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)
"""Storage dtypes of two packed e2m1 codes per byte (the same bytes, viewed differently)."""

# Between the positive magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6: the midpoints, and whether a value exactly on one
# rounds up (to the even code above) or down (to the even code below).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)


def e2m1_codes(x: Tensor) -> Tensor:
    """Nearest e2m1 code (uint8 0..15) of each value of `x` (already divided by its scale; |x| > 6 gives ±6):
    the sign bit set where x < 0, the magnitude rounded to nearest, ties to the even code. Same shape as `x`."""
    mag = x.float().abs().unsqueeze(-1)
    mids = torch.tensor(_MIDPOINTS, device=x.device)
    up = torch.tensor(_TIE_UP, device=x.device)
    magnitude_code = ((mag > mids) | ((mag == mids) & up)).sum(-1)  # 0..7: how many midpoints lie below
    return (magnitude_code + 8 * (x < 0)).to(torch.uint8)


def e2m1_values(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The value of each e2m1 code (an integer tensor of 0..15)."""
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: Tensor) -> Tensor:
    """codes [..., K] (uint8, 0..15; K even) -> bytes [..., K/2] uint8: element 2i in the low nibble, 2i+1 in
    the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got shape {tuple(codes.shape)}")
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """bytes [..., K/2] (uint8, int8 or float4_e2m1fn_x2) -> codes [..., K] uint8 (inverse of `pack_fp4`)."""
    if packed.dtype not in PACKED_DTYPES:
        raise ValueError(f"packed FP4 must be one of {', '.join(map(str, PACKED_DTYPES))}, got {packed.dtype}")
    u8 = packed.contiguous().view(torch.uint8)
    return torch.stack([u8 & 0x0F, u8 >> 4], dim=-1).flatten(-2)


def ue8m0_to_float(scales: Tensor) -> Tensor:
    """float32 values of ue8m0 scales stored as float8_e8m0fnu or as raw uint8 bytes (2^(byte - 127)); float32
    scales are returned as they are."""
    if scales.dtype == torch.uint8:
        scales = scales.view(torch.float8_e8m0fnu)
    if scales.dtype not in (torch.float8_e8m0fnu, torch.float32):
        raise ValueError(f"ue8m0 scales must be float8_e8m0fnu, uint8 or float32, got {scales.dtype}")
    return scales.float()


def quantize_fp4(w: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """w [..., K] (K a multiple of `block`) -> (packed [..., K/2] uint8, scales [..., K/block] float8_e8m0fnu):
    per block of `block` elements along the last dimension, s = 2^ceil(log2(amax / 6)) (1 for an all-zero
    block) and each element's nearest e2m1 code of w / s."""
    k = w.shape[-1]
    if k % block:
        raise ValueError(f"FP4 quantisation needs the last dimension ({k}) to be a multiple of the block {block}")
    blocks = w.float().unflatten(-1, (k // block, block))
    amax = blocks.abs().amax(-1)
    exponent = torch.ceil(torch.log2(amax / E2M1_MAX)).clamp(-UE8M0_BIAS, UE8M0_BIAS)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    codes = e2m1_codes(blocks / torch.exp2(exponent).unsqueeze(-1)).flatten(-2)
    scales = (exponent + UE8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    return pack_fp4(codes), scales


def dequantize_fp4(
    packed: Tensor, scales: Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> Tensor:  # fmt: skip
    """packed [..., K/2] (uint8, int8 or float4_e2m1fn_x2) and scales [..., K/block] (ue8m0 or float32) ->
    w [..., K] in `dtype`, w = e2m1 value · the scale of its block."""
    codes = unpack_fp4(packed)
    k = codes.shape[-1]
    if tuple(scales.shape) != (*codes.shape[:-1], k // block) or k % block:
        raise ValueError(
            f"FP4 scales have shape {tuple(scales.shape)}, expected {(*codes.shape[:-1], k // block)} for a packed "
            f"weight of shape {tuple(packed.shape)} ({k} values per row) in blocks of {block}"
        )
    values = e2m1_values(codes).unflatten(-1, (k // block, block))
    return (values * ue8m0_to_float(scales).unsqueeze(-1)).flatten(-2).to(dtype)
