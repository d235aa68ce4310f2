"""`from_pretrained` builds on the meta device and assigns the checkpoint's tensors: no float32 random copy is
made first, and the model is exactly the one an eager build + load_state_dict gives (RoPE's θ rebuilt)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from configs import tiny_model_config, tiny_preset
from deepmoe.model import DeepSeekForCausalLM, from_pretrained, save_pretrained

# cpu_only: RSS measurements of loading
pytestmark = pytest.mark.cpu_only

YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip
TINY = dict(vocab_size=96, num_hidden_layers=2, max_position_embeddings=128)

CONFIGS = {
    "v2 + YaRN": lambda: tiny_preset("tiny-v2", **TINY, rope_scaling=dict(YARN)),
    "v3 + MTP + YaRN": lambda: tiny_preset(
        "tiny-v3", **TINY, num_nextn_predict_layers=1, rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}
    ),
    "tiny MLA, tied": lambda: tiny_model_config(num_nextn_predict_layers=1, tie_word_embeddings=True),
}


def trained_like(config) -> DeepSeekForCausalLM:
    """A model whose selection bias is not zero (as after training)."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            if layer.gate.e_score_correction_bias is not None:
                layer.gate.e_score_correction_bias.copy_(torch.randn_like(layer.gate.e_score_correction_bias) * 0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_equals_the_eager_load(tmp_path, name, dtype):
    config = CONFIGS[name]()
    source = trained_like(config)
    save_pretrained(source, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=dtype)

    eager = DeepSeekForCausalLM(loaded.config)  # the old path: an eager model, then the state assigned
    eager.load_state_dict({k: v.clone() for k, v in loaded.state_dict().items()}, assign=True)
    eager.eval()
    tensors = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert not [n for n, t in tensors.items() if t.is_meta]
    expected = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    assert tensors.keys() == expected.keys()
    assert [n for n in tensors if not torch.equal(tensors[n], expected[n])] == []
    assert any(n.endswith("rotary.inv_freq") for n in tensors)

    ids = torch.randint(0, config.vocab_size, (2, 48))  # past YaRN's original 32 positions
    with torch.no_grad():
        a, b = loaded(ids, labels=ids), eager(ids, labels=ids)
        reference = source(ids, labels=ids) if dtype is None else None
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert len(a.mtp_logits) == config.num_nextn_predict_layers
    assert all(torch.equal(x, y) for x, y in zip(a.mtp_logits, b.mtp_logits, strict=True))
    if reference is not None:  # stored as float32: the saved model itself
        assert torch.equal(a.logits, reference.logits)


def test_bfloat16_weights_with_float32_bias_and_theta(tmp_path):
    config = CONFIGS["v3 + MTP + YaRN"]()
    source = trained_like(config)
    save_pretrained(source, tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    gates = [layer.gate for layer in model.moe_layers().values()]
    assert gates and all(g.e_score_correction_bias.dtype == torch.float32 for g in gates)
    for g, s in zip(gates, [layer.gate for layer in source.moe_layers().values()], strict=True):
        assert torch.equal(g.e_score_correction_bias, s.e_score_correction_bias)
        assert not g.disabled_experts.any() and not g.forced_experts.any() and not g.has_expert_mask
    rotary = model.model.layers[0].self_attn.rotary
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, source.model.layers[0].self_attn.rotary.inv_freq)
    assert not model.training


def test_no_random_init_on_load(tmp_path, monkeypatch):
    """The weights are never initialised: the model is built on the meta device (no normal_ on real memory)."""
    save_pretrained(DeepSeekForCausalLM(replace(tiny_model_config())), tmp_path)
    real_inits = []
    original = torch.Tensor.normal_

    def spy(self, *args, **kwargs):
        if not self.is_meta:
            real_inits.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert real_inits == []
