"""Hugging Face format (docs/design.md#m5-hugging-face-checkpoints), the mapping half: config.json <->
`DeepSeekConfig`, and
checkpoint tensor names <-> deepmoe state-dict names (the files are read and written by
`deepmoe.io.checkpoint`).

Names. deepmoe's state dict uses HF's in-memory names (`model.layers.{i}.mlp.experts.gate_up_proj`
[E, 2I, H], gate rows first, and `down_proj` [E, H, I]). Checkpoints on disk hold one tensor per
expert (`mlp.experts.{j}.{gate,up,down}_proj.weight`), as DeepSeek publishes them and as
transformers 5 writes them; fused tensors are read too. The multi-token-prediction module k,
deepmoe's `model.mtp.{k}.*`, is `model.layers.{L + k}.*` on disk (DeepSeek-V3's layout:
`shared_head.norm` is our `norm`; the copies `embed_tokens` and `shared_head.head` of the shared
embedding/head are dropped on load and written on save).

Routing semantics of the gate weights g (top-k affinities s):
  * DeepSeek's released V2 code: g = s / Σs if norm_topk_prob else s · routed_scaling_factor.
  * transformers' DeepseekV2: g = s · routed_scaling_factor, norm_topk_prob ignored.
  * DeepSeek V3 (both codes) and deepmoe: g = s / Σs if norm_topk_prob, then always · routed_scaling_factor.
For `deepseek` (16B) there is no scaling factor (1.0). A V2 config with norm_topk_prob=True is
read with DeepSeek's semantics (scaling factor 1.0), with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

from deepmoe.config import MODEL_TYPES, DeepSeekConfig, MoEConfig
from deepmoe.io import hf_v4

ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v4": hf_v4.ARCHITECTURE,
}

# Values the published configuration classes use for an absent key (deepseek: DeepSeek's own
# DeepseekConfig; deepseek_v2/v3: transformers' classes), so a sparse config.json reads as they read it.
_COMMON = dict(
    rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False, attention_bias=False,
    rope_theta=10000.0, moe_layer_freq=1, first_k_dense_replace=0, scoring_func="softmax",
    norm_topk_prob=False, routed_scaling_factor=1.0, topk_method="greedy", n_group=None, topk_group=None,
    pad_token_id=None, seq_aux=True, num_nextn_predict_layers=0, hidden_act="silu",
)  # fmt: skip
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek": dict(
        _COMMON, vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
        num_hidden_layers=30, num_attention_heads=32, max_position_embeddings=2048, n_shared_experts=None,
        n_routed_experts=None, num_experts_per_tok=None, bos_token_id=100000, eos_token_id=100001,
        rope_interleave=False,
    ),
    "deepseek_v2": dict(
        _COMMON, vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
        num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=None, bos_token_id=1, eos_token_id=2, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
    ),
    "deepseek_v3": dict(
        _COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=4096, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, bos_token_id=0, eos_token_id=1, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
        routed_scaling_factor=2.5, n_group=8, topk_group=4, first_k_dense_replace=3, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=1,
    ),
}  # fmt: skip
# V3.2: V3's defaults and DSA's indexer; transformers' class has no num_nextn_predict_layers (absent: no MTP)
_DEFAULTS["deepseek_v32"] = dict(
    _DEFAULTS["deepseek_v3"], max_position_embeddings=163840, num_nextn_predict_layers=0, index_topk=2048,
    index_head_dim=128, index_n_heads=64,
)  # fmt: skip
_WITH_MTP = ("deepseek_v3", "deepseek_v32")
_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "num_local_experts": "n_routed_experts",
            "num_experts": "n_routed_experts"}  # fmt: skip
# deepmoe-only fields, kept under config.json's "deepmoe" key so that a deepmoe save -> load is exact
_MOE_EXTRAS = (
    "use_expert_bias", "bias_update_speed", "capacity_factor", "capacity_scope", "drop_policy", "no_drop_fraction",
    "n_devices", "aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha", "seq_aux_loss_alpha",
    "z_loss_coef", "entropy_loss_coef", "experts_implementation", "expert_adapter_rank",
)  # fmt: skip
_MODEL_EXTRAS = ("mtp_loss_weight", "moe_experts_per_layer")
_INDEX_FIELDS = ("index_topk", "index_head_dim", "index_n_heads")  # DSA's lightning indexer (deepseek_v32)


# ---- config ------------------------------------------------------------------------------------


def rope_from_hf(d: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from the original names or transformers 5's `rope_parameters`."""
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}  # transformers: rope_scaling wins
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} is invalid: must be an object or null")
    scaling = dict(scaling)
    theta = scaling.pop("rope_theta", None)  # as in transformers, the dict's value wins over the top-level one
    theta = d.get("rope_theta") if theta is None else theta
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    rope_scaling = None if kind in (None, "default") else {"type": kind, **scaling}
    return float(theta if theta is not None else default_theta), rope_scaling


