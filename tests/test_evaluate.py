"""`fp8_error_per_layer`: the routed experts' FP8 error per MoE layer, next to bf16's."""

from __future__ import annotations

import pytest
import torch

from configs import tiny_preset
from deepmoe.evaluate import fp8_error_per_layer
from deepmoe.model.decoder import DeepSeekForCausalLM

# cpu_only: fp8 evaluation on CPU kernels with a CPU generator
pytestmark = pytest.mark.cpu_only


def tiny_model(hidden: int = 128) -> DeepSeekForCausalLM:
    """tiny-v3 cut to 2 layers: one dense layer, one MoE layer, and the MTP block's MoE layer."""
    config = tiny_preset(num_hidden_layers=2, hidden_size=hidden, moe={"hidden_size": hidden})
    torch.manual_seed(0)
    return DeepSeekForCausalLM(config)


def test_fp8_error_is_above_bf16_and_small():
    model = tiny_model().train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    errors = fp8_error_per_layer(model, input_ids)
    assert sorted(errors) == sorted(model.moe_layers()) == [1, 2]
    for idx, e in errors.items():
        assert 0 < e["bf16"] < e["fp8"] < 0.1, (idx, e)
        assert e["fp8"] > 1e-3, (idx, e)
        assert e["fp8_over_bf16"] == e["fp8"] / e["bf16"]
    # flags restored, no hooks left behind
    assert model.training
    assert all(not layer.experts.fp8 and not layer.experts._forward_hooks for layer in model.moe_layers().values())


def test_an_fp8_model_keeps_its_flag():
    model = tiny_model().eval()
    for layer in model.moe_layers().values():
        layer.experts.fp8 = True
    errors = fp8_error_per_layer(model, torch.randint(0, model.config.vocab_size, (1, 32)))
    assert len(errors) == 2 and all(e["fp8"] > e["bf16"] for e in errors.values())
    assert not model.training and all(layer.experts.fp8 for layer in model.moe_layers().values())
