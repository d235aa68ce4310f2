"""Manifold-constrained hyper-connections (mHC; Xie et al. 2026, "mHC: Manifold-Constrained Hyper-Connections",
as DeepSeek-V4 uses them; docs/design.md#deepseek-v4).

The residual stream is widened to n = hc_mult streams X [B, S, n, H]. Around each attention or FFN block F:

    x̃ = RMSNorm(flatten(X))                               (no gain)
    [a_pre, a_post, a_res] = x̃ W_fn                        (W_fn [(2 + n)·n, n·H])
    pre  = σ(α_pre · a_pre + b_pre) + ε                      [n]
    post = 2 σ(α_post · a_post + b_post)                     [n]
    res  = Sinkhorn(softmax_row(α_res · a_res + b_res) + ε)  [n, n], doubly stochastic
    X'   = post ⊗ F(Σ_i pre_i X_i) + resᵀ X

Sinkhorn alternates column and row normalisation (ε in each denominator), `hc_sinkhorn_iters` steps in all
(starting with the columns). The head collapses the streams with its own pre map (`HyperHead`). Parameter names
are transformers' (`fn`, `base`, `scale`; the head's `hc_fn`, `hc_base`, `hc_scale`), all kept float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig


def unit_rms(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x²) + ε) over the last dim, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class KeepsFloat32(nn.Module):
    """A module whose own parameters named in `float32_parameters` stay float32 when the model is cast
    (`.to(torch.bfloat16)`, a parent's cast, loading a bf16 tensor with `assign=True`), as V4 keeps its mHC maps,
    attention sinks and compressor position biases; its children are cast as usual."""

    float32_parameters: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KeepsFloat32:
        before = {name: getattr(self, name).detach() for name in self.float32_parameters}
        super()._apply(fn, recurse)
        self._keep_float32(before)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_float32({})

    @torch.no_grad()
    def _keep_float32(self, before: dict[str, Tensor]) -> None:
        for name in self.float32_parameters:
            after = getattr(self, name)
            if after.dtype != torch.float32 and after.dtype.is_floating_point:
                source = before.get(name)
                source = source if source is not None and source.dtype == torch.float32 else after.detach()
                after.data = source.to(device=after.device, dtype=torch.float32)


class HyperConnection(KeepsFloat32):
    """The pre, post and residual maps of mHC around one block (see the module docstring)."""

    float32_parameters = ("fn", "base", "scale")

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        n = config.hc_mult
        self.n_streams, self.iters, self.eps, self.norm_eps = (
            n,
            config.hc_sinkhorn_iters,
            config.hc_eps,
            config.rms_norm_eps,
        )
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
        self.std = config.initializer_range
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_fn ~ N(0, initializer_range²), b = 0, α = 1 (transformers' init)."""
        self.fn.normal_(0.0, self.std)
        self.base.zero_()
        self.scale.fill_(1.0)

    def forward(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """streams X [B, S, n, H] → (block input Σ pre_i X_i [B, S, H], post [B, S, n], res [B, S, n, n])."""
        n = self.n_streams
        mixes = F.linear(unit_rms(streams.flatten(2), self.norm_eps), self.fn.float())
        a_pre, a_post, a_res = mixes.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_res = self.base.float().split([n, n, n * n])
        scale = self.scale.float()
        pre = torch.sigmoid(a_pre * scale[0] + b_pre) + self.eps
        post = 2 * torch.sigmoid(a_post * scale[1] + b_post)
        res = torch.softmax(a_res.unflatten(-1, (n, n)) * scale[2] + b_res.view(n, n), dim=-1) + self.eps
        res = res / (res.sum(-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            res = res / (res.sum(-1, keepdim=True) + self.eps)
            res = res / (res.sum(-2, keepdim=True) + self.eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype)
        return collapsed, post, res

    @staticmethod
    def merge(block_out: Tensor, streams: Tensor, post: Tensor, res: Tensor) -> Tensor:
        """X' = post ⊗ F(x) + resᵀ X: block_out [B, S, H], streams [B, S, n, H] → [B, S, n, H]."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + res.to(dtype).transpose(-1, -2) @ streams


class HyperHead(KeepsFloat32):
    """The final collapse of the n streams before the norm and head: Σ_i (σ(α · x̃ W_i + b_i) + ε) X_i."""

    float32_parameters = ("hc_fn", "hc_base", "hc_scale")

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        n = config.hc_mult
        self.eps, self.norm_eps, self.std = config.hc_eps, config.rms_norm_eps, config.initializer_range
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.hc_fn.normal_(0.0, self.std)
        self.hc_base.zero_()
        self.hc_scale.fill_(1.0)

    def forward(self, streams: Tensor) -> Tensor:
        """streams [B, S, n, H] → [B, S, H]."""
        mixes = F.linear(unit_rms(streams.flatten(2), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype)