def config_from_hf(d: dict[str, Any]) -> DeepSeekConfig:
    """A `DeepSeekConfig` from a config.json dict of model_type deepseek, deepseek_v2, deepseek_v3 or deepseek_v32.

    Accepts the published configs' quirks: topk_method "gready" (= "greedy"), null n_group/topk_group,
    a missing aux_loss_alpha (0), `rope_scaling` or transformers 5's `rope_parameters`. Raises
    ValueError naming the field for an unknown model_type or a setting deepmoe cannot compute.
    """
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type={model_type!r} is not supported: deepmoe reads {', '.join(MODEL_TYPES)}")
    d = {**{_ALIASES.get(k, k): v for k, v in d.items() if k in _ALIASES}, **d}
    if model_type == "deepseek_v4":  # its own fields (deepmoe.io.hf_v4)
        extras = d.get("deepmoe") or {}
        moe_extras = {k: extras[k] for k in _MOE_EXTRAS if k in extras}
        return hf_v4.config_from_hf(d, moe_extras, {k: extras[k] for k in _MODEL_EXTRAS if k in extras})
    defaults = _DEFAULTS[model_type]

    def get(key: str) -> Any:
        value = d.get(key, defaults.get(key))
        return defaults.get(key) if value is None and key not in ("n_routed_experts", "q_lora_rank") else value

    if get("hidden_act") != "silu":
        raise ValueError(f"config hidden_act={get('hidden_act')!r} is not supported: deepmoe's FFNs are SwiGLU (silu)")
    if d.get("mlp_bias"):
        raise ValueError("config mlp_bias=True is not supported: deepmoe's FFNs have no bias")
    extras = d.get("deepmoe") or {}
    layers = get("num_hidden_layers")
    rope_theta, rope_scaling = rope_from_hf(d, defaults["rope_theta"])
    fields: dict[str, Any] = dict(
        model_type=model_type, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"), num_hidden_layers=layers,
        num_attention_heads=get("num_attention_heads"), max_position_embeddings=get("max_position_embeddings"),
        rope_theta=rope_theta, rope_scaling=rope_scaling, rope_interleave=bool(get("rope_interleave")),
        first_k_dense_replace=min(get("first_k_dense_replace"), layers), moe_layer_freq=get("moe_layer_freq"),
        rms_norm_eps=get("rms_norm_eps"), tie_word_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=get("initializer_range"), attention_bias=bool(get("attention_bias")),
        num_nextn_predict_layers=get("num_nextn_predict_layers") if model_type in _WITH_MTP else 0,
        bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_id=d.get("eos_token_id", defaults["eos_token_id"]), pad_token_id=d.get("pad_token_id"),
    )  # fmt: skip
    if model_type == "deepseek":
        fields.update(attention_type="mha", num_key_value_heads=get("num_key_value_heads"))
    else:
        fields.update(
            attention_type="mla", q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
            qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
            v_head_dim=get("v_head_dim"),
        )  # fmt: skip
    if model_type == "deepseek_v32":
        fields.update({k: get(k) for k in _INDEX_FIELDS})
    fields.update({k: extras[k] for k in _MODEL_EXTRAS if k in extras})
    fields.update({k: extras[k] for k in DeepSeekConfig.NSA_FIELDS if k in extras})  # NSA (deepmoe only)
    fields["moe"] = _moe_from_hf(d, get, model_type, extras)
    config = DeepSeekConfig(**fields)
    mtp_moe = range(layers, layers + config.num_nextn_predict_layers) if extras.get("mtp_moe") else ()
    if config.moe is not None and not any(config.is_moe_layer(i) for i in [*range(layers), *mtp_moe]):
        config.moe = None  # no MoE layer at all (how a dense deepseek_v2/v3 model is written)
    return config


