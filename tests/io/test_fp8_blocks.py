"""Block FP8 (DeepSeek-V3's `weight_scale_inv` format): quantising is DeepSeek's rule written out plainly here
(per 128×128 block, scale = amax / 448, q = w / scale in e4m3), partial edge blocks included, and dequantising
the result gives the weight back within e4m3's rounding."""

from __future__ import annotations

import math

import pytest
import torch

from deepmoe.io import dequantize_fp8, quantize_fp8


def reference_quantize(w: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = w.shape
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(m / bm), math.ceil(n / bn))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float()
            s = block.abs().max() / 448.0 if block.abs().max() > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (129, 1), (3, 130)])
def test_quantize_is_deepseeks_rule_and_round_trips(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.linspace(0.01, 3, shape[1])
    w[: min(5, shape[0]), : min(7, shape[1])] = 0  # an all-zero corner keeps a scale of 1 where a block is all 0
    q, scale = quantize_fp8(w)
    q_ref, scale_ref = reference_quantize(w, 128, 128)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    back = dequantize_fp8(q, scale, (128, 128), torch.float32)
    blocks = scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert ((back - w).abs() <= blocks * 448 * 2**-4 + 1e-12).all()  # half an e4m3 step at the block's amax


def test_quantize_stacked_experts_and_bad_shapes():
    torch.manual_seed(1)
    w = torch.randn(3, 200, 150)
    q, scale = quantize_fp8(w)
    assert q.shape == w.shape and scale.shape == (3, 2, 2)
    for e in range(3):
        q_e, s_e = quantize_fp8(w[e])
        assert torch.equal(scale[e], s_e) and torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8))
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        quantize_fp8(torch.ones(4))
