"""LoRA on the routed experts (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
docs/design.md#lora-adapters): per-expert low-rank adapters on the stacked expert tensors.

Each expert j of a stacked projection W [N_r, out, in] (`gate_up_proj` [N_r, 2I, H], `down_proj` [N_r, H, I])
gets A_j [r, in] and B_j [out, r], stacked as A [N_r, r, in] and B [N_r, out, r]:

    W'_j = W_j + (α/r)·B_j A_j,   B = 0 at the start, so the adapted layer first computes what the base does.

The low-rank path of the rows routed to expert j is computed like the experts' own product, with the
grouped product over the expert-sorted rows (`grouped_matmul`: one kernel call per factor, or its per-expert
loop where the kernel is missing): y = x W_jᵀ + (α/r)·(x A_jᵀ) B_jᵀ, never with W' formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deepmoe.moe.experts import RoutedExperts, _local, grouped_matmul

PROJECTIONS = ("gate_up_proj", "down_proj")


class LoRAExperts(RoutedExperts):
    """`RoutedExperts` whose two stacked projections carry per-expert LoRA factors.

    Built around an existing `experts` module: the same `gate_up_proj` / `down_proj` parameters (same names,
    not copied), plus `{proj}_lora_A` [N_r, r, in] and `{proj}_lora_B` [N_r, out, r] for proj in PROJECTIONS,
    on the base weights' device and dtype. A is drawn as PEFT does (nn.Linear's init, U(−1/√in, 1/√in)), B is 0.

    `experts_trained` (ESFT with LoRA): only these experts get a nonzero A; the others keep A_j = B_j = 0, where
    both gradients vanish (∂L/∂B_j = Σ g (A_j x)ᵀ = 0, ∂L/∂A_j = Σ B_jᵀ g xᵀ = 0), so training never moves them
    and their weights stay exactly the base's. None: every expert.
    """

    def __init__(self, experts: RoutedExperts, rank: int, alpha: float, experts_trained: Sequence[int] | None = None):
        nn.Module.__init__(self)
        adopt(self, experts)  # the base weights are `experts`' own parameters, not new ones
        self.rank, self.alpha = rank, alpha
        self.experts_trained = None if experts_trained is None else sorted(set(experts_trained))
        for name in PROJECTIONS:
            base = getattr(self, name)
            n, out_features, in_features = base.shape
            factory = {"device": base.device, "dtype": base.dtype}
            self.register_parameter(f"{name}_lora_A", nn.Parameter(torch.empty(n, rank, in_features, **factory)))
            self.register_parameter(f"{name}_lora_B", nn.Parameter(torch.empty(n, out_features, rank, **factory)))
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        """α/r."""
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A_j ~ U(−1/√in, 1/√in) for the trained experts (0 for the others), B = 0."""
        for name in PROJECTIONS:
            lora_a, lora_b = self.lora_factors(name)
            bound = 1 / math.sqrt(lora_a.shape[-1])
            nn.init.uniform_(lora_a, -bound, bound)
            if self.experts_trained is not None:
                frozen = torch.ones(lora_a.shape[0], dtype=torch.bool)
                frozen[self.experts_trained] = False
                lora_a[frozen.to(lora_a.device)] = 0
            nn.init.zeros_(lora_b)

    def lora_factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A [N_r, r, in], B [N_r, out, r]) of the projection `name`."""
        return getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")

    def delta_weight(self, name: str) -> Tensor:
        """(α/r)·B_j A_j for every expert: [N_r, out, in], the change the adapter makes to `name`'s weights."""
        lora_a, lora_b = self.lora_factors(name)
        return torch.bmm(lora_b, lora_a) * self.scaling

    def _project(self, name: str, x: Tensor, weight: Tensor, offsets: Tensor, use_kernel: bool) -> Tensor:
        """x W_jᵀ + (α/r)·(x A_jᵀ) B_jᵀ on each expert's rows: three grouped products, [S, in] → [S, out]."""
        out = super()._project(name, x, weight, offsets, use_kernel)
        lora_a, lora_b = (_local(t).to(x.dtype) for t in self.lora_factors(name))
        low = grouped_matmul(x, lora_a.transpose(1, 2), offsets, use_kernel)  # [S, r]
        return out + grouped_matmul(low, lora_b.transpose(1, 2), offsets, use_kernel) * self.scaling

    def unwrap(self) -> RoutedExperts:
        """A plain `RoutedExperts` holding this module's base parameters (the adapter dropped, not merged)."""
        plain = RoutedExperts.__new__(RoutedExperts)
        nn.Module.__init__(plain)
        adopt(plain, self, skip=_LORA_ATTRIBUTES)
        return plain


_LORA_ATTRIBUTES = frozenset(
    {"rank", "alpha", "experts_trained", *(f"{p}_lora_{f}" for p in PROJECTIONS for f in "AB")}
)


def adopt(target: nn.Module, source: nn.Module, skip: frozenset[str] = frozenset()) -> None:
    """Give the fresh module `target` the attributes, parameters, buffers and submodules of `source` (the same
    objects, under the same names), except those named in `skip`: a module of another class over the same weights."""
    for name, value in vars(source).items():
        if not name.startswith("_") and name not in skip:
            setattr(target, name, value)
    for name, param in source._parameters.items():
        if name not in skip:
            target.register_parameter(name, param)
    for name, buffer in source._buffers.items():
        target.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
    for name, module in source._modules.items():
        target.add_module(name, module)
