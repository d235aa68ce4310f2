"""Rotary position embedding (RoPE) with DeepSeek's YaRN context extension.

RoPE rotates each pair of a query/key's rotary dims by the angle m·θ_i of its absolute position m, with
θ_i = base^(−2i/d), i < d/2. YaRN (Peng et al. 2023) as DeepSeek-V2/V3 use it, for a context extended s times
beyond the pretraining length L:

    θ_i' = (1 − γ_i) · θ_i / s + γ_i · θ_i       γ_i = 1 − ramp(i; ⌊dim(β_fast)⌋, ⌈dim(β_slow)⌉), clamped to [0, 1]
    dim(r) = d · ln(L / (2π r)) / (2 ln base)     the dim index whose wavelength fits r times into L
    mscale(s, μ) = 0.1 · μ · ln s + 1              (1 when s <= 1)

Fast dims (many rotations within L) keep θ_i, slow ones are interpolated to θ_i / s. The attention temperature
enters twice, as in DeepSeek's released code and transformers' deepseek_v2/v3:
- the softmax scale is mscale(s, mscale_all_dim)² / sqrt(d_qk) when mscale_all_dim is set (`softmax_scale`);
- cos and sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim) (transformers' yarn
  "attention_factor"; mscale(s) alone when either is unset, or rope_scaling["attention_factor"] when given).
  The released V2/V3 configs set mscale == mscale_all_dim, so this factor is 1 there.
DeepSeek-V3's inference/model.py applies YaRN only when its max_seq_len exceeds original_seq_len; transformers
(and this module) apply it whenever rope_scaling is "yarn", which is what a checkpoint's config.json means.

Config names: deepmoe keeps config.json's `rope_theta` and `rope_scaling` ({"type": "yarn", ...}); transformers 5
folds both into `rope_parameters` ({"rope_type": "yarn", "rope_theta": ..., ...}).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """mscale(s, μ) = 0.1 · μ · ln s + 1 for s > 1, else 1."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YaRN:
    """rope_scaling of type "yarn", with transformers' defaults filled in."""

    factor: float
    """s, the context extension."""
    original_max_position_embeddings: int
    """L, the pretraining context length."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None

    @classmethod
    def from_config(cls, config: DeepSeekConfig) -> YaRN | None:
        """None unless config.rope_scaling is of type "yarn"."""
        scaling: dict[str, Any] | None = config.rope_scaling
        if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn":
            return None
        original = int(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
        return cls(
            factor=float(scaling.get("factor") or config.max_position_embeddings / original),
            original_max_position_embeddings=original,
            beta_fast=float(scaling.get("beta_fast") or 32),
            beta_slow=float(scaling.get("beta_slow") or 1),
            mscale=scaling.get("mscale"),
            mscale_all_dim=scaling.get("mscale_all_dim"),
            attention_factor=scaling.get("attention_factor"),
        )

    def cos_sin_factor(self) -> float:
        """The factor on cos and sin (transformers' yarn attention_factor)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def inv_freq(self, dim: int, base: float) -> Tensor:
        """θ' [dim/2], float32, computed on the CPU (the same bits whatever the default device)."""
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)

        def correction_dim(rotations: float) -> float:
            wavelengths = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return dim * math.log(wavelengths) / (2 * math.log(base))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # no singular ramp
        gamma = 1 - ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        return 1.0 / (self.factor * pos_freqs) * (1 - gamma) + 1.0 / pos_freqs * gamma


def softmax_scale(config: DeepSeekConfig) -> float:
    """1/sqrt(d_qk), times mscale(s, mscale_all_dim)² under YaRN with mscale_all_dim set."""
    scale = config.head_dim**-0.5
    yarn = YaRN.from_config(config)
    if yarn is not None and yarn.mscale_all_dim:
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos(m·θ_i), sin(m·θ_i) [S, d/2] for absolute positions m [S], over the rotary dims d.

    d is qk_rope_head_dim for MLA (the decoupled key/query part) and the whole head_dim for MHA. θ is a
    non-persistent float32 buffer: checkpoints do not hold it, and casting the module (`model.to(torch.bfloat16)`)
    keeps it in float32, since a bf16 θ would be off by whole turns at positions in the thousands.
    Since no checkpoint restores θ, a module built on the meta device and materialised with `to_empty` must
    call `reset_parameters()` (the model's `reset_parameters` does), which recomputes it.
    """

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.dim = config.qk_rope_head_dim if config.attention_type == "mla" else config.head_dim
        self.base = config.rope_theta
        self.yarn = YaRN.from_config(config)
        self.register_buffer("inv_freq", torch.empty(self.dim // 2, dtype=torch.float32), persistent=False)
        self.attention_factor = 1.0 if self.yarn is None else self.yarn.cos_sin_factor()
        self.reset_parameters()

    def compute_inv_freq(self) -> Tensor:
        """θ (or YaRN's θ') [d/2], float32, on the CPU."""
        if self.yarn is not None:
            return self.yarn.inv_freq(self.dim, self.base)
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu") / self.dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute θ into the buffer, on the buffer's device, keeping it float32."""
        if self.inv_freq.is_meta:  # nothing to compute: to_empty + reset_parameters will
            return
        inv_freq = self.compute_inv_freq()
        if self.inv_freq.dtype == torch.float32:
            self.inv_freq.copy_(inv_freq)
        else:
            self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq  # [S, d/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != inv_freq.dtype:  # a dtype cast: keep θ float32, follow the device
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate each pair (a, b) of x's last dim by its angle: (a cos − b sin, b cos + a sin).

    x: [B, S, n, d]; cos, sin: [S, d/2]. interleaved: the pairs are (x0, x1), (x2, x3), ... (DeepSeek's complex
    layout, x viewed as d/2 complex numbers times e^{imθ}), and the result keeps that layout; otherwise the pairs
    are (x_i, x_{i+d/2}) (Llama's rotate_half). Computed in float32 (as DeepSeek's apply_rotary_emb), returned in
    x's dtype.
    """
    cos, sin = cos[:, None], sin[:, None]  # [S, 1, d/2]
    y = x.float()
    if interleaved:
        a, b = y[..., 0::2], y[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)
    a, b = y.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)
