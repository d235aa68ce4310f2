"""DeepSeek's inference layout: names and the model-parallel split rule, checked against DeepSeek's published
mapping (deepseek-ai/DeepSeek-V3 inference/convert.py) written out by hand below."""

from __future__ import annotations

import pytest
import torch

from deepmoe.io.deepseek_layout import is_mtp, model_args, owner, rank_slice, split_dim, to_deepseek, to_hf

# cpu_only: checkpoint files read to CPU tensors
pytestmark = pytest.mark.cpu_only

# HF name -> (DeepSeek name, split dimension across ranks: 0 rows, 1 columns, None whole or per-expert rank)
PUBLISHED = {
    "model.embed_tokens.weight": ("embed.weight", 0),
    "model.layers.0.input_layernorm.weight": ("layers.0.attn_norm.weight", None),
    "model.layers.0.post_attention_layernorm.weight": ("layers.0.ffn_norm.weight", None),
    "model.layers.0.self_attn.q_proj.weight": ("layers.0.attn.wq.weight", 0),
    "model.layers.0.self_attn.q_a_proj.weight": ("layers.0.attn.wq_a.weight", None),
    "model.layers.0.self_attn.q_a_proj.weight_scale_inv": ("layers.0.attn.wq_a.scale", None),
    "model.layers.0.self_attn.q_a_layernorm.weight": ("layers.0.attn.q_norm.weight", None),
    "model.layers.0.self_attn.q_b_proj.weight": ("layers.0.attn.wq_b.weight", 0),
    "model.layers.0.self_attn.q_b_proj.weight_scale_inv": ("layers.0.attn.wq_b.scale", 0),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": ("layers.0.attn.wkv_a.weight", None),
    "model.layers.0.self_attn.kv_a_layernorm.weight": ("layers.0.attn.kv_norm.weight", None),
    "model.layers.0.self_attn.kv_b_proj.weight": ("layers.0.attn.wkv_b.weight", 0),
    "model.layers.0.self_attn.o_proj.weight": ("layers.0.attn.wo.weight", 1),
    "model.layers.0.self_attn.o_proj.weight_scale_inv": ("layers.0.attn.wo.scale", 1),
    "model.layers.0.mlp.gate_proj.weight": ("layers.0.ffn.w1.weight", 0),
    "model.layers.0.mlp.down_proj.weight": ("layers.0.ffn.w2.weight", 1),
    "model.layers.0.mlp.up_proj.weight": ("layers.0.ffn.w3.weight", 0),
    "model.layers.3.mlp.gate.weight": ("layers.3.ffn.gate.weight", None),
    "model.layers.3.mlp.gate.e_score_correction_bias": ("layers.3.ffn.gate.bias", None),
    "model.layers.3.mlp.experts.17.gate_proj.weight": ("layers.3.ffn.experts.17.w1.weight", None),
    "model.layers.3.mlp.experts.17.down_proj.weight": ("layers.3.ffn.experts.17.w2.weight", None),
    "model.layers.3.mlp.experts.17.up_proj.weight_scale_inv": ("layers.3.ffn.experts.17.w3.scale", None),
    "model.layers.3.mlp.shared_experts.gate_proj.weight": ("layers.3.ffn.shared_experts.w1.weight", 0),
    "model.layers.3.mlp.shared_experts.down_proj.weight": ("layers.3.ffn.shared_experts.w2.weight", 1),
    "model.layers.3.mlp.shared_experts.up_proj.weight": ("layers.3.ffn.shared_experts.w3.weight", 0),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("head.weight", 0),
}


@pytest.mark.parametrize("hf", list(PUBLISHED))
def test_names_and_split_dims_are_deepseeks(hf):
    ds, dim = PUBLISHED[hf]
    assert to_deepseek(hf) == ds
    assert to_hf(ds) == hf
    assert split_dim(ds) == dim


def test_experts_live_on_one_rank_each():
    # 256 experts over 8 ranks: 32 per rank, expert E on rank E // 32
    assert [owner(f"layers.3.ffn.experts.{e}.w1.weight", 256, 8) for e in (0, 31, 32, 100, 255)] == [0, 0, 1, 3, 7]
    assert owner("layers.3.ffn.shared_experts.w1.weight", 256, 8) is None
    assert owner("layers.3.ffn.gate.weight", 256, 8) is None


def test_rank_slices_are_consecutive_equal_blocks():
    t = torch.arange(24).reshape(4, 6)
    assert rank_slice(t, 0, 1, 2).tolist() == [[12, 13, 14, 15, 16, 17], [18, 19, 20, 21, 22, 23]]
    assert rank_slice(t, 1, 2, 3).tolist() == [[4, 5], [10, 11], [16, 17], [22, 23]]
    assert rank_slice(t, None, 1, 2) is t


def test_mtp_layers_and_unknown_names():
    assert is_mtp("model.layers.61.eh_proj.weight", 61) and not is_mtp("model.layers.60.mlp.gate.weight", 61)
    with pytest.raises(ValueError, match="eh_proj"):
        to_deepseek("model.layers.61.eh_proj.weight")
    with pytest.raises(ValueError, match="no_such"):
        to_hf("layers.0.attn.no_such.weight")


def test_model_args_use_deepseeks_field_names():
    hf = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
          "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128, "n_routed_experts": 256,
          "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
          "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512,
          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}  # fmt: skip
    published_671b = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                      "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                      "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                      "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                      "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}  # fmt: skip
    assert model_args(hf, fp8=True) == published_671b
