"""The scoring formulas of `deepmoe analyze` (docs/design.md#s1-routing-analysis and
#b6-routing-metrics-and-maxvio): pure functions of one MoE layer's routing counts, tensors in, floats or
tensors out. The notation and every definition are in `deepmoe.tools.analyze`'s docstring (and, one line
each, in DEFINITIONS, which goes into every report); each formula is tested against a hand-computed example.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from deepmoe.moe.balance import coefficient_of_variation, max_violation

DOMINANT_FACTOR = 2.0
"""An expert is dominant when its load exceeds DOMINANT_FACTOR × the mean load."""
SOURCE_PSEUDO_COUNT = 1.0
"""Laplace smoothing of the per-source counts in the specificity score."""
MIN_COUNT = 5
"""Pairs (co-activation) and tokens (vocabulary) seen fewer times are not ranked by lift."""

DEFINITIONS = {
    "share": "p_i = c_i / sum_j c_j: expert i's share of the layer's K*T routed slots",
    "selection_ratio": "r_i = c_i / T: fraction of tokens that chose expert i",
    "average_gate": "sum_t g_i,t / T: mean gate weight of expert i per token (0 when not chosen)",
    "maxvio": "(max_i c_i - mean c) / mean c",
    "cv": "std(c) / mean(c), population std",
    "entropy": "H = -sum_i p_i ln p_i (nats)",
    "normalized_entropy": "H / ln N in [0, 1]; at least ln K / ln N under top-K routing",
    "effective_experts": "exp(H) in [1, N]",
    "dead_experts": "experts with c_i = 0",
    "dominant_experts": f"experts with c_i > {DOMINANT_FACTOR:g} * mean c (p_i > {DOMINANT_FACTOR:g}/N)",
    "collapse": "warning when exp(H) < N/2, or >= N/4 dead experts, or one expert with p_i > 0.5 (learned layers)",
    "routing": "learned: a router's top-K of its scores; hash: a fixed table of the token id (tid2eid, DeepSeek-V4)",
    "js_divergence": "JS(P,Q) = KL(P||M)/2 + KL(Q||M)/2, M = (P+Q)/2, base 2, in [0, 1]",
    "specificity": "log2(p~_s,i / mean_{r!=s} p~_r,i), p~_s,i = (c_s,i + 1) / (sum_j c_s,j + N)",
    "coactivation_lift": "P(i,j) / (P(i) P(j)) = C_ij T / (c_i c_j); independent uniform top-K: (K-1)N/(K(N-1))",
    "token_lift": "P(i | v) / r_i, P(i | v) = n_v,i / n_v; tokens seen >= min_count times",
}


# ---- scoring formulas (tensors in, floats/tensors out) -----------------------------------------


def finite(value) -> float | None:
    """`value` as a float, or None when it is NaN or infinite (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def shares(counts: Tensor) -> Tensor:
    """[..., N] counts → the distribution over the last dimension (all zero stays zero)."""
    counts = counts.double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)


def entropy(p: Tensor) -> float:
    """H(p) = −Σ p_i ln p_i in nats (0 ln 0 = 0); `p` is normalised first."""
    p = shares(p)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum())


