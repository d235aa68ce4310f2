"""Balance losses (B1–B5) and routing metrics (B6), docs/design.md#balance-losses-and-metrics.

Pure functions of a `RouterOutput`; nothing here re-runs the router.
Notation: T tokens, N = N_r routed experts, K = K_r chosen per token,
D devices, M = devices a token may reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepmoe.config import MoEConfig
from deepmoe.moe.router import RouterOutput, count_ids


def expert_counts(topk_idx: Tensor, n_experts: int) -> Tensor:
    """[N] int64: how many of the T·K slots chose each expert (before any dropping)."""
    return count_ids(topk_idx, n_experts)


def expert_balance_loss(scores: Tensor, topk_idx: Tensor) -> Tensor:
    """B1: Σ_i f_i P_i, f_i = N/(K T) Σ_t 1(t chooses i), P_i = (1/T) Σ_t s_i,t."""
    t, n = scores.shape
    k = topk_idx.shape[1]
    f = expert_counts(topk_idx, n).to(scores.dtype) * (n / (k * t))
    p = scores.mean(0)
    return (f * p).sum()


def device_balance_loss(scores: Tensor, topk_idx: Tensor, n_devices: int) -> Tensor:
    """B2: Σ_d f'_d P'_d, f'_d = mean of f_i over E_d, P'_d = Σ_{i∈E_d} P_i."""
    t, n = scores.shape
    k = topk_idx.shape[1]
    f = expert_counts(topk_idx, n).to(scores.dtype) * (n / (k * t))
    f_dev = f.view(n_devices, -1).mean(-1)
    p_dev = scores.mean(0).view(n_devices, -1).sum(-1)
    return (f_dev * p_dev).sum()


def communication_balance_loss(scores: Tensor, topk_idx: Tensor, n_devices: int, max_devices: int) -> Tensor:
    """B3: Σ_d f''_d P'_d, f''_d = D/(M T) Σ_t 1(t is sent to device d)."""
    t, n = scores.shape
    device_of = topk_idx // (n // n_devices)  # [T, K]
    sent = torch.zeros(t, n_devices, dtype=torch.bool, device=scores.device).scatter_(1, device_of, True)
    f = sent.sum(0).to(scores.dtype) * (n_devices / (max_devices * t))
    p_dev = scores.mean(0).view(n_devices, -1).sum(-1)
    return (f * p_dev).sum()


