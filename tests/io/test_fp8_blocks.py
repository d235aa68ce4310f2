"""Block FP8 (DeepSeek-V3's `weight_scale_inv` format): quantising is DeepSeek's rule written out plainly here
(per 128×128 block, scale = amax / 448, q = w / scale in e4m3), partial edge blocks included, and dequantising
the result gives the weight back within e4m3's rounding."""

from __future__ import annotations

import pytest
import torch

from deepmoe.io import quantize_fp8

# cpu_only: fp8 checkpoint blocks dequantised on the CPU
pytestmark = pytest.mark.cpu_only


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
