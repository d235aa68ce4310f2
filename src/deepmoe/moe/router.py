"""The gate: affinity scores → chosen experts and gate weights (SPEC R1–R6).

The router returns data (`RouterOutput`); it never computes experts.
All router math runs in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import MoEConfig


@dataclass
class RouterOutput:
    """The routing decision for T tokens (shapes use N = N_r, K = K_r)."""

    logits: Tensor
    """[T, N] float32, u_t·e_i."""
    scores: Tensor
    """[T, N] float32, affinities s_i,t (softmax or sigmoid, without the bias)."""
    topk_idx: Tensor
    """[T, K] int64, the chosen experts."""
    topk_weight: Tensor
    """[T, K] float32, gate weights g_i,t of the chosen experts (0 where dropped)."""
    kept: Tensor | None
    """[T, K] bool, False where capacity dropped the slot; None when nothing can be dropped."""
    batch_size: int
    """Number of sequences the T tokens form (sequence-major), for per-sequence quantities."""


def _index_mask(indices: Iterable[int] | Tensor | None, n: int, what: str) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    if indices is None:
        return mask
    idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{what} experts {idx.tolist()} are out of range: expert ids must be in [0, {n - 1}]")
    mask[idx] = True
    return mask


class Router(nn.Module):
    """DeepSeek top-K gate with group limits, selection bias, capacity and masks.

    Parameters use HF names: `weight` [N_r, H] (the expert centroids e_i) and,
    with aux-loss-free balancing, the buffer `e_score_correction_bias` [N_r] (b_i).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        n = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(n, config.hidden_size))
        if config.use_expert_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.register_buffer("disabled_experts", torch.zeros(n, dtype=torch.bool), persistent=False)
        self.register_buffer("forced_experts", torch.zeros(n, dtype=torch.bool), persistent=False)
        self.disable_top = 0
        self.has_expert_mask = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    # ---- R6: masks ---------------------------------------------------------------------------
    def set_expert_mask(
        self,
        disabled: Iterable[int] | Tensor | None = None,
        forced: Iterable[int] | Tensor | None = None,
        disable_top: int = 0,
    ) -> None:
        """Never choose `disabled` experts; always choose `forced` ones (inference steering).
        `disable_top`: per token, its `disable_top` highest-affinity experts may not be chosen either
        (the DeepSeekMoE redundancy test, §4.5: top-K is taken from the remaining experts).

        Raises ValueError if the ids are out of range, overlap, if more experts are
        forced than a token chooses, or if the remaining experts cannot fill K_r slots.
        """
        cfg = self.config
        n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        if isinstance(disable_top, bool) or not isinstance(disable_top, int) or disable_top < 0:
            raise ValueError(f"disable_top must be an integer >= 0, got {disable_top!r}")
        if disable_top and (cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group):
            raise ValueError("disable_top needs routing without group limits (topk_method='greedy')")
        if disable_top and (forced is not None or disabled is not None):
            raise ValueError("disable_top cannot be combined with disabled or forced experts")
        if disable_top + k > n:
            raise ValueError(
                f"disable_top={disable_top} leaves {n - disable_top} experts, fewer than num_experts_per_tok={k}"
            )
        off, on = _index_mask(disabled, n, "disabled"), _index_mask(forced, n, "forced")
        if (off & on).any():
            raise ValueError(f"experts {torch.nonzero(off & on).flatten().tolist()} are both disabled and forced")
        if on.sum() > k:
            raise ValueError(f"{int(on.sum())} forced experts exceed num_experts_per_tok={k}")
        # Worst case reach: a token may pick the topk_group eligible groups with the fewest live experts.
        live = (~off).view(cfg.n_group, cfg.experts_per_group).sum(-1)
        need = 2 if cfg.topk_method == "noaux_tc" else 1
        eligible = live[live >= need].sort().values
        reach = int(eligible[: cfg.topk_group].sum()) if len(eligible) >= cfg.topk_group else 0
        if reach < k:
            raise ValueError(
                f"disabling {int(off.sum())} experts leaves a token only {reach} reachable experts in its "
                f"{cfg.topk_group} groups, fewer than num_experts_per_tok={k}"
            )
        self.disabled_experts.copy_(off)
        self.forced_experts.copy_(on)
        self.disable_top = disable_top
        self.has_expert_mask = bool(off.any() or on.any() or disable_top)

    def clear_expert_mask(self) -> None:
        self.set_expert_mask()

    # ---- R4: aux-loss-free bias ---------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """b_i += γ·sign(mean(load) − load_i), `load` [N_r] = tokens routed to each expert."""
        if self.e_score_correction_bias is None:
            raise ValueError("update_bias needs MoEConfig.use_expert_bias=True")
        if load.shape != self.e_score_correction_bias.shape:
            raise ValueError(
                f"load must have shape {tuple(self.e_score_correction_bias.shape)}, got {tuple(load.shape)}"
            )
        load = load.to(self.e_score_correction_bias)
        self.e_score_correction_bias.add_(self.config.bias_update_speed * torch.sign(load.mean() - load))

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, batch_size: int = 1) -> RouterOutput:
        """Route `x` [T, H]; `batch_size` sequences of T / batch_size tokens each."""
        cfg = self.config
        with torch.autocast(x.device.type, enabled=False):  # router math stays float32 under autocast
            logits = F.linear(x.float(), self.weight.float())  # [T, N]
        if not torch.isfinite(logits).all():
            raise ValueError("MoE router got NaN or inf: the layer input (or the router weight) is not finite")
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()

        choice = scores.detach()  # what selection ranks: s + b, limited to allowed groups/experts
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        masked = self.has_expert_mask
        if masked:
            choice = choice.masked_fill(self.disabled_experts, -math.inf)
            if self.disable_top:
                choice = choice.scatter(1, scores.detach().topk(self.disable_top, dim=-1).indices, -math.inf)
        if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
            choice = self._limit_groups(choice, masked)
        if masked:
            choice = choice.masked_fill(self.forced_experts, math.inf)
        topk_idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]

        topk_weight = scores.gather(1, topk_idx)
        if cfg.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * cfg.routed_scaling_factor

        kept = None
        if self.training and cfg.capacity_factor is not None:
            kept = self._capacity_mask(scores, topk_idx, batch_size)
            topk_weight = topk_weight * kept
        return RouterOutput(logits, scores, topk_idx, topk_weight, kept, batch_size)

    def _limit_groups(self, choice: Tensor, masked: bool) -> Tensor:
        """R3: keep the experts of each token's best `topk_group` groups; −inf elsewhere."""
        cfg = self.config
        t = choice.shape[0]
        grouped = choice.view(t, cfg.n_group, cfg.experts_per_group)
        if cfg.topk_method == "group_limited_greedy":
            group_scores = grouped.amax(-1)  # V2: best expert of the group
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # V3: sum of the top-2 biased scores
        forced_groups = self.forced_experts.view(cfg.n_group, cfg.experts_per_group).any(-1) if masked else None
        if forced_groups is not None:
            group_scores = group_scores.masked_fill(forced_groups, math.inf)
        top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        if forced_groups is not None:
            keep |= forced_groups  # a forced expert's group always counts as chosen
        return grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).view(t, -1)

    def _capacity_mask(self, scores: Tensor, topk_idx: Tensor, batch_size: int) -> Tensor:
        """R5: [T, K] bool, False for slots over their expert's (or device's) capacity.

        Within each expert (device) the slots are ranked by affinity s_i,t ("probs")
        or by token position ("position"); slots of the first `no_drop_fraction` of
        the sequences rank first and are never dropped.
        """
        cfg = self.config
        t, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        if cfg.capacity_scope == "expert":
            unit, n_units = flat_expert, cfg.n_routed_experts
        else:
            unit, n_units = flat_expert // cfg.experts_per_device, cfg.n_devices
        capacity = math.ceil(cfg.capacity_factor * t * k / n_units)

        if cfg.drop_policy == "probs":
            priority = scores.detach().gather(1, topk_idx).reshape(-1)
        else:
            priority = -torch.arange(t, device=scores.device, dtype=torch.float32).repeat_interleave(k)
        n_protected = math.floor(cfg.no_drop_fraction * batch_size) * (t // batch_size)
        protected = torch.zeros(t, k, dtype=torch.bool, device=scores.device)
        protected[:n_protected] = True
        priority = priority.masked_fill(protected.reshape(-1), math.inf)

        order = priority.argsort(descending=True, stable=True)
        order = order[unit[order].argsort(stable=True)]  # grouped by unit, best first inside a unit
        counts = torch.bincount(unit, minlength=n_units)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - starts[unit[order]]
        return (rank < capacity).view(t, k) | protected
