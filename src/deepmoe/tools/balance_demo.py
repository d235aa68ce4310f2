"""Aux-loss-free balancing (R4) on a deliberately skewed router: load before and after.

A tiny DeepSeek-V3-style layer (sigmoid gate, node-limited `noaux_tc` routing,
norm_topk_prob, shared expert) whose router prefers a few experts on every
token; the selection bias b is updated from each batch's load,
b_i += γ·sign(mean load − load_i), and MaxVio falls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepmoe.config import MoEConfig
from deepmoe.moe import MoE
from deepmoe.moe.balance import expert_counts, max_violation
from deepmoe.presets import get_preset


def tiny_v3_config(**overrides) -> MoEConfig:
    """The tiny-v3 preset's MoE layer (sigmoid gate, noaux_tc groups, bias balancing), 32 experts of width 32."""
    fields = {
        **get_preset("tiny-v3").moe.to_dict(),
        "hidden_size": 64,
        "moe_intermediate_size": 32,
        "n_routed_experts": 32,
        "seq_aux_loss_alpha": 0.0,
        **overrides,
    }
    return MoEConfig(**fields)


def skew_router(layer: MoE, n_favoured: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Point the centroids of the first `n_favoured` experts along one direction d; return d.

    Tokens drawn as noise + d then score those experts higher: a collapsed router.
    """
    h = layer.config.hidden_size
    direction = torch.randn(h, generator=generator)
    direction /= direction.norm()
    with torch.no_grad():
        layer.gate.weight[:n_favoured] += strength * direction
    return direction


def skewed_batch(direction: torch.Tensor, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n_tokens, direction.numel(), generator=generator) + direction


@dataclass
class BalanceRun:
    load_before: torch.Tensor
    """[N_r] tokens per expert on the held-out batch before any bias update."""
    load_after: torch.Tensor
    max_vio_before: float
    max_vio_after: float
    max_vio_per_step: list[float]
    """MaxVio of each training batch, before that step's bias update."""
    bias: torch.Tensor


@torch.no_grad()
def run_balance_demo(
    config: MoEConfig | None = None,
    steps: int = 300,
    n_tokens: int = 4096,
    n_favoured: int = 4,
    strength: float = 1.0,
    seed: int = 0,
) -> BalanceRun:
    """Route fresh skewed batches for `steps` bias updates; measure load on one held-out batch."""
    config = config or tiny_v3_config()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = MoE(config).eval()
    direction = skew_router(layer, n_favoured, strength, generator)
    held_out = skewed_batch(direction, n_tokens, generator)

    def load_on(batch: torch.Tensor) -> torch.Tensor:
        return expert_counts(layer.gate(batch).topk_idx, config.n_routed_experts)

    before = load_on(held_out)
    per_step = []
    for _ in range(steps):
        load = load_on(skewed_batch(direction, n_tokens, generator))
        per_step.append(float(max_violation(load)))
        layer.update_bias(load)
    after = load_on(held_out)
    return BalanceRun(
        before,
        after,
        float(max_violation(before)),
        float(max_violation(after)),
        per_step,
        layer.gate.e_score_correction_bias.clone(),
    )
