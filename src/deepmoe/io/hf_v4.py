"""Hugging Face format of DeepSeek-V4 (model_type "deepseek_v4", transformers' DeepseekV4ForCausalLM): its
config.json fields <-> `DeepSeekConfig`, its block's tensors, and the names transformers writes on disk.

In memory deepmoe uses transformers' module names (`model.layers.{i}.self_attn.q_a_proj.weight`,
`...attn_hc.fn`, `...mlp.experts.gate_up_proj`); transformers' `save_pretrained` writes them renamed towards
DeepSeek's release (`model.layers.{i}.attn.wq_a.weight`, `...hc_attn_fn`, `...ffn.experts.{j}.w1.weight`,
`head.weight`), and reads that layout back. deepmoe writes and reads the same names (`disk_name`).

config.json: `rope_parameters` holds {"main": sliding layers' RoPE, "compress": CSA/HCA layers' RoPE (with YaRN)};
`partial_rotary_factor` = qk_rope_head_dim / head_dim. Older configs' `compress_ratios` (per layer 0 / 4 / 128),
`num_hash_layers`, `compress_rate_csa` / `compress_rate_hca`, `qk_rope_head_dim` and a flat `rope_scaling` are
read as transformers reads them. The MTP modules are DeepSeek's `mtp.{k}.*` tensors, which transformers skips
when it loads (it does not build them). Routing: transformers' V4 always normalises the top-k weights and its
learned layers always have the selection bias `e_score_correction_bias`.
"""

from __future__ import annotations

import re
from typing import Any

from deepmoe.config import V4_LAYER_TYPES, DeepSeekConfig, MoEConfig

ARCHITECTURE = "DeepseekV4ForCausalLM"
# transformers' DeepseekV4Config defaults (DeepSeek-V4-Flash's shapes), for keys a config.json leaves out
DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
    head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1,
    scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, max_position_embeddings=1048576, rope_theta=10000.0,
    compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0,
    sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=512,
    rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    num_nextn_predict_layers=1,
)  # fmt: skip
_RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
_HASH_LAYERS = 3  # transformers' default num_hash_layers


def config_from_hf(d: dict[str, Any], moe_extras: dict[str, Any], model_extras: dict[str, Any]) -> DeepSeekConfig:
    """A deepseek_v4 `DeepSeekConfig` from config.json `d` (extras: deepmoe-only fields saved beside it)."""

    def get(key: str) -> Any:
        value = d.get(key)
        return DEFAULTS.get(key) if value is None else value

    n, head_dim = get("num_hidden_layers"), get("head_dim")
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(d.get("compress_rates") or {})}
    for legacy, kind in (("compress_rate_csa", V4_LAYER_TYPES[1]), ("compress_rate_hca", V4_LAYER_TYPES[2])):
        if d.get(legacy) is not None:
            rates[kind] = d[legacy]
    layer_types = d.get("layer_types")
    if layer_types is None and d.get("compress_ratios") is not None:
        layer_types = [_RATIO_TO_TYPE[r] for r in d["compress_ratios"]]
    if layer_types is None:  # transformers' default (V4-Pro's): two HCA layers, then CSA and HCA alternating
        layer_types = [V4_LAYER_TYPES[2]] * min(n, 2) + [V4_LAYER_TYPES[1 if i % 2 else 2] for i in range(n - 2)]
    mlp_types = d.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = d.get("num_hash_layers", _HASH_LAYERS)
        mlp_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    factor = d.get("partial_rotary_factor")
    rope_dim = int(head_dim * factor) if factor is not None else d.get("qk_rope_head_dim") or 64
    rope = d.get("rope_parameters") or {}
    main = rope.get("main") if isinstance(rope.get("main"), dict) else {}
    compress = rope.get("compress")
    if not isinstance(compress, dict):  # a flat (older) rope_parameters / rope_scaling: the compressed layers' YaRN
        compress = {**rope, **(d.get("rope_scaling") or {})}
    kind = compress.get("rope_type", compress.get("type"))
    scaling = None
    if kind == "yarn":
        skip = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "attention_factor")
        scaling = {"type": "yarn", **{k: v for k, v in compress.items() if k not in skip}}
    moe = MoEConfig(**{
        **dict(hidden_size=get("hidden_size"), moe_intermediate_size=get("moe_intermediate_size"),
               n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts"),
               num_experts_per_tok=get("num_experts_per_tok"), scoring_func=get("scoring_func"), norm_topk_prob=True,
               routed_scaling_factor=float(get("routed_scaling_factor")), use_expert_bias=True,
               swiglu_limit=float(get("swiglu_limit"))),
        **moe_extras,
    })  # fmt: skip
    return DeepSeekConfig(
        model_type="deepseek_v4", attention_type="shared_kv", vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"), intermediate_size=get("moe_intermediate_size"), num_hidden_layers=n,
        num_attention_heads=get("num_attention_heads"), q_lora_rank=get("q_lora_rank"),
        qk_nope_head_dim=head_dim - rope_dim, qk_rope_head_dim=rope_dim, index_topk=get("index_topk"),
        index_head_dim=get("index_head_dim"), index_n_heads=get("index_n_heads"),
        layer_types=list(layer_types)[:n], mlp_layer_types=list(mlp_types)[:n], compress_rates=rates,
        sliding_window=get("sliding_window"),
        compress_rope_theta=float(compress.get("rope_theta") or get("compress_rope_theta")),
        o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"), hc_mult=get("hc_mult"),
        hc_sinkhorn_iters=get("hc_sinkhorn_iters"), hc_eps=float(get("hc_eps")),
        max_position_embeddings=get("max_position_embeddings"),
        rope_theta=float(main.get("rope_theta") or get("rope_theta")), rope_scaling=scaling, moe=moe,
        num_nextn_predict_layers=get("num_nextn_predict_layers"),
        rms_norm_eps=get("rms_norm_eps"), tie_word_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=get("initializer_range"), bos_token_id=d.get("bos_token_id", DEFAULTS["bos_token_id"]),
        eos_token_id=d.get("eos_token_id", DEFAULTS["eos_token_id"]), pad_token_id=d.get("pad_token_id"),
        **model_extras,
    )  # fmt: skip


