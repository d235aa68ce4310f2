"""Fine-grained FP8 (DeepSeek-V3 §3.3, docs/design.md#t4-fine-grained-fp8): 1×128 activation tiles, 128×128
weight blocks, e4m3, float32 scales."""

from __future__ import annotations

import math

import pytest
import torch

from deepmoe.moe.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blocks,
    dequantize_tiles,
    fp8_grouped_matmul,
    fp8_matmul,
    fp8_relative_error,
    quantize_activation_tiles,
    quantize_weight_blocks,
)

# cpu_only: fp8 emulation checked bit-exactly on CPU kernels, CPU autocast and generators
pytestmark = pytest.mark.cpu_only

MIN_NORMAL = 2.0**-6  # smallest normal e4m3 value
SUBNORMAL_STEP = 2.0**-9  # spacing of e4m3 subnormals


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _groups(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, first row, end row) for cumulative offsets."""
    bounds = [0, *offsets.tolist()]
    return [(g, bounds[g], bounds[g + 1]) for g in range(len(offsets))]


def _loop_tile_scales(x: torch.Tensor, tile: int) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty(m, math.ceil(k / tile))
    for i in range(m):
        for j in range(out.shape[1]):
            amax = x[i, j * tile : (j + 1) * tile].float().abs().max()
            out[i, j] = amax / FP8_MAX if amax / FP8_MAX > 0 else 1.0
    return out


def _loop_block_scales(w: torch.Tensor, block: int) -> torch.Tensor:
    k, n = w.shape
    out = torch.empty(math.ceil(k / block), math.ceil(n / block))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float().abs().max()
            out[i, j] = amax / FP8_MAX if amax / FP8_MAX > 0 else 1.0
    return out


def _assert_e4m3_rounding(x: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor) -> None:
    """Per element: relative error <= 2^-4 where x / scale is normal, half a subnormal step below."""
    x, deq, scaled = x.double(), deq.double(), (x.double() / scale.double()).abs()
    err = (deq - x).abs()
    normal = scaled >= MIN_NORMAL
    slack = 1 + 1e-6  # float32 scale and division rounding
    assert (err[normal] <= 2.0**-4 * x.abs()[normal] * slack).all()
    assert (err[~normal] <= SUBNORMAL_STEP / 2 * scale.double().expand_as(x)[~normal] * slack).all()


@pytest.mark.parametrize("k", [128, 384, 200, 50])
def test_activation_tiles_scales_and_round_trip(k):
    x = torch.randn(7, k, generator=_gen(k)) * torch.logspace(-3, 2, k)  # several magnitudes per row
    q, s = quantize_activation_tiles(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (7, math.ceil(k / 128))
    assert torch.equal(s, _loop_tile_scales(x, 128))
    deq = dequantize_tiles(q, s)
    _assert_e4m3_rounding(x, deq, s.repeat_interleave(128, dim=-1)[:, :k])
    # each tile's largest value lands on the top of e4m3's range, partial tiles too
    padded = torch.nn.functional.pad(q.float().abs(), (0, s.shape[1] * 128 - k))
    assert (padded.reshape(7, -1, 128).amax(-1) == FP8_MAX).all()


def test_activation_tiles_any_tile_size_and_leading_dims():
    x = torch.randn(2, 3, 70, generator=_gen(1))
    q, s = quantize_activation_tiles(x, tile=32)
    assert s.shape == (2, 3, 3)
    assert torch.equal(s.reshape(6, 3), _loop_tile_scales(x.reshape(6, 70), 32))
    assert (dequantize_tiles(q, s, tile=32) - x).abs().max() <= 2.0**-4 * x.abs().max()


@pytest.mark.parametrize(("k", "n"), [(256, 384), (200, 300), (128, 1), (5, 129)])
def test_weight_blocks_scales_and_round_trip(k, n):
    w = torch.randn(k, n, generator=_gen(k + n)) * 0.02
    w[: min(k, 64)] *= 50  # blocks of different magnitude
    q, s = quantize_weight_blocks(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape == (math.ceil(k / 128), math.ceil(n / 128))
    assert torch.equal(s, _loop_block_scales(w, 128))
    expanded = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:k, :n]
    _assert_e4m3_rounding(w, dequantize_blocks(q, s), expanded)


def test_weight_blocks_stacked_and_transposed_views():
    gate_up = torch.randn(3, 96, 160, generator=_gen(2))  # [E, 2I, H] as stored by RoutedExperts
    w = gate_up.transpose(1, 2)  # [E, H=160, 2I=96], the view grouped_matmul receives
    q, s = quantize_weight_blocks(w)
    assert q.shape == w.shape and s.shape == (3, 2, 1)
    for e in range(3):
        qe, se = quantize_weight_blocks(w[e].contiguous())
        assert torch.equal(s[e], se) and torch.equal(q[e].float(), qe.float())


def test_zero_and_partial_tiles():
    x = torch.randn(4, 300, generator=_gen(3))
    x[1] = 0  # a whole zero row: three zero tiles
    x[2, 128:256] = 0  # one zero tile in the middle
    x[3, 256:] = 0  # a zero partial tile (44 channels)
    q, s = quantize_activation_tiles(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (s[1] == 1).all() and s[2, 1] == 1 and s[3, 2] == 1
    deq = dequantize_tiles(q, s)
    assert torch.equal(deq[1], torch.zeros(300)) and torch.equal(deq[2, 128:256], torch.zeros(128))
    # a partial tile is scaled by its own amax
    assert s[0, 2] == x[0, 256:].abs().max() / FP8_MAX
    w = torch.zeros(130, 140)
    w[129, 139] = 3.0  # only the corner partial block is non-zero
    qw, sw = quantize_weight_blocks(w)
    assert torch.equal(sw, torch.tensor([[1.0, 1.0], [1.0, 3.0 / FP8_MAX]]))
    assert torch.equal(dequantize_blocks(qw, sw), w)
    assert torch.equal(fp8_matmul(torch.zeros(2, 130), w), torch.zeros(2, 140))


def _rel(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).norm() / exact.norm()).item()


def test_fp8_matmul_error_against_float64():
    """e4m3 keeps 3 mantissa bits: each operand's round trip has a relative RMS error of about
    2^-3 / sqrt(12) * E[1/mantissa] ~ 2.6%, and the product's relative error is the two combined
    (~3.7%), about 13x the error of a plain bf16 product. (The V3 report's "< 0.25%" is the
    relative error of the training *loss* against a BF16 run, not of a single GEMM.)"""
    x = torch.randn(256, 1024, generator=_gen(4))
    w = torch.randn(1024, 512, generator=_gen(5)) * 0.02
    exact = x.double() @ w.double()
    err = fp8_relative_error(x, w)
    bf16 = _rel(x.bfloat16() @ w.bfloat16(), exact)
    x_rt = _rel(dequantize_tiles(*quantize_activation_tiles(x)), x.double())
    w_rt = _rel(dequantize_blocks(*quantize_weight_blocks(w)), w.double())
    print(f"fp8 GEMM relative error {err:.3e} (x round trip {x_rt:.3e}, w {w_rt:.3e}); bf16 GEMM {bf16:.3e}")
    assert 0.02 < x_rt < 0.03 and 0.02 < w_rt < 0.03
    assert err == pytest.approx(math.hypot(x_rt, w_rt), rel=0.05)  # independent rounding errors add in quadrature
    assert bf16 < err < 5e-2
    out = fp8_matmul(x.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (256, 512)


def _per_tensor_fp8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    def fake_quant(t: torch.Tensor) -> torch.Tensor:
        scale = t.abs().max() / FP8_MAX
        return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale

    return fake_quant(x) @ fake_quant(w)


@pytest.mark.parametrize(("outlier", "min_gain"), [(1e3, 1.0), (1e5, 3.0)])
def test_per_tile_beats_per_tensor_with_outliers(outlier, min_gain):
    """One channel of one token at `outlier` x the activations' std: per tensor, the scale it
    forces pushes every other value towards e4m3's subnormals (below amax / 28672); per tile only
    its own 1x128 tile is affected. e4m3's range is wide, so at 1000x the gain is small; at 1e5x
    per-tensor scaling loses the other rows."""
    x = torch.randn(64, 1024, generator=_gen(6))
    w = torch.randn(1024, 256, generator=_gen(7)) * 0.02
    clean = fp8_matmul(x, w)
    x[5, 17] = outlier
    exact = x.double() @ w.double()
    rest = torch.arange(64) != 5
    tile = fp8_matmul(x, w)
    tensor = _per_tensor_fp8_matmul(x, w)
    tile_rest, tensor_rest = _rel(tile[rest], exact[rest]), _rel(tensor[rest], exact[rest])
    print(f"outlier {outlier:g}x: other rows per-tile {tile_rest:.3e}, per-tensor {tensor_rest:.3e}")
    assert torch.equal(tile[rest], clean[rest])  # per tile, the other tokens do not see the outlier
    assert tensor_rest > min_gain * tile_rest
    assert _rel(tile[5], exact[5]) < 5e-2  # the outlier's own row stays accurate


def test_fp8_grouped_matmul_equals_per_expert():
    gate_up = torch.randn(4, 96, 160, generator=_gen(8)) * 0.05  # [E, 2I, H]
    w = gate_up.transpose(1, 2)
    tokens = torch.tensor([5, 0, 9, 3])
    offsets = tokens.cumsum(0).to(torch.int32)
    x = torch.randn(int(tokens.sum()), 160, generator=_gen(9))
    out = fp8_grouped_matmul(x, w, offsets)
    expected = torch.cat([fp8_matmul(x[a:b], w[g]) for g, a, b in _groups(offsets)])
    assert out.shape == (17, 96)
    assert torch.equal(out, expected)
    assert not torch.equal(out, torch.cat([x[a:b] @ w[g] for g, a, b in _groups(offsets)]))


def test_straight_through_gradients():
    x = torch.randn(12, 200, generator=_gen(10), requires_grad=True)
    w = torch.randn(200, 70, generator=_gen(11), requires_grad=True)
    g = torch.randn(12, 70, generator=_gen(12))
    fp8_matmul(x, w).backward(g)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (x_ref @ w_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=0)


def test_straight_through_gradients_grouped():
    weight = torch.randn(3, 96, 64, generator=_gen(13)).requires_grad_()
    tokens = torch.tensor([4, 0, 6])
    offsets = tokens.cumsum(0).to(torch.int32)
    x = torch.randn(10, 64, generator=_gen(14), requires_grad=True)
    g = torch.randn(10, 96, generator=_gen(15))
    fp8_grouped_matmul(x, weight.transpose(1, 2), offsets).backward(g)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    wt = w_ref.transpose(1, 2)
    torch.cat([x_ref[a:b] @ wt[e] for e, a, b in _groups(offsets)]).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)
    assert torch.equal(weight.grad[1], torch.zeros(96, 64))  # the expert with no tokens


def test_bf16_inputs_under_autocast_keep_float32_accumulation():
    x = torch.randn(32, 256, generator=_gen(16))
    w = torch.randn(256, 128, generator=_gen(17)) * 0.02
    plain = fp8_matmul(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fp8_matmul(x, w)
    assert torch.equal(plain, auto)


def test_backend_argument():
    x, w = torch.randn(4, 128), torch.randn(128, 128)
    assert torch.equal(fp8_matmul(x, w, backend="simulate"), fp8_matmul(x, w))
    with pytest.raises(ValueError, match="backend"):
        fp8_matmul(x, w, backend="fast")


def test_moe_layer_with_fp8_experts_stays_close_to_float32():
    from deepmoe import MoE, MoEConfig

    cfg = MoEConfig(
        hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2
    )
    torch.manual_seed(0)
    exact = MoE(cfg)
    quantised = MoE(MoEConfig(**{**cfg.to_dict(), "fp8_experts": True}))
    quantised.load_state_dict(exact.state_dict())
    x = torch.randn(64, 256, requires_grad=True)
    want = exact(x).hidden_states
    got = quantised(x).hidden_states
    err = ((got - want).norm() / want.norm()).item()
    # each e4m3 product is off by ≈ 3.7e-2 (both operands rounded); two in series through SwiGLU ≈ 6e-2
    assert 1e-2 < err < 1e-1
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and quantised.experts.gate_up_proj.grad is not None
