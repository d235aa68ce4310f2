"""The DeepSeekMoE layer: router + dispatcher + routed experts + shared experts.

The layer computes in one process with a `LocalDispatcher`; any other `Dispatcher` plugs in at the same seam
(`deepmoe.parallel.apply_expert_parallel` shards the experts and installs the all-to-all one).

h_t = Σ_{i ≤ N_s} FFN_i^(s)(u_t) + Σ_{i ≤ N_r} g_i,t FFN_i^(r)(u_t)   (the residual is added by the block)

With `MoEConfig.expert_adapter_rank` (PESC, `deepmoe.moe.adapter_experts`) the routed experts are adapters on the
one shared FFN's output: h_t = Σ_{i ≤ N_r} g_i,t A_i(FFN^(s)(u_t)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from deepmoe.config import MoEConfig
from deepmoe.moe.adapter_experts import AdapterExperts
from deepmoe.moe.balance import RoutingStats, balance_losses, routing_stats
from deepmoe.moe.dispatch import Dispatcher, LocalDispatcher
from deepmoe.moe.experts import RoutedExperts, SwiGLU
from deepmoe.moe.router import Router, RouterOutput, RowExpertMask
from deepmoe.runtime import debug_checks_enabled


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


# the settings a layer's weights are shaped by: a config given to a built layer must keep them
_SHAPE_FIELDS = ("hidden_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "use_expert_bias",
                 "expert_adapter_rank", "hash_vocab_size")  # fmt: skip


class MoE(nn.Module):
    """DeepSeekMoE layer (fine-grained routed experts + shared experts), HF parameter names:
    `gate` (router), `experts` (stacked routed experts), `shared_experts` (one SwiGLU). With
    `expert_adapter_rank` (PESC), `experts` are `AdapterExperts` on the output of `shared_experts`.

    Built on the meta device (`with torch.device("meta")`), it is materialised with `to_empty(device=...)`
    followed by `reset_parameters()` (then `load_state_dict`, if weights are loaded).

    The router computes in float32 whatever the layer's dtype (a float64 input is rounded to float32 for the
    routing only, with a warning once per process); the experts compute in the input's dtype.

    `dispatcher` moves the tokens to the experts and back (`deepmoe.moe.dispatch.Dispatcher`); None: a
    `LocalDispatcher` over all N_r experts. It is the attribute `dispatcher`, which can be replaced.
    """

    def __init__(self, config: MoEConfig, *, dispatcher: Dispatcher | None = None):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        if config.expert_adapter_rank is not None:  # PESC: adapters on the shared FFN's output
            self.experts: RoutedExperts | AdapterExperts = AdapterExperts(
                config.n_routed_experts, config.hidden_size, config.expert_adapter_rank, config.experts_implementation
            )
        else:
            self.experts = RoutedExperts(
                config.n_routed_experts,
                config.hidden_size,
                config.moe_intermediate_size,
                config.experts_implementation,
                fp8=config.fp8_experts,
                swiglu_limit=config.swiglu_limit,
            )
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.swiglu_limit)
            if config.n_shared_experts
            else None
        )
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(config.n_routed_experts)

    @property
    def config(self) -> MoEConfig:
        """This layer's settings, a frozen `MoEConfig`. Change them for this layer only with
        `layer.config = dataclasses.replace(layer.config, field=value)`: `replace` validates the values at once,
        and the layer refuses a config that does not fit its weights (their shapes, the expert-parallel size,
        the router's expert mask)."""
        return self._config

    @config.setter
    def config(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoE.config must be a MoEConfig, got {type(config).__name__}")
        old: MoEConfig | None = self.__dict__.get("_config")
        if old is not None:
            for name in _SHAPE_FIELDS:
                if getattr(config, name) != getattr(old, name):
                    raise ValueError(
                        f"MoEConfig.{name}={getattr(config, name)!r} is invalid for this layer: its weights were "
                        f"built with {name}={getattr(old, name)!r} (build a new layer to change it)"
                    )
            shards = old.n_routed_experts // self.experts.n_experts
            if self.expert_parallel and config.n_devices != shards:
                raise ValueError(
                    f"MoEConfig.n_devices={config.n_devices} is invalid for this layer: its experts are sharded "
                    f"over {shards} ranks"
                )
        self._config = config
        gate: Router | None = self._modules.get("gate")
        if gate is not None:
            gate.config = config
            if gate.has_expert_mask:  # the mask must still leave every token K_r experts
                try:
                    gate.set_expert_mask(
                        disabled=gate.disabled_experts.nonzero().flatten().tolist() or None,
                        forced=gate.forced_experts.nonzero().flatten().tolist() or None,
                        disable_top=gate.disable_top,
                    )
                except ValueError as err:
                    self._config = gate.config = old
                    raise ValueError(f"the new MoEConfig does not fit the router's expert mask: {err}") from None
        experts: RoutedExperts | AdapterExperts | None = self._modules.get("experts")
        if experts is not None:
            experts.implementation = config.experts_implementation
            experts.fp8 = config.fp8_experts
            experts.swiglu_limit = config.swiglu_limit
        shared: SwiGLU | None = self._modules.get("shared_experts")
        if shared is not None:
            shared.swiglu_limit = config.swiglu_limit

    @property
    def expert_parallel(self) -> bool:
        """Whether this layer holds only its rank's slice of the routed experts (sharded by
        `deepmoe.parallel.apply_expert_parallel` over D > 1 ranks; a group of one rank holds them all)."""
        return self.experts.n_experts < self.config.n_routed_experts

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight and buffer as the constructor does — router (bias b = 0, no expert mask),
        routed experts, shared experts, in that order, so the same seed gives the same values."""
        self.gate.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()

    def forward(
        self,
        hidden_states: Tensor,
        batch_size: int | None = None,
        *,
        check_finite: bool = True,
        output_stats: bool = True,
        expert_mask: RowExpertMask | None = None,
        token_ids: Tensor | None = None,
    ) -> MoEOutput:
        """hidden_states [B, S, H], or [T, H]: `batch_size` sequences of T / batch_size tokens each, one after the
        other (token t is in sequence t // (T / batch_size)) → an output of the same shape.

        The sequence layout matters to the per-sequence quantities: the sequence-wise balance loss (B4) and
        `no_drop_fraction` (which never drops the tokens of the first sequences). A [T, H] input without
        `batch_size` is ONE sequence of T tokens, not a batch: to flatten [B, S, H] to [B·S, H] and get the
        same losses, dropping and outputs, pass batch_size=B. With [B, S, H] input, batch_size is B (giving
        another value is an error).

        `check_finite`: refuse an input holding NaN or inf (ValueError). Reading that answer is a device→host
        sync, so it happens in eager mode only (never under torch.compile) and a model that calls its layers
        from checked inputs passes False (`DeepSeekForCausalLM` does: only the debug checks of
        `deepmoe.runtime.set_debug_checks` look at its layers' inputs). Nothing else in the forward syncs, except
        what needs group sizes on the host: the experts' per-expert loop (no grouped kernel) and FP8 products,
        and expert parallelism's exchanges.

        `output_stats=False` (decoding) leaves out the routing statistics (`stats` None) and, outside training,
        the balance losses (`aux_loss` 0): work nothing reads while generating.

        `expert_mask` (`Router.row_mask`): each sequence's own disabled/forced experts (per-request steering).
        `token_ids` (the tokens' ids, [B, S] or [T]): what a hash-routed layer (V4) picks its experts by.
        """
        self._check_input(hidden_states)
        if (check_finite or debug_checks_enabled()) and not torch.compiler.is_compiling():
            if not torch.isfinite(hidden_states).all():
                raise ValueError("MoE got NaN or inf in its input: the hidden states must be finite")
        shape = hidden_states.shape
        batch_size = self._check_batch_size(hidden_states, batch_size)
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]

        routing = self.gate(x, batch_size, expert_mask, token_ids)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        pesc = self.config.expert_adapter_rank is not None  # the adapters take F(x), once per token, not x
        rows, tokens_per_expert, state = self.dispatcher.dispatch(shared if pesc else x, routing)
        out = self.dispatcher.combine(self.experts(rows, tokens_per_expert, state.row_weight), state)
        if shared is not None and not pesc:
            out = out + shared

        losses = balance_losses(routing, self.config) if output_stats or self.training else {}
        aux_loss = sum(losses.values()) if losses else x.new_zeros((), dtype=torch.float32)
        stats = routing_stats(routing) if output_stats else None
        return MoEOutput(out.view(shape).to(hidden_states.dtype), aux_loss, losses, routing, stats)

    def update_bias(self, load: Tensor | Sequence[float], process_group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step (R4); `load` [N_r] = tokens routed to each expert by this process (a
        tensor, or a list of numbers).

        With data (or expert) parallelism, each rank's load is only its own batch's: give `process_group` (the
        data-parallel ranks) and the router sums the load over it first, so every rank makes the same step
        from the global load (see `Router.update_bias`). None: `load` is used as it is.
        """
        self.gate.update_bias(load, process_group=process_group)

    @staticmethod
    def _check_batch_size(x: Tensor, batch_size: int | None) -> int:
        """The number of sequences of x (see `forward`)."""
        if x.dim() == 3:
            if batch_size is not None and batch_size != x.shape[0]:
                raise ValueError(f"batch_size={batch_size!r} does not match the input's batch of {x.shape[0]}")
            return x.shape[0]
        if batch_size is None:
            return 1
        tokens = x.shape[0]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or tokens % batch_size:
            raise ValueError(
                f"batch_size={batch_size!r} is invalid: must be an integer >= 1 that divides the {tokens} tokens"
            )
        return batch_size

    def _check_input(self, x: Tensor) -> None:
        h = self.config.hidden_size
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != h:
            raise ValueError(f"MoE expects input of shape [tokens, {h}] or [batch, seq, {h}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE expects a floating-point input, got dtype {x.dtype}")
        expert_weight = next(self.experts.parameters())  # gate_up_proj, or PESC's adapter_down
        weight_dtype = expert_weight.dtype
        # FSDP2 mixed precision casts the experts' weights to x's dtype when their unit gathers them, after this
        mixed_precision = isinstance(expert_weight, DTensor) and x.dtype == torch.bfloat16
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type) and not mixed_precision:
            raise ValueError(
                f"MoE input dtype {x.dtype} does not match the layer's dtype {weight_dtype}: "
                f"cast one of them, or run under torch.autocast"
            )
        if x.shape[:-1].numel() == 0:
            raise ValueError("MoE got an empty input (no tokens)")