def _moe_from_hf(d: dict[str, Any], get: Callable[[str], Any], model_type: str, extras: dict) -> MoEConfig | None:
    n_routed = get("n_routed_experts")
    # first_k_dense_replace >= num_hidden_layers spells "all dense", unless only the MTP layers are MoE ("mtp_moe")
    all_dense = get("first_k_dense_replace") >= get("num_hidden_layers") and not extras.get("mtp_moe")
    if n_routed is None or (model_type != "deepseek" and all_dense):
        return None
    if get("num_experts_per_tok") is None:
        raise ValueError("config num_experts_per_tok is missing: required with n_routed_experts")
    method = get("topk_method") if model_type != "deepseek" else "greedy"
    method = "greedy" if method == "gready" else method  # the typo of DeepSeek's V2 configuration class
    n_group, topk_group = get("n_group") or 1, get("topk_group") or 1
    if method == "greedy":
        n_group = topk_group = 1  # greedy routing ignores groups
    scale = get("routed_scaling_factor") if model_type != "deepseek" else 1.0
    norm = bool(get("norm_topk_prob"))
    if model_type == "deepseek_v2" and norm:
        if scale != 1.0:
            warnings.warn(
                f"deepseek_v2 config has norm_topk_prob=True and routed_scaling_factor={scale}: DeepSeek's V2 code "
                "normalises the top-k weights and then does not scale them, transformers' DeepseekV2 scales them and "
                "never normalises; deepmoe follows DeepSeek's code (routed_scaling_factor read as 1.0), so its logits "
                "differ from transformers'",
                UserWarning,
                stacklevel=3,
            )
            scale = 1.0
        else:
            warnings.warn(
                "deepseek_v2 config has norm_topk_prob=True: deepmoe normalises the top-k weights as DeepSeek's V2 "
                "code does; transformers' DeepseekV2 ignores norm_topk_prob, so its logits differ",
                UserWarning,
                stacklevel=3,
            )
    alpha = float(d.get("aux_loss_alpha") or 0.0)
    seq_aux = bool(get("seq_aux"))
    fields: dict[str, Any] = dict(
        hidden_size=get("hidden_size"), moe_intermediate_size=get("moe_intermediate_size"), n_routed_experts=n_routed,
        n_shared_experts=get("n_shared_experts") or 0, num_experts_per_tok=get("num_experts_per_tok"),
        scoring_func=get("scoring_func"), norm_topk_prob=norm, routed_scaling_factor=float(scale),
        topk_method=method, n_group=n_group, topk_group=topk_group, use_expert_bias=method == "noaux_tc",
        aux_loss_alpha=0.0 if seq_aux else alpha, seq_aux_loss_alpha=alpha if seq_aux else 0.0,
    )  # fmt: skip
    fields.update({k: extras[k] for k in _MOE_EXTRAS if k in extras})
    return MoEConfig(**fields)