def config_to_hf(c: DeepSeekConfig) -> dict[str, Any]:
    """config.json fields of transformers' DeepseekV4Config for `c` (deepmoe-only fields are added by the caller)."""
    moe, factor = c.moe, c.qk_rope_head_dim / c.head_dim
    main = {"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": factor}
    compress = {"rope_type": "default", "rope_theta": c.compress_rope_theta, "partial_rotary_factor": factor}
    if c.rope_scaling:
        scaling = {k: v for k, v in c.rope_scaling.items() if k not in ("type", "rope_type")}
        compress.update(scaling, rope_type="yarn", attention_factor=1.0)  # V4 leaves cos/sin unscaled
    d: dict[str, Any] = dict(
        architectures=[ARCHITECTURE], model_type="deepseek_v4", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        moe_intermediate_size=moe.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=1, head_dim=c.head_dim,
        q_lora_rank=c.q_lora_rank, partial_rotary_factor=factor, num_experts_per_tok=moe.num_experts_per_tok,
        n_routed_experts=moe.n_routed_experts, n_shared_experts=moe.n_shared_experts, scoring_func=moe.scoring_func,
        norm_topk_prob=True, routed_scaling_factor=moe.routed_scaling_factor,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
        compress_rope_theta=c.compress_rope_theta, rope_parameters={"main": main, "compress": compress},
        layer_types=list(c.layer_types), mlp_layer_types=list(c.mlp_layer_types), compress_rates=dict(c.compress_rates),
        hc_mult=c.hc_mult, hc_sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, swiglu_limit=moe.swiglu_limit,
        sliding_window=c.sliding_window, o_groups=c.o_groups, o_lora_rank=c.o_lora_rank,
        num_nextn_predict_layers=c.num_nextn_predict_layers, rms_norm_eps=c.rms_norm_eps,
        initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        use_cache=True,
    )  # fmt: skip
    for field in ("index_topk", "index_head_dim", "index_n_heads"):  # only CSA layers need them
        d[field] = getattr(c, field) if getattr(c, field) is not None else DEFAULTS[field]
    return d


