"""PESC adapter experts (Wu et al., 2024, "Parameter-Efficient Sparsity Crafting from Dense to Mixture-of-Experts for
Instruction Tuning on General Tasks"; docs/design.md#pesc-adapter-experts).

Expert i of a PESC layer is the shared dense FFN F followed by its own bottleneck adapter A_i:

    E_i(x) = A_i(F(x)),   A_i(y) = y + W_up,i σ(W_down,i y),   W_down,i [r, H], W_up,i [H, r], σ = SiLU

and the layer computes Σ_{i ∈ TopK(x)} g_i E_i(x). The `MoE` layer computes F(x) once per token (its
`shared_experts`, frozen in training) and hands the expert-sorted rows of F(x) to `AdapterExperts`, which runs
every adapter with one grouped product per projection, as `RoutedExperts` runs the SwiGLU experts. W_up starts at
zero, so with gate weights that sum to 1 (norm_topk_prob) the layer computes F(x) at step 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.moe.experts import RoutedExperts, _local, grouped_matmul


class AdapterExperts(nn.Module):
    """N_r bottleneck adapters of rank r on H-wide rows, computed on expert-sorted rows.

    Stored as the routed experts are ([N_r, out, in] per projection): `adapter_down` [N_r, r, H] (W_down,i) and
    `adapter_up` [N_r, H, r] (W_up,i).
    """

    use_kernel = RoutedExperts.use_kernel
    """The routed experts' choice between the grouped kernel and a loop over the experts."""

    def __init__(self, n_experts: int, hidden_size: int, rank: int, implementation: str = "auto"):
        super().__init__()
        self.n_experts = n_experts
        self.implementation = implementation
        self.fp8 = False  # MoEConfig refuses fp8_experts with adapters
        self.adapter_down = nn.Parameter(torch.empty(n_experts, rank, hidden_size))
        self.adapter_up = nn.Parameter(torch.empty(n_experts, hidden_size, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_down,i as nn.Linear, U(−1/√H, 1/√H); W_up,i = 0, so that every adapter starts as the identity."""
        bound = 1 / math.sqrt(self.adapter_down.shape[-1])
        nn.init.uniform_(self.adapter_down, -bound, bound)
        nn.init.zeros_(self.adapter_up)

    def forward(self, y: Tensor, tokens_per_expert: Tensor, row_weight: Tensor | None = None) -> Tensor:
        """y [S, H] (rows of F(x)) sorted by expert, tokens_per_expert [N_r] → g · A_i(y) [S, H], `row_weight` [S]
        the gate g_i,t of each row (None: 1)."""
        down, up = _local(self.adapter_down), _local(self.adapter_up)
        if torch.is_autocast_enabled(y.device.type):  # grouped_mm is not autocast-aware
            dtype = torch.get_autocast_dtype(y.device.type)
            y, down, up = y.to(dtype), down.to(dtype), up.to(dtype)
        elif y.dtype != down.dtype:
            y = y.to(down.dtype)
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        use_kernel = self.use_kernel(y)
        hidden = F.silu(grouped_matmul(y, down.transpose(1, 2), offsets, use_kernel))  # [S, r]
        out = y + grouped_matmul(hidden, up.transpose(1, 2), offsets, use_kernel)
        if row_weight is not None:
            out = out * row_weight.unsqueeze(-1).to(out.dtype)
        return out
