"""FP4 e2m1 + ue8m0 (deepmoe.io.fp4) against plain references written out below: the e2m1 code table from its
bit fields, a brute-force nearest-value search per element, and packing bytes spelled out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from deepmoe.io.fp4 import (
    E2M1_VALUES,
    dequantize_fp4,
    e2m1_codes,
    pack_fp4,
    quantize_fp4,
    ue8m0_to_float,
    unpack_fp4,
)


def e2m1_value(code: int) -> float:
    """The value of a 4-bit code from its fields: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0;
    exponent 0 is subnormal (0.m · 2^0)."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def nearest_code(x: float) -> int:
    """Brute force over the 8 codes of x's sign (sign bit set for x < 0, so a small negative becomes -0): the
    nearest value, ties to the code with mantissa bit 0."""
    signed = range(8, 16) if x < 0 else range(8)
    return min(signed, key=lambda c: (abs(x - e2m1_value(c)), c & 1))


def reference_quantize(w: torch.Tensor, block: int = 32) -> tuple[list[list[int]], list[list[float]]]:
    """Per row and block: s = 2^ceil(log2(amax / 6)) (1 if all zero) and the nearest code of each x / s."""
    codes, scales = [], []
    for row in w.tolist():
        row_codes, row_scales = [], []
        for b in range(0, len(row), block):
            amax = max(abs(v) for v in row[b : b + block])
            s = 2.0 ** math.ceil(math.log2(amax / 6)) if amax > 0 else 1.0
            row_scales.append(s)
            row_codes += [nearest_code(v / s) for v in row[b : b + block]]
        codes.append(row_codes)
        scales.append(row_scales)
    return codes, scales


def test_the_16_codes_are_e2m1():
    assert [e2m1_value(c) for c in range(16)] == list(E2M1_VALUES)
    assert e2m1_codes(torch.tensor(E2M1_VALUES)).tolist() == [*range(8), 0, *range(9, 16)]  # -0 quantises to +0


def test_rounding_is_to_nearest_with_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -2.6, 0.24, 0.26, 100.0])
    assert e2m1_codes(x).tolist() == [nearest_code(v) for v in x.tolist()]
    assert e2m1_codes(x).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 9, 13, 0, 1, 7]


def test_packing_puts_the_even_element_in_the_low_nibble():
    codes = torch.tensor([[1, 15, 0, 7], [8, 2, 6, 3]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x1 | 0xF << 4, 0x0 | 0x7 << 4], [0x8 | 0x2 << 4, 0x6 | 0x3 << 4]]
    for view in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        assert unpack_fp4(packed.view(view)).equal(codes)
    with pytest.raises(ValueError, match="even last dimension"):
        pack_fp4(codes[:, :3])


def test_ue8m0_is_a_biased_power_of_two():
    raw = torch.tensor([0, 120, 127, 130, 254], dtype=torch.uint8)
    assert ue8m0_to_float(raw).tolist() == [2.0 ** (b - 127) for b in raw.tolist()]
    assert ue8m0_to_float(raw.view(torch.float8_e8m0fnu)).equal(ue8m0_to_float(raw))


def test_quantisation_matches_the_plain_reference():
    torch.manual_seed(0)
    w = torch.randn(6, 96) * torch.logspace(-3, 2, 6).unsqueeze(1)
    w[2, 32:64] = 0  # an all-zero block
    packed, scales = quantize_fp4(w)
    codes, ref_scales = reference_quantize(w)
    assert packed.shape == (6, 48) and packed.dtype == torch.uint8
    assert scales.shape == (6, 3) and scales.dtype == torch.float8_e8m0fnu
    assert unpack_fp4(packed).tolist() == codes
    assert ue8m0_to_float(scales).tolist() == ref_scales
    expected = torch.tensor([[e2m1_value(c) for c in row] for row in codes])
    expected *= torch.tensor(ref_scales).repeat_interleave(32, dim=1)
    assert dequantize_fp4(packed, scales, dtype=torch.float32).equal(expected)


def test_error_is_within_half_a_step_of_e2m1():
    torch.manual_seed(1)
    w = torch.randn(8, 256, dtype=torch.float64)
    packed, scales = quantize_fp4(w)
    s = ue8m0_to_float(scales).double().repeat_interleave(32, dim=1)
    back = dequantize_fp4(packed, scales, dtype=torch.float64)
    err = (back - w).abs() / s  # in units of the block's scale
    # half the gap to the next e2m1 magnitude: 0.25 below 2, 0.5 in [2, 4), 1 in [4, 6]
    half_gap = torch.where(w.abs() / s < 2, 0.25, torch.where(w.abs() / s < 4, 0.5, 1.0))
    assert (err <= half_gap + 1e-12).all()
    assert ((w.abs() / s) <= 6).all() and ((w.abs() / s).amax(dim=1) > 3).all()  # the scale is the tightest power


def test_representable_values_round_trip_exactly():
    torch.manual_seed(2)
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    codes[:, ::32] = 7  # each block reaches 6, so its scale is exactly the chosen power of two
    exponents = torch.tensor([[-10, 0], [3, -127 + 3], [20, 5], [-1, 1]], dtype=torch.float32)
    w = torch.tensor(E2M1_VALUES)[codes.long()] * torch.exp2(exponents).repeat_interleave(32, dim=1)
    packed, scales = quantize_fp4(w)
    assert ue8m0_to_float(scales).equal(torch.exp2(exponents))
    for dtype in (torch.float32, torch.bfloat16):
        assert dequantize_fp4(packed, scales, dtype=dtype).equal(w.to(dtype))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of the block 32"):
        quantize_fp4(torch.zeros(2, 40))
    packed, scales = quantize_fp4(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="FP4 scales have shape"):
        dequantize_fp4(packed, scales[:, :1])
    with pytest.raises(ValueError, match="packed FP4 must be"):
        dequantize_fp4(packed.float(), scales)
