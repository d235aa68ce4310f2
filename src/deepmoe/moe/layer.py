"""The DeepSeekMoE layer: router + dispatcher + routed experts + shared experts.

h_t = Σ_{i ≤ N_s} FFN_i^(s)(u_t) + Σ_{i ≤ N_r} g_i,t FFN_i^(r)(u_t)   (the residual is added by the block)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmoe.config import MoEConfig
from deepmoe.moe.balance import RoutingStats, balance_losses, routing_stats
from deepmoe.moe.dispatch import ExpertParallelDispatcher, LocalDispatcher
from deepmoe.moe.experts import RoutedExperts, SwiGLU
from deepmoe.moe.router import Router, RouterOutput


@dataclass
class MoEOutput:
    hidden_states: Tensor
    """Same shape as the input: shared + Σ g · routed expert outputs."""
    aux_loss: Tensor
    """Scalar, the sum of `losses` (0 when every loss weight is 0)."""
    losses: dict[str, Tensor] = field(default_factory=dict)
    """Each weighted balance loss term by name (expert, device, communication, sequence, z, entropy)."""
    routing: RouterOutput | None = None
    stats: RoutingStats | None = None


class MoE(nn.Module):
    """DeepSeekMoE layer (fine-grained routed experts + shared experts), HF parameter names:
    `gate` (router), `experts` (stacked routed experts), `shared_experts` (one SwiGLU).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = RoutedExperts(
            config.n_routed_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            config.experts_implementation,
            fp8=config.fp8_experts,
        )
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.dispatcher: LocalDispatcher | ExpertParallelDispatcher = LocalDispatcher(config.n_routed_experts)

    @property
    def expert_parallel(self) -> bool:
        """Whether the routed experts are sharded over a process group (`enable_expert_parallel`)."""
        return isinstance(self.dispatcher, ExpertParallelDispatcher)

    @torch.no_grad()
    def enable_expert_parallel(self, group: dist.ProcessGroup | None = None) -> None:
        """Keep only this rank's routed experts [r·N_r/D, (r+1)·N_r/D) and dispatch with all-to-all over `group`
        (D ranks; None: the default group). Router and shared experts stay replicated.

        Each rank then computes exactly what this layer computes on the same (local) tokens: routing, capacity
        and balance losses are per rank's batch, with n_devices = D so that B2, B3 and per-device capacity count
        the real ranks. Device-limited routing (R3) bounds ranks when n_group == D (group g = rank g's experts).
        """
        if self.expert_parallel:
            raise ValueError("expert parallelism is already enabled on this MoE layer")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = self.config.n_routed_experts
        if n % world:
            raise ValueError(f"MoEConfig.n_routed_experts={n} must be divisible by the expert-parallel size {world}")
        self.config = dataclasses.replace(self.config, n_devices=world)
        self.gate.config = self.config
        self.dispatcher = ExpertParallelDispatcher(n, group)
        lo, hi = rank * n // world, (rank + 1) * n // world
        experts = self.experts
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[lo:hi].clone())
        experts.down_proj = nn.Parameter(experts.down_proj[lo:hi].clone())
        experts.n_experts = hi - lo

    def forward(self, hidden_states: Tensor) -> MoEOutput:
        """hidden_states [B, S, H] or [T, H] (a [T, H] input counts as one sequence)."""
        self._check_input(hidden_states)
        shape = hidden_states.shape
        batch_size = shape[0] if hidden_states.dim() == 3 else 1
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]

        routing = self.gate(x, batch_size)
        rows, tokens_per_expert, state = self.dispatcher.dispatch(x, routing)
        out = self.dispatcher.combine(self.experts(rows, tokens_per_expert, state.row_weight), state)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        losses = balance_losses(routing, self.config)
        aux_loss = sum(losses.values()) if losses else x.new_zeros((), dtype=torch.float32)
        return MoEOutput(out.view(shape).to(hidden_states.dtype), aux_loss, losses, routing, routing_stats(routing))

    def update_bias(self, load: Tensor) -> None:
        """Aux-loss-free balancing step (R4); `load` [N_r] = tokens routed to each expert."""
        self.gate.update_bias(load)

    def _check_input(self, x: Tensor) -> None:
        h = self.config.hidden_size
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != h:
            raise ValueError(f"MoE expects input of shape [tokens, {h}] or [batch, seq, {h}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE expects a floating-point input, got dtype {x.dtype}")
        weight_dtype = self.experts.gate_up_proj.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"MoE input dtype {x.dtype} does not match the layer's dtype {weight_dtype}: "
                f"cast one of them, or run under torch.autocast"
            )
        if x.shape[:-1].numel() == 0:
            raise ValueError("MoE got an empty input (no tokens)")
