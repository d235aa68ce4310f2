"""Root-mean-square layer normalisation."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm(x) = g · x / sqrt(mean(x²) + ε), normalised in float32 and cast back to x's dtype before the gain g.

    The order of HF's DeepseekV3RMSNorm / LlamaRMSNorm, so low-precision outputs round the same way.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        """g = 1 (what the constructor sets; for a norm built on the meta device, after `to_empty`)."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
