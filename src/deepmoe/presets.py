"""Published DeepSeek shapes and tiny CPU-sized versions of each (docs/design.md#m4-presets), and parameter counts."""

from __future__ import annotations

from dataclasses import replace

from deepmoe.config import DeepSeekConfig, MoEConfig

_YARN_V2 = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
_YARN_V3 = {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}
# the 102400-token vocabulary of DeepSeekMoE 16B and V2
_TOKENS_V1_V2 = dict(vocab_size=102400, bos_token_id=100000, eos_token_id=100001)
# MLA of V2, V2-Lite and V3: d_c = 512, d_h = 128, d_h^R = 64, 160K context with YaRN
_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840)


def _deepseek_moe_16b() -> DeepSeekConfig:
    moe = MoEConfig(
        hidden_size=2048,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        aux_loss_alpha=0.001,
    )
    return DeepSeekConfig(
        model_type="deepseek",
        hidden_size=2048,
        intermediate_size=10944,
        num_hidden_layers=28,
        num_attention_heads=16,
        attention_type="mha",
        num_key_value_heads=16,
        max_position_embeddings=4096,
        rope_interleave=False,
        moe=moe,
        first_k_dense_replace=1,
        **_TOKENS_V1_V2,
    )


def _deepseek_v2_lite() -> DeepSeekConfig:
    """DeepSeekMoE 16B's experts and vocabulary under MLA without query compression."""
    return DeepSeekConfig(
        model_type="deepseek_v2",
        hidden_size=2048,
        intermediate_size=10944,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        rope_scaling=dict(_YARN_V2),
        moe=_deepseek_moe_16b().moe,
        first_k_dense_replace=1,
        **_MLA,
        **_TOKENS_V1_V2,
    )


def _deepseek_v2() -> DeepSeekConfig:
    moe = MoEConfig(
        hidden_size=5120,
        moe_intermediate_size=1536,
        n_routed_experts=160,
        n_shared_experts=2,
        num_experts_per_tok=6,
        topk_method="group_limited_greedy",
        n_group=8,
        topk_group=3,
        routed_scaling_factor=16.0,
        n_devices=8,
        aux_loss_alpha=0.003,
        device_aux_loss_alpha=0.05,
        comm_aux_loss_alpha=0.02,
    )
    return DeepSeekConfig(
        model_type="deepseek_v2",
        hidden_size=5120,
        intermediate_size=12288,
        num_hidden_layers=60,
        num_attention_heads=128,
        q_lora_rank=1536,
        rope_scaling=dict(_YARN_V2),
        moe=moe,
        first_k_dense_replace=1,
        **_MLA,
        **_TOKENS_V1_V2,
    )


def _deepseek_v3() -> DeepSeekConfig:
    moe = MoEConfig(
        hidden_size=7168,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        use_expert_bias=True,
        seq_aux_loss_alpha=1e-4,
    )
    return DeepSeekConfig(
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        rope_scaling=dict(_YARN_V3),
        **_MLA,
        moe=moe,
        first_k_dense_replace=3,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    )


def _deepseek_v32() -> DeepSeekConfig:
    """DeepSeek-V3.2: V3 with DeepSeek Sparse Attention (a lightning indexer of 64 heads × 128 picks 2048 tokens)."""
    return replace(_deepseek_v3(), model_type="deepseek_v32", index_topk=2048, index_head_dim=128, index_n_heads=64)


def _deepseek_v4(
    hidden: int,
    layers: int,
    heads: int,
    q_lora_rank: int,
    experts: int,
    expert_width: int,
    o_groups: int,
    index_topk: int,
) -> DeepSeekConfig:
    """DeepSeek-V4's shape family (transformers' DeepseekV4Config): head_dim 512 with 64 RoPE dims, one shared
    K = V head, √softplus routing to 6 experts plus one shared expert, hash routing in the first 3 layers,
    SwiGLU clamped at 10, a 128-token window, CSA (m = 4, indexer of 64 heads × 128) and HCA (m' = 128) layers
    in transformers' default order (two HCA, then CSA and HCA alternating), 4 mHC streams, 1M context (YaRN ×16
    over 64K on the compressed layers), one MTP module."""
    moe = MoEConfig(hidden_size=hidden, moe_intermediate_size=expert_width, n_routed_experts=experts,
                    n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus", norm_topk_prob=True,
                    routed_scaling_factor=1.5, use_expert_bias=True, swiglu_limit=10.0)  # fmt: skip
    kinds = ["compressed_sparse_attention", "heavily_compressed_attention"]
    return DeepSeekConfig(
        model_type="deepseek_v4", attention_type="shared_kv", vocab_size=129280, hidden_size=hidden,
        intermediate_size=expert_width, num_hidden_layers=layers, num_attention_heads=heads, q_lora_rank=q_lora_rank,
        qk_nope_head_dim=448, qk_rope_head_dim=64, max_position_embeddings=1048576, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                      "beta_slow": 1},
        moe=moe, layer_types=kinds[1:] * 2 + [kinds[i % 2 == 0] for i in range(layers - 2)],
        mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (layers - 3),
        compress_rates={kinds[0]: 4, kinds[1]: 128}, sliding_window=128, compress_rope_theta=160000.0,
        o_groups=o_groups, o_lora_rank=1024, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, index_topk=index_topk,
        index_head_dim=128, index_n_heads=64, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
    )  # fmt: skip