def block_shapes(c: DeepSeekConfig, prefix: str, layer_idx: int) -> dict[str, tuple[int, ...]]:
    """deepmoe names and shapes of layer `layer_idx`'s attention and hyper-connections (prefix `model.layers.{i}.`)."""
    h, n, d, r = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank
    a, g = prefix + "self_attn.", c.o_groups
    shapes = {
        a + "sinks": (n,), a + "q_a_proj.weight": (r, h), a + "q_a_norm.weight": (r,),
        a + "q_b_proj.weight": (n * d, r), a + "kv_proj.weight": (d, h), a + "kv_norm.weight": (d,),
        a + "o_a_proj.weight": (g * c.o_lora_rank, n * d // g), a + "o_b_proj.weight": (h, g * c.o_lora_rank),
    }  # fmt: skip
    main = layer_idx < c.num_hidden_layers  # else an MTP module's block: sliding window, learned routing
    kind = c.layer_types[layer_idx] if main else "sliding_attention"
    if kind != "sliding_attention":
        csa, ratio = kind == "compressed_sparse_attention", c.compress_rates[kind]

        def compressor(p: str, dim: int, overlap: bool) -> None:
            width = 2 * dim if overlap else dim
            shapes.update({p + "position_bias": (ratio, width), p + "kv_proj.weight": (width, h),
                           p + "gate_proj.weight": (width, h), p + "kv_norm.weight": (dim,)})  # fmt: skip

        compressor(a + "compressor.", d, csa)
        if csa:
            i = a + "compressor.indexer."
            compressor(i, c.index_head_dim, True)
            shapes[i + "q_b_proj.weight"] = (c.index_n_heads * c.index_head_dim, r)
            shapes[i + "scorer.weights_proj.weight"] = (c.index_n_heads, h)
    mixes = (2 + c.hc_mult) * c.hc_mult
    for hc in ("attn_hc.", "ffn_hc."):
        shapes.update({prefix + hc + "fn": (mixes, c.hc_mult * h), prefix + hc + "base": (mixes,),
                       prefix + hc + "scale": (3,)})  # fmt: skip
    if main and c.mlp_layer_types[layer_idx] == "hash_moe":
        shapes[prefix + "mlp.gate.tid2eid"] = (c.vocab_size, c.moe.num_experts_per_tok)
    return shapes


def head_shapes(c: DeepSeekConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """The head's pre map `{prefix}hc_head.*` (the main model's, or an MTP module's with prefix `model.mtp.{k}.`)."""
    p = prefix + "hc_head."
    return {p + "hc_fn": (c.hc_mult, c.hc_mult * c.hidden_size), p + "hc_base": (c.hc_mult,), p + "hc_scale": (1,)}


def mtp_shapes(c: DeepSeekConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """An MTP module's own tensors besides its block (`model.mtp.{k}.`)."""
    h = c.hidden_size
    shapes = {prefix + name: (h, h) for name in ("e_proj.weight", "h_proj.weight")}
    shapes.update({prefix + name: (h,) for name in ("enorm.weight", "hnorm.weight", "norm.weight")})
    return {**shapes, **head_shapes(c, prefix)}


# deepmoe (transformers' in-memory) name -> the name transformers writes, applied in order
_RENAMES = [(re.compile(pattern), target) for pattern, target in (
    (r"^lm_head\.", "head."),
    # MTP module k: DeepSeek's `mtp.{k}.*` (its block's tensors directly under it), which transformers skips
    (r"^model\.mtp\.(\d+)\.block\.", r"mtp.\1."), (r"^model\.mtp\.(\d+)\.hc_head\.hc_", r"mtp.\1.hc_head_"),
    (r"^model\.mtp\.", "mtp."),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"), (r"\.sinks$", ".attn_sink"),
    (r"\.kv_norm\.", ".norm."), (r"\.position_bias$", ".ape"), (r"\.q_a_proj\.", ".wq_a."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."), (r"\.kv_proj\.", ".wkv."), (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."), (r"\.q_a_norm\.", ".q_norm."), (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."), (r"\.gate_proj\.", ".wgate."),
)]  # fmt: skip
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
"""The per-expert names on disk of the stacked experts' gate, up and down projections."""


def disk_name(name: str) -> str:
    """deepmoe state-dict name -> the checkpoint name transformers writes (before splitting the experts)."""
    for pattern, target in _RENAMES:
        name = pattern.sub(target, name)
    return name
