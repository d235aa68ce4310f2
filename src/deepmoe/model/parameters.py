"""Parameter counts of a model config: total, active per token, MTP and embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepmoe.config import DeepSeekConfig
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe import MoE


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


def _unchosen_expert_parameters(layer: MoE) -> int:
    """The routed-expert parameters of `layer` a token does not use (N_r − K_r experts)."""
    per_expert = sum(w[0].numel() for w in layer.experts.parameters())  # every expert tensor is [N_r, ...]
    return (layer.config.n_routed_experts - layer.config.num_experts_per_tok) * per_expert


def count_parameters(config: DeepSeekConfig) -> ParameterCount:
    """Counts on the meta device: no memory is allocated, so the 671B preset is instant."""
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    inactive = sum(_unchosen_expert_parameters(layer) for idx, layer in model.moe_layers().items()
                   if idx < config.num_hidden_layers)  # fmt: skip
    embedding = model.model.embed_tokens.weight.numel()
    return ParameterCount(total=total, active=total - inactive, mtp=mtp, embedding=embedding)


def training_flops_per_token(config: DeepSeekConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward) at sequence length `seq_len`, nanoGPT's / PaLM's
    convention: 6 · (active matrix parameters) + 6 · L · T · H · (d_qk + d_v) for the attention scores and
    their weighted sum (no causal halving), over the main blocks and the MTP modules (each also uses the head).

    Active matrix parameters: the weight matrices a token multiplies with (the chosen routed experts only; not
    the input embedding, a lookup; not norms), the head once per output (main and each MTP depth). d_qk =
    qk_nope + qk_rope and d_v = v_head_dim for MLA; the head dimension for both with MHA."""
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)

    def matrices(module: torch.nn.Module) -> int:
        """Weight matrices of `module` a token uses: routed experts not chosen excluded."""
        total = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
        return total - sum(_unchosen_expert_parameters(m) for m in module.modules() if isinstance(m, MoE))

    head = config.vocab_size * config.hidden_size
    depths = len(model.model.mtp)
    matmul = matrices(model.model.layers) + matrices(model.model.mtp) + head * (1 + depths)
    if config.attention_type == "mla":
        d_qk, d_v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        d_qk = d_v = config.head_dim
    attention = 6 * (config.num_hidden_layers + depths) * seq_len * config.num_attention_heads * (d_qk + d_v)
    return float(6 * matmul + attention)
