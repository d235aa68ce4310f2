"""Parameter counts of a model config: total, active per token, MTP and embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepmoe.config import DeepSeekConfig
from deepmoe.model.decoder import DeepSeekForCausalLM


@dataclass
class ParameterCount:
    total: int
    """Parameters of the main model (embedding, blocks, head), without the MTP modules."""
    active: int
    """Parameters a token uses: total minus the routed experts it does not choose."""
    mtp: int
    """Parameters of the multi-token-prediction modules (not in total, as DeepSeek reports)."""
    embedding: int
    """The input embedding table (a token reads one row of it)."""

    @property
    def active_non_embedding(self) -> int:
        """Active parameters without the input embedding table (the convention of the V2-Lite report)."""
        return self.active - self.embedding


def count_parameters(config: DeepSeekConfig) -> ParameterCount:
    """Counts on the meta device: no memory is allocated, so the 671B preset is instant."""
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    inactive = 0
    for idx, layer in model.moe_layers().items():
        if idx < config.num_hidden_layers:
            per_expert = layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel()
            inactive += (layer.config.n_routed_experts - layer.config.num_experts_per_tok) * per_expert
    embedding = model.model.embed_tokens.weight.numel()
    return ParameterCount(total=total, active=total - inactive, mtp=mtp, embedding=embedding)