def load_metrics(counts: Tensor) -> dict[str, Any]:
    """B6 numbers of one layer's [N] tokens-per-expert: MaxVio, CV, entropy (nats, normalised,
    effective experts), dead and dominant experts and the collapse warning with its reasons."""
    counts = counts.long()
    n = counts.numel()
    p = shares(counts)
    h = entropy(p)
    mean = counts.double().mean()
    dead = [int(i) for i in torch.nonzero(counts == 0).flatten()]
    dominant = [int(i) for i in torch.nonzero(counts.double() > DOMINANT_FACTOR * mean).flatten()]
    effective = math.exp(h)
    reasons = []
    if effective < n / 2:
        reasons.append(f"only {effective:.2f} effective experts of {n} (< N/2)")
    if n > 1 and len(dead) >= n / 4:
        reasons.append(f"{len(dead)} of {n} experts are dead (>= N/4)")
    if float(p.max()) > 0.5:
        reasons.append(f"expert {int(p.argmax())} holds {float(p.max()):.0%} of the slots (> 50%)")
    return {
        "maxvio": float(max_violation(counts)),
        "cv": float(coefficient_of_variation(counts)),
        "entropy": h,
        "normalized_entropy": h / math.log(n) if n > 1 else 1.0,
        "effective_experts": effective,
        "dead_experts": dead,
        "dominant_experts": dominant,
        "collapse": {"warning": bool(reasons), "reasons": reasons},
    }


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen–Shannon divergence in bits between two distributions (normalised first): in [0, 1]."""
    p, q = shares(p), shares(q)
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        mask = a > 0
        return (a[mask] * torch.log2(a[mask] / m[mask])).sum()

    return float(((kl(p) + kl(q)) / 2).clamp(0.0, 1.0))


def specificity(counts: Tensor, pseudo_count: float = SOURCE_PSEUDO_COUNT) -> Tensor:
    """[S, N] per-source counts → [S, N] log2(p̃_s,i / mean_{r≠s} p̃_r,i), p̃ the shares smoothed by
    `pseudo_count` per expert. Needs at least two sources."""
    s, n = counts.shape
    if s < 2:
        raise ValueError("specificity needs at least two sources")
    smoothed = (counts.double() + pseudo_count) / (counts.double().sum(-1, keepdim=True) + pseudo_count * n)
    others = (smoothed.sum(0, keepdim=True) - smoothed) / (s - 1)
    return torch.log2(smoothed / others)


def coactivation_lift(coactivation: Tensor, tokens: int) -> Tensor:
    """[N, N] lift P(i,j) / (P(i) P(j)) = C_ij T / (c_i c_j), c = the diagonal; NaN where c_i c_j = 0."""
    c = coactivation.diagonal().double()
    expected = torch.outer(c, c)
    lift = coactivation.double() * tokens / expected
    return torch.where(expected > 0, lift, torch.full_like(lift, math.nan))


def independent_lift(n_experts: int, k: int) -> float:
    """The lift of every pair when each token picks K of N experts uniformly at random."""
    if n_experts < 2 or k < 2:
        return 0.0
    return (k - 1) * n_experts / (k * (n_experts - 1))


def token_lift(token_expert: Tensor, token_counts: Tensor, counts: Tensor, tokens: int) -> Tensor:
    """[V, N] lift P(i | v) / r_i with P(i | v) = n_v,i / n_v and r_i = c_i / T; NaN where n_v = 0 or
    c_i = 0."""
    n_v = token_counts.double()[:, None]
    ratio = counts.double()[None, :] / max(tokens, 1)
    lift = token_expert.double() / n_v / ratio
    valid = (n_v > 0) & (ratio > 0)
    return torch.where(valid, lift, torch.full_like(lift, math.nan))


def top_pairs(
    coactivation: Tensor, tokens: int, top_k: int, by: str = "lift", min_count: int = MIN_COUNT
) -> list[dict[str, Any]]:
    """The `top_k` expert pairs i < j by lift (pairs with C_ij ≥ min_count) or by count C_ij."""
    lift = coactivation_lift(coactivation, tokens)
    n = coactivation.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    count = coactivation[i, j]
    pair_lift = lift[i, j]
    if by == "lift":
        keep = (count >= min_count) & ~torch.isnan(pair_lift)
        key = torch.where(keep, pair_lift, torch.full_like(pair_lift, -math.inf))
    elif by == "count":
        keep = count > 0
        key = count.double()
    else:
        raise ValueError(f"rank pairs by 'lift' or 'count', not {by!r}")
    # stable order: key descending, then (i, j) ascending
    order = sorted(range(len(key)), key=lambda m: (-float(key[m]), int(i[m]), int(j[m])))
    result = []
    for m in order:
        if len(result) >= top_k or not keep[m]:
            break
        result.append(
            {
                "experts": [int(i[m]), int(j[m])],
                "count": int(count[m]),
                "lift": finite(pair_lift[m]),
            }
        )
    return result