def config_to_hf(config: DeepSeekConfig) -> dict[str, Any]:
    """config.json fields (HF names) for `config`, loadable by transformers (deepseek_v2/v3/v32) and DeepSeek's code.

    Raises ValueError if the attention type does not match the model_type; warns where transformers'
    class of that model_type ignores a setting (it would then compute something else).
    """
    c, moe, mt = config, config.moe, config.model_type
    if mt == "deepseek_v4":  # its own fields (deepmoe.io.hf_v4)
        d = hf_v4.config_to_hf(c)
        d["deepmoe"] = {**{k: getattr(c, k) for k in _MODEL_EXTRAS}, **{k: getattr(moe, k) for k in _MOE_EXTRAS}}
        return d
    if (c.attention_type == "mha") != (mt == "deepseek"):
        raise ValueError(
            f"attention_type={c.attention_type!r} cannot be written as model_type={mt!r}: "
            "deepseek uses 'mha', deepseek_v2/deepseek_v3/deepseek_v32 use 'mla'"
        )
    d: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[mt]], model_type=mt, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        attention_bias=c.attention_bias, attention_dropout=0.0, hidden_act="silu", use_cache=True, pretraining_tp=1,
        rope_theta=c.rope_theta, rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        rope_interleave=c.rope_interleave, moe_layer_freq=c.moe_layer_freq,
        first_k_dense_replace=c.num_hidden_layers if moe is None and mt != "deepseek" else c.first_k_dense_replace,
    )  # fmt: skip
    if d["rope_scaling"] and "rope_type" in d["rope_scaling"]:
        d["rope_scaling"]["type"] = d["rope_scaling"].pop("rope_type")
    if mt != "deepseek":
        d.update(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                 qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim)  # fmt: skip
    if mt in _WITH_MTP:
        d["num_nextn_predict_layers"] = c.num_nextn_predict_layers
    if mt == "deepseek_v32":
        d.update({k: getattr(c, k) for k in _INDEX_FIELDS})
    extras: dict[str, Any] = {k: getattr(c, k) for k in _MODEL_EXTRAS}
    if c.has_nsa:  # Native Sparse Attention: a deepmoe-only architecture
        extras.update({k: getattr(c, k) for k in c.NSA_FIELDS})
        warnings.warn(f"config written as {mt}, but its MLA layers run Native Sparse Attention (nsa_* fields), "
                      "which only deepmoe computes: other libraries will compute another model", UserWarning,
                      stacklevel=2)  # fmt: skip
    if moe is None:
        if mt == "deepseek":
            d["n_routed_experts"] = None
    else:
        alpha, seq_alpha = moe.aux_loss_alpha, moe.seq_aux_loss_alpha
        d.update(
            n_routed_experts=moe.n_routed_experts, n_shared_experts=moe.n_shared_experts,
            moe_intermediate_size=moe.moe_intermediate_size, num_experts_per_tok=moe.num_experts_per_tok,
            scoring_func=moe.scoring_func, norm_topk_prob=moe.norm_topk_prob, aux_loss_alpha=seq_alpha or alpha,
            seq_aux=bool(seq_alpha) or not alpha,
        )  # fmt: skip
        if mt != "deepseek":
            d.update(routed_scaling_factor=moe.routed_scaling_factor, topk_method=moe.topk_method,
                     n_group=moe.n_group, topk_group=moe.topk_group)  # fmt: skip
        extras.update({k: getattr(moe, k) for k in _MOE_EXTRAS})
        if c.num_nextn_predict_layers and not any(c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
            extras["mtp_moe"] = True  # dense main layers, MoE MTP layers (e.g. `deepmoe train --layers 1`)
        _warn_unexpressible(config)
    d["deepmoe"] = extras
    return d


def _warn_unexpressible(config: DeepSeekConfig) -> None:
    moe, mt = config.moe, config.model_type
    problems = []
    if mt == "deepseek" and (moe.routed_scaling_factor != 1.0 or moe.topk_method != "greedy"):
        problems.append("deepseek (16B) has no routed_scaling_factor or group routing")
    if mt == "deepseek_v2" and (moe.scoring_func != "softmax" or moe.topk_method == "noaux_tc"):
        problems.append("transformers' DeepseekV2 routes with softmax and greedy/group_limited_greedy only")
    if mt == "deepseek_v2" and moe.norm_topk_prob:
        problems.append("transformers' DeepseekV2 ignores norm_topk_prob (DeepSeek's V2 code then skips the scaling)")
    if mt in _WITH_MTP and (moe.scoring_func != "sigmoid" or moe.topk_method != "noaux_tc"):
        problems.append(f"transformers' {ARCHITECTURES[mt][:-11]} always routes with sigmoid scores and noaux_tc")
    if mt != "deepseek" and config.moe_layer_freq != 1:
        problems.append(f"transformers' {ARCHITECTURES[mt]} ignores moe_layer_freq={config.moe_layer_freq}")
    if moe.expert_adapter_rank is not None:
        problems.append("its experts are PESC adapters (expert_adapter_rank), which only deepmoe can load")
    if config.moe_experts_per_layer is not None:
        problems.append("its MoE layers all have n_routed_experts (moe_experts_per_layer is read by deepmoe only)")
    if mt in ("deepseek_v2", "deepseek_v32") and not config.rope_interleave:
        problems.append(f"transformers' {ARCHITECTURES[mt][:-11]} always uses interleaved RoPE in MLA")
    for problem in problems:
        warnings.warn(f"config written as {mt}, but {problem}: other libraries will compute another model",
                      UserWarning, stacklevel=3)  # fmt: skip


# ---- names -------------------------------------------------------------------------------------

_PROJ = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def expected_shapes(config: DeepSeekConfig) -> dict[str, tuple[int, ...]]:
    """deepmoe's state-dict names and shapes for `config` (the persistent tensors of DeepSeekForCausalLM)."""
    c, h = config, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}

    def block(p: str, layer_idx: int) -> None:
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        a, nh = p + "self_attn.", c.num_attention_heads
        if c.attention_type == "shared_kv":  # DeepSeek-V4: attention, compressors and hyper-connections
            shapes.update(hf_v4.block_shapes(c, p, layer_idx))
            biased = {}
        elif c.attention_type == "mha":
            hd, kv = c.head_dim, c.num_key_value_heads
            for name, out in (("q_proj", nh * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                shapes[a + name + ".weight"] = (out, h)
            shapes[a + "o_proj.weight"] = (h, nh * hd)
            biased = {"q_proj": nh * hd, "k_proj": kv * hd, "v_proj": kv * hd, "o_proj": h}
        else:
            if c.q_lora_rank is None:
                shapes[a + "q_proj.weight"] = (nh * c.head_dim, h)
            else:
                shapes[a + "q_a_proj.weight"] = (c.q_lora_rank, h)
                shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
                shapes[a + "q_b_proj.weight"] = (nh * c.head_dim, c.q_lora_rank)
            shapes[a + "kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + c.qk_rope_head_dim, h)
            shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
            shapes[a + "kv_b_proj.weight"] = (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
            shapes[a + "o_proj.weight"] = (h, nh * c.v_head_dim)
            biased = {"kv_a_proj_with_mqa": c.kv_lora_rank + c.qk_rope_head_dim, "o_proj": h}
            if c.q_lora_rank is not None:
                biased["q_a_proj"] = c.q_lora_rank
            if c.has_indexer:  # DSA's lightning indexer
                i, d_i, h_i = a + "indexer.", c.index_head_dim, c.index_n_heads
                shapes[i + "wq_b.weight"] = (h_i * d_i, c.q_lora_rank)
                shapes[i + "wk.weight"] = (d_i, h)
                shapes[i + "k_norm.weight"] = shapes[i + "k_norm.bias"] = (d_i,)
                shapes[i + "weights_proj.weight"] = (h_i, h)
            if c.has_nsa:  # Native Sparse Attention's compression MLP, its position embedding and the gates
                n, width = a + "nsa.", c.kv_lora_rank + c.qk_rope_head_dim
                shapes[n + "block_position.weight"] = (c.nsa_compress_block, width)
                shapes[n + "compress_proj.weight"] = (width, c.nsa_compress_block * width)
                shapes[n + "compress_out.weight"] = (width, width)
                shapes[n + "gate.weight"] = (3 * nh, h)
        if c.attention_bias:
            shapes.update({a + name + ".bias": (size,) for name, size in biased.items()})
        m = p + "mlp."
        if c.is_moe_layer(layer_idx):
            moe = c.moe_config(layer_idx)
            n = moe.n_routed_experts
            shapes[m + "gate.weight"] = (n, h)
            if moe.use_expert_bias:
                shapes[m + "gate.e_score_correction_bias"] = (n,)
            if moe.expert_adapter_rank is not None:  # PESC adapters, stored stacked (deepmoe only)
                shapes[m + "experts.adapter_down"] = (n, moe.expert_adapter_rank, h)
                shapes[m + "experts.adapter_up"] = (n, h, moe.expert_adapter_rank)
            else:
                shapes[m + "experts.gate_up_proj"] = (n, 2 * moe.moe_intermediate_size, h)
                shapes[m + "experts.down_proj"] = (n, h, moe.moe_intermediate_size)
            if moe.n_shared_experts:
                width = moe.n_shared_experts * moe.moe_intermediate_size
                shapes[m + "shared_experts.gate_proj.weight"] = shapes[m + "shared_experts.up_proj.weight"] = (width, h)
                shapes[m + "shared_experts.down_proj.weight"] = (h, width)
        else:
            shapes[m + "gate_proj.weight"] = shapes[m + "up_proj.weight"] = (c.intermediate_size, h)
            shapes[m + "down_proj.weight"] = (h, c.intermediate_size)

    for i in range(c.num_hidden_layers):
        block(f"model.layers.{i}.", i)
    shapes["model.norm.weight"] = (h,)
    if c.model_type == "deepseek_v4":
        shapes.update(hf_v4.head_shapes(c))
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for k in range(c.num_nextn_predict_layers):
        p = f"model.mtp.{k}."
        if c.model_type == "deepseek_v4":
            shapes.update(hf_v4.mtp_shapes(c, p))
        else:
            shapes[p + "enorm.weight"] = shapes[p + "hnorm.weight"] = shapes[p + "norm.weight"] = (h,)
            shapes[p + "eh_proj.weight"] = (h, 2 * h)
        block(p + "block.", c.num_hidden_layers + k)
    return shapes


def hf_name(name: str, config: DeepSeekConfig) -> str:
    """deepmoe name -> checkpoint name (before splitting experts)."""
    if config.model_type == "deepseek_v4":
        return hf_v4.disk_name(name)
    match = re.fullmatch(r"model\.mtp\.(\d+)\.(.+)", name)
    if not match:
        return name
    k, rest = int(match.group(1)), match.group(2)
    p = f"model.layers.{config.num_hidden_layers + k}."
    if rest == "norm.weight":
        return p + "shared_head.norm.weight"
    return p + (rest[len("block.") :] if rest.startswith("block.") else rest)


def hf_items(name: str, value: Any, config: DeepSeekConfig, split: Callable[[Any, int, str], Any]):
    """(checkpoint name, piece) for one deepmoe entry; stacked experts split per expert with `split`."""
    hf = hf_name(name, config)
    parent, _, leaf = hf.rpartition(".")
    if parent.endswith((".mlp.experts", ".ffn.experts")) and leaf in _PROJ:
        kind, index = re.match(r"model\.(layers|mtp)\.(\d+)\.", name).groups()
        n = config.moe_config(int(index) + (config.num_hidden_layers if kind == "mtp" else 0)).n_routed_experts
        names = hf_v4.EXPERT_NAMES if config.model_type == "deepseek_v4" else {p: p for p in _PROJ[leaf]}
        return [(f"{parent}.{j}.{names[proj]}.weight", split(value, j, proj)) for j in range(n) for proj in _PROJ[leaf]]
    return [(hf, value)]


def split_expert_shape(shape: tuple[int, ...], j: int, proj: str) -> tuple[int, ...]:
    return (shape[1] // 2, shape[2]) if proj in ("gate_proj", "up_proj") else tuple(shape[1:])


def split_expert_tensor(t: Tensor, j: int, proj: str) -> Tensor:
    half = t.shape[1] // 2
    return {"gate_proj": t[j, :half], "up_proj": t[j, half:], "down_proj": t[j]}[proj]


def expected_hf_shapes(config: DeepSeekConfig, fused_layers: set[str]) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape; experts per expert, except under the prefixes in `fused_layers`."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_shapes(config).items():
        hf = hf_name(name, config)
        if hf.rpartition(".")[0] in fused_layers:
            out[hf] = shape
        else:
            out.update(hf_items(name, shape, config, split_expert_shape))
    return out


def mtp_copies(config: DeepSeekConfig) -> dict[str, tuple[int, ...]]:
    size = (config.vocab_size, config.hidden_size)
    return {f"model.layers.{config.num_hidden_layers + k}.{r}": size
            for k in range(config.num_nextn_predict_layers) for r in _MTP_COPIES}  # fmt: skip
