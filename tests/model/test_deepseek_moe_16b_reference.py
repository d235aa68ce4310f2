"""model_type "deepseek" (DeepSeekMoE 16B) has no class in transformers. Its published formulas are a
Llama decoder whose FFNs after the first_k_dense_replace layers are DeepSeekMoE layers; the reference
here is exactly that, assembled from transformers' own parts: LlamaForCausalLM with its MLPs swapped
for transformers' DeepseekV2Moe (softmax top-k, greedy, shared experts) on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from configs import tiny_preset
from deepmoe import DeepSeekConfig, DeepSeekForCausalLM

transformers = pytest.importorskip("transformers")


def _reference(config: DeepSeekConfig):
    from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            rope_theta=config.rope_theta,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=False,
            attention_bias=config.attention_bias,
        )
    )
    moe = config.moe
    moe_config = DeepseekV2Config(
        hidden_size=config.hidden_size,
        moe_intermediate_size=moe.moe_intermediate_size,
        n_routed_experts=moe.n_routed_experts,
        n_shared_experts=moe.n_shared_experts,
        num_experts_per_tok=moe.num_experts_per_tok,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=moe.routed_scaling_factor,
    )
    for i, layer in enumerate(llama.model.layers):
        if config.is_moe_layer(i):
            layer.mlp = DeepseekV2Moe(moe_config)
    return llama


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_deepseek_moe_16b_layout_matches_llama_with_deepseek_moe_ffns(kv_heads):
    config = tiny_preset("tiny-deepseek-moe", num_hidden_layers=3, num_key_value_heads=kv_heads, vocab_size=211)
    torch.manual_seed(0)
    ours = DeepSeekForCausalLM(config).eval()
    reference = _reference(config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 211, (2, 17))
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
