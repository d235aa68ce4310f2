"""Tiny configurations for tests: one place for the small MoE layers and models the test files build.

Every factory takes field overrides, so a test that depends on a size names it at the call site:

- `tiny_moe(**overrides)`: an 8-wide MoE layer, 8 routed experts (4 wide), no shared expert, top-2,
  softmax scores and greedy selection (MoEConfig's own routing defaults).
- `tiny_v3_moe(**overrides)`: the same sizes with V3 routing: sigmoid scores, bias-corrected group-limited
  top-k (noaux_tc, 4 groups of 2, top-2 groups) and a selection bias.
- `tiny_model_config(**overrides)`: a 32-wide MLA model (query compression on) with one dense layer then one MoE
  layer (4 routed experts, 1 shared, V3 routing with 2 groups and normalised top-k), no MTP module
  (`num_nextn_predict_layers=1` adds it).
- `tiny_preset(name="tiny-v3", **overrides)`: a published tiny preset with fields changed.
- `v4_config(**overrides)`: a 4-layer DeepSeek-V4 (sliding, CSA, HCA, CSA; hash-routed and learned MoE layers,
  2 mHC streams), 32 wide.

In `tiny_model_config` and `tiny_preset`, `moe=` takes a MoEConfig (used as is), None (a dense model) or a dict
(fields changed in the default MoE, e.g. `moe={"n_routed_experts": 8}`).
"""

from __future__ import annotations

from typing import Any

from deepmoe.config import DeepSeekConfig, MoEConfig
from deepmoe.presets import get_preset

TINY_MOE = dict(hidden_size=8, moe_intermediate_size=4, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2)
V3_ROUTING = dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, use_expert_bias=True)
TINY_MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  first_k_dense_replace=1, num_nextn_predict_layers=0)  # fmt: skip
TINY_MODEL_MOE = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                      norm_topk_prob=True, n_group=2, topk_group=1)  # fmt: skip


def tiny_moe(**overrides: Any) -> MoEConfig:
    """8-wide, 8 routed experts of width 4, no shared expert, top-2; softmax, greedy."""
    return MoEConfig(**{**TINY_MOE, **overrides})


def tiny_v3_moe(**overrides: Any) -> MoEConfig:
    """`tiny_moe` with V3 routing: sigmoid, noaux_tc over 4 groups (top-2 groups), a selection bias."""
    return tiny_moe(**{**V3_ROUTING, **overrides})


def _with_moe(default: MoEConfig | None, moe: MoEConfig | dict | None) -> MoEConfig | None:
    if isinstance(moe, dict):
        return MoEConfig(**{**(default.to_dict() if default is not None else {}), **moe})
    return moe


def tiny_model_config(**overrides: Any) -> DeepSeekConfig:
    """A 2-layer MLA model, 32 wide: a dense layer, then a V3-routed MoE layer (4 experts + 1 shared); no MTP."""
    moe = tiny_v3_moe(**TINY_MODEL_MOE)
    if "moe" in overrides:
        moe = _with_moe(moe, overrides.pop("moe"))
    return DeepSeekConfig(**{**TINY_MODEL, "moe": moe, **overrides})


def tiny_preset(name: str = "tiny-v3", **overrides: Any) -> DeepSeekConfig:
    """The preset `name` with `overrides` (e.g. `num_hidden_layers=2`); a `moe` dict changes the preset's MoE."""
    config = get_preset(name)
    if "moe" in overrides:
        overrides["moe"] = _with_moe(config.moe, overrides["moe"])
    return DeepSeekConfig.from_dict({**config.to_dict(), **overrides})


def v32_config(**overrides) -> DeepSeekConfig:
    """2 layers (a dense one, then V3 routing over 8 experts), MLA with query compression, an indexer of 8 heads × 16
    picking 4 keys."""
    moe = MoEConfig(hidden_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    topk_method="noaux_tc", n_group=4, topk_group=2, use_expert_bias=True)  # fmt: skip
    fields = dict(model_type="deepseek_v32", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, moe=moe, first_k_dense_replace=1, max_position_embeddings=256, index_topk=4,
                  index_head_dim=16, index_n_heads=8)  # fmt: skip
    return DeepSeekConfig(**{**fields, **overrides})


V4_LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
             "compressed_sparse_attention"]  # fmt: skip


def v4_config(**overrides: Any) -> DeepSeekConfig:
    """A 4-layer DeepSeek-V4, 32 wide: sliding, CSA (m = 4, an indexer of 16 heads keeping 2 entries), HCA (m' = 8),
    CSA; the first two layers hash-routed, then √softplus top-2 of 4 experts + 1 shared; heads of 8 + 8 RoPE dims,
    a window of 8, 2 mHC streams. A `moe` dict changes fields of its MoE."""
    moe = MoEConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                    num_experts_per_tok=2, scoring_func="sqrtsoftplus", norm_topk_prob=True,
                    routed_scaling_factor=1.5, use_expert_bias=True, swiglu_limit=10.0)  # fmt: skip
    if "moe" in overrides:
        moe = _with_moe(moe, overrides.pop("moe"))
    fields = dict(model_type="deepseek_v4", attention_type="shared_kv", vocab_size=128, hidden_size=32,
                  intermediate_size=16, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, max_position_embeddings=256, moe=moe,
                  layer_types=V4_LAYERS, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                  sliding_window=8, compress_rope_theta=160000.0, o_groups=2, o_lora_rank=8, hc_mult=2,
                  hc_sinkhorn_iters=20, hc_eps=1e-6, index_topk=2, index_head_dim=8, index_n_heads=16,
                  bos_token_id=0, eos_token_id=1)  # fmt: skip
    return DeepSeekConfig(**{**fields, **overrides})
