"""Configuration dataclasses, validated when built.

Field names follow Hugging Face's DeepSeek configs (`n_routed_experts`,
`num_experts_per_tok`, `n_group`, `topk_group`, `routed_scaling_factor`, ...)
so that checkpoint configs map onto them one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
CAPACITY_SCOPES = ("expert", "device")
DROP_POLICIES = ("probs", "position")
EXPERTS_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")


def _fail(cls: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{field}={value!r} is invalid: {allowed}")


@dataclass
class MoEConfig:
    """One DeepSeekMoE layer (SPEC R1–R6, B1–B5, E1–E3).

    Notation of the papers: H = `hidden_size`, N_r = `n_routed_experts`,
    N_s = `n_shared_experts`, K_r = `num_experts_per_tok`, G = `n_group`,
    M = `topk_group`, D = `n_devices`, γ = `bias_update_speed`.
    """

    hidden_size: int = 1024
    moe_intermediate_size: int = 256
    """Width of each routed expert's SwiGLU FFN (fine-grained: a fraction of a dense FFN)."""
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    """Always-active experts, run as one SwiGLU of width N_s × moe_intermediate_size."""
    num_experts_per_tok: int = 6

    # gate (R1, R2)
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    # group-limited routing (R3): "greedy" (no groups), "group_limited_greedy"
    # (V2: group score = max score), "noaux_tc" (V3: sum of the top-2 biased scores)
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1

    # aux-loss-free balancing (R4): b_i += γ·sign(mean load − load_i)
    use_expert_bias: bool = False
    bias_update_speed: float = 0.001

    # token dropping (R5), training only; None turns it off
    capacity_factor: float | None = None
    capacity_scope: str = "expert"
    """Capacity per expert (cf·T·K_r/N_r) or per device (cf·T·K_r/D)."""
    drop_policy: str = "probs"
    """"probs": drop the lowest-affinity slots; "position": drop the latest tokens."""
    no_drop_fraction: float = 0.0
    """Fraction of the batch's sequences (the first ones) whose tokens are never dropped."""

    # balance losses (B1–B5); each term is multiplied by its weight, 0 turns it off
    n_devices: int = 1
    """D: how many devices the experts are spread over (device-level losses, capacity)."""
    aux_loss_alpha: float = 0.0
    """α1, expert-level loss (B1)."""
    device_aux_loss_alpha: float = 0.0
    """α2, device-level loss (B2)."""
    comm_aux_loss_alpha: float = 0.0
    """α3, communication loss (B3)."""
    seq_aux_loss_alpha: float = 0.0
    """α of the sequence-wise loss (B4)."""
    z_loss_coef: float = 0.0
    """Router z-loss: mean_t (logsumexp_i u_t·e_i)²."""
    entropy_loss_coef: float = 0.0
    """Mean per-token routing entropy; > 0 sharpens routing, < 0 spreads it."""

    experts_implementation: str = "auto"
    """"grouped_mm" (one grouped product), "loop" (per-expert slices) or "auto"."""

    def __post_init__(self) -> None:
        name = type(self).__name__

        def check(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                _fail(name, field, getattr(self, field), allowed)

        for field in (
            "hidden_size",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "n_devices",
        ):
            value = getattr(self, field)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "must be an integer >= 1"
            )
        check(
            isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
            "n_shared_experts",
            "must be an integer >= 0",
        )
        n_r = self.n_routed_experts
        check(self.num_experts_per_tok <= n_r, "num_experts_per_tok", f"must be in [1, n_routed_experts={n_r}]")
        check(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        check(
            math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            "must be a finite number > 0",
        )

        check(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        check(n_r % self.n_group == 0, "n_group", f"must divide n_routed_experts={n_r}")
        check(
            self.topk_method != "greedy" or self.n_group == 1,
            "n_group",
            "must be 1 with topk_method='greedy' (use 'group_limited_greedy' or 'noaux_tc' for groups)",
        )
        check(self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
        per_group = n_r // self.n_group
        check(
            self.topk_group * per_group >= self.num_experts_per_tok,
            "topk_group",
            f"topk_group × experts per group ({per_group}) must be >= num_experts_per_tok={self.num_experts_per_tok}",
        )
        check(
            self.topk_method != "noaux_tc" or per_group >= 2,
            "n_group",
            "noaux_tc scores a group by its top-2 experts: each group needs >= 2 experts",
        )

        check(
            math.isfinite(self.bias_update_speed) and self.bias_update_speed >= 0,
            "bias_update_speed",
            "must be a finite number >= 0",
        )
        cf = self.capacity_factor
        check(cf is None or (math.isfinite(cf) and cf > 0), "capacity_factor", "must be None or a number > 0")
        check(self.capacity_scope in CAPACITY_SCOPES, "capacity_scope", f"must be one of {CAPACITY_SCOPES}")
        check(self.drop_policy in DROP_POLICIES, "drop_policy", f"must be one of {DROP_POLICIES}")
        check(0.0 <= self.no_drop_fraction <= 1.0, "no_drop_fraction", "must be in [0, 1]")
        check(n_r % self.n_devices == 0, "n_devices", f"must divide n_routed_experts={n_r}")

        for field in (
            "aux_loss_alpha",
            "device_aux_loss_alpha",
            "comm_aux_loss_alpha",
            "seq_aux_loss_alpha",
            "z_loss_coef",
        ):
            value = getattr(self, field)
            check(math.isfinite(value) and value >= 0, field, "must be a finite number >= 0")
        check(math.isfinite(self.entropy_loss_coef), "entropy_loss_coef", "must be a finite number")
        check(
            self.experts_implementation in EXPERTS_IMPLEMENTATIONS,
            "experts_implementation",
            f"must be one of {EXPERTS_IMPLEMENTATIONS}",
        )

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def experts_per_device(self) -> int:
        return self.n_routed_experts // self.n_devices

    @property
    def max_devices_per_token(self) -> int:
        """M of the communication loss (B3): how many devices one token can reach at most."""
        if self.topk_method != "greedy" and self.n_group == self.n_devices:
            return self.topk_group
        return min(self.num_experts_per_tok, self.n_devices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