def sequence_balance_loss(scores: Tensor, topk_idx: Tensor, batch_size: int) -> Tensor:
    """B4 (V3): B1 inside each sequence with s' = s / Σ_j s_j, averaged over the sequences."""
    t, n = scores.shape
    k = topk_idx.shape[1]
    seq_len = t // batch_size
    normalised = scores / scores.sum(-1, keepdim=True)
    p = normalised.view(batch_size, seq_len, n).mean(1)  # [B, N]
    chosen = torch.zeros(batch_size, n, device=scores.device, dtype=scores.dtype)
    chosen.scatter_add_(
        1,
        topk_idx.view(batch_size, seq_len * k),
        torch.ones_like(topk_idx, dtype=scores.dtype).view(batch_size, seq_len * k),
    )
    f = chosen * (n / (k * seq_len))
    return (f * p).sum(-1).mean()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean_t (logsumexp_i logits_t,i)²."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_entropy(scores: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of p_t = s_t / Σ_j s_j,t."""
    p = scores / scores.sum(-1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()


def balance_losses(routing: RouterOutput, config: MoEConfig) -> dict[str, Tensor]:
    """Each enabled loss term, already multiplied by its weight (α); empty when all weights are 0."""
    s, idx = routing.scores, routing.topk_idx
    # P_i of B1–B3 averages affinities that sum to 1 per token: softmax scores already do; sigmoid scores are
    # normalised, s' = s / Σ_j s_j, as V3 does for B4 (raw sigmoid P_i would let the loss shrink every score
    # instead of balancing the load)
    p = s if config.scoring_func == "softmax" else s / s.sum(-1, keepdim=True)
    losses: dict[str, Tensor] = {}
    if config.aux_loss_alpha:
        losses["expert"] = config.aux_loss_alpha * expert_balance_loss(p, idx)
    if config.device_aux_loss_alpha:
        losses["device"] = config.device_aux_loss_alpha * device_balance_loss(p, idx, config.n_devices)
    if config.comm_aux_loss_alpha:
        losses["communication"] = config.comm_aux_loss_alpha * communication_balance_loss(
            p, idx, config.n_devices, config.max_devices_per_token
        )
    if config.seq_aux_loss_alpha:
        losses["sequence"] = config.seq_aux_loss_alpha * sequence_balance_loss(s, idx, routing.batch_size)
    if config.z_loss_coef:
        losses["z"] = config.z_loss_coef * z_loss(routing.logits)
    if config.entropy_loss_coef:
        losses["entropy"] = config.entropy_loss_coef * routing_entropy(s)
    return losses


# ---- B6 metrics ---------------------------------------------------------------------------------
def max_violation(load: Tensor) -> Tensor:
    """MaxVio = (max_i load_i − mean load) / mean load."""
    load = load.float()
    mean = load.mean()
    return (load.max() - mean) / mean.clamp_min(1e-12)


def coefficient_of_variation(load: Tensor) -> Tensor:
    """std(load) / mean(load) (population std)."""
    load = load.float()
    return load.std(correction=0) / load.mean().clamp_min(1e-12)


@dataclass
class RoutingStats:
    """Per-layer routing statistics of one forward pass (detached, no grad)."""

    tokens_per_expert: Tensor
    """[N] int64, slots that chose each expert (the load b_i is updated from)."""
    kept_per_expert: Tensor
    """[N] int64, slots each expert actually computed (after capacity dropping)."""
    max_vio: Tensor
    """MaxVio of `tokens_per_expert`."""
    cv: Tensor
    """Coefficient of variation of `tokens_per_expert`."""
    entropy: Tensor
    """Mean per-token routing entropy, nats."""
    dead_experts: Tensor
    """Experts no token chose."""
    dropped_fraction: Tensor
    """Fraction of the T·K slots dropped by capacity."""


@torch.no_grad()
def routing_stats(routing: RouterOutput) -> RoutingStats:
    n = routing.scores.shape[1]
    load = expert_counts(routing.topk_idx, n)
    if routing.kept is None:
        kept, dropped = load, torch.zeros((), device=load.device)
    else:
        kept = count_ids(routing.topk_idx.masked_fill(~routing.kept, n), n + 1)[:n]  # dropped slots count as n
        dropped = 1.0 - routing.kept.float().mean()
    return RoutingStats(
        tokens_per_expert=load,
        kept_per_expert=kept,
        max_vio=max_violation(load),
        cv=coefficient_of_variation(load),
        entropy=routing_entropy(routing.scores),
        dead_experts=(load == 0).sum(),
        dropped_fraction=dropped,
    )


def merge_routing_stats(stats: list[dict[int, RoutingStats]]) -> dict[int, RoutingStats]:
    """Routing statistics of several micro-batches as one: loads summed, metrics recomputed."""
    merged: dict[int, RoutingStats] = {}
    for idx in sorted({i for s in stats for i in s}):
        parts = [s[idx] for s in stats if idx in s]
        load = torch.stack([p.tokens_per_expert for p in parts]).sum(0)
        kept = torch.stack([p.kept_per_expert for p in parts]).sum(0)
        merged[idx] = RoutingStats(
            tokens_per_expert=load,
            kept_per_expert=kept,
            max_vio=max_violation(load),
            cv=coefficient_of_variation(load),
            entropy=torch.stack([p.entropy.float() for p in parts]).mean(),
            dead_experts=(load == 0).sum(),
            dropped_fraction=1.0 - kept.sum().float() / load.sum().clamp_min(1).float(),
        )
    return merged