def _tiny_v4() -> DeepSeekConfig:
    """V4's every module at CPU size: a sliding, a CSA and an HCA layer (m' = 16 so that it compresses within
    short prompts) and another CSA one, the first hash-routed; heads of 48 + 16 RoPE dims, 4 mHC streams, one MTP
    module."""
    published = _deepseek_v4(4096, 43, 64, 1024, 256, 2048, 8, 512)
    kinds = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    return replace(
        published, vocab_size=4096, hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        q_lora_rank=64, qk_nope_head_dim=48, qk_rope_head_dim=16, max_position_embeddings=1024, rope_scaling=None,
        moe=replace(published.moe, hidden_size=128, moe_intermediate_size=64, n_routed_experts=16,
                    num_experts_per_tok=4),
        layer_types=[kinds[0], kinds[1], kinds[2], kinds[1]], mlp_layer_types=["hash_moe"] + ["moe"] * 3,
        compress_rates={kinds[1]: 4, kinds[2]: 16}, sliding_window=32, o_groups=2, o_lora_rank=64, index_topk=8,
        index_head_dim=32, index_n_heads=4, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def _tiny(published: DeepSeekConfig, **moe_overrides) -> DeepSeekConfig:
    """The published architecture (attention kind, gate, routing rule, losses) at a few million
    parameters, small enough to train on a CPU in minutes."""
    h = 128
    shapes = dict(moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4)
    moe = replace(published.moe, hidden_size=h, **{**shapes, **moe_overrides})
    if published.attention_type == "mla":
        attention = dict(
            q_lora_rank=64 if published.q_lora_rank else None,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        )
    else:
        attention = dict(num_key_value_heads=4)
    return replace(
        published,
        vocab_size=4096,
        hidden_size=h,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rope_scaling=None,
        moe=moe,
        first_k_dense_replace=1,
        bos_token_id=None,
        eos_token_id=None,
        **attention,
    )


def _tiny_pyramid_moe() -> DeepSeekConfig:
    """DeepSpeed-MoE's Pyramid-MoE on tiny-deepseek-moe: the 3 MoE layers after the dense first one have
    8, 16 and 32 routed experts (more experts where the later layers learn more specific features)."""
    return replace(_tiny(_deepseek_moe_16b()), moe_experts_per_layer=[0, 8, 16, 32])


def _tiny_residual_moe() -> DeepSeekConfig:
    """DeepSpeed-MoE's Residual-MoE on tiny-deepseek-moe's shapes: every MoE layer is a fixed dense MLP
    (one shared expert of width 192) plus a top-1 routed expert of the same width as its correction;
    a token's FFN width is 384, the dense layers' intermediate_size."""
    return _tiny(_deepseek_moe_16b(), moe_intermediate_size=192, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=1)  # fmt: skip


PRESETS = {
    "deepseek-moe-16b": _deepseek_moe_16b,
    "deepseek-v2-lite": _deepseek_v2_lite,
    "deepseek-v2": _deepseek_v2,
    "deepseek-v3": _deepseek_v3,
    "deepseek-v3.2": _deepseek_v32,
    "tiny-deepseek-moe": lambda: _tiny(_deepseek_moe_16b()),
    # tiny-v2 leaves out query compression, as V2-Lite does: the tiny presets cover MLA with and without it
    "tiny-v2": lambda: replace(
        _tiny(_deepseek_v2(), n_group=4, topk_group=2, n_devices=4, routed_scaling_factor=1.0), q_lora_rank=None
    ),
    "tiny-v3": lambda: _tiny(_deepseek_v3(), n_group=4, topk_group=2),
    # tiny-v3 plus a small indexer; k = 8 is below most prompts, so the selection matters
    "tiny-v32": lambda: replace(
        _tiny(_deepseek_v3(), n_group=4, topk_group=2),
        model_type="deepseek_v32",
        index_topk=8,
        index_head_dim=32,
        index_n_heads=4,
    ),
    # DeepSeek-V4-Flash (284B total, 13B active) and V4-Pro (1.6T, 49B)
    "deepseek-v4-flash": lambda: _deepseek_v4(4096, 43, 64, 1024, 256, 2048, 8, 512),
    "deepseek-v4-pro": lambda: _deepseek_v4(7168, 61, 128, 1536, 384, 3072, 16, 1024),
    "tiny-v4": _tiny_v4,
    # DeepSpeed-MoE's variants as configs (docs/design.md#e4-layer-placement-and-the-deepspeed-moe-variants)
    "tiny-pyramid-moe": _tiny_pyramid_moe,
    "tiny-residual-moe": _tiny_residual_moe,
}


def get_preset(name: str) -> DeepSeekConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
