"""Building on the meta device: `to_empty` + `reset_parameters` (+ `load_state_dict`) is the eager model, exactly.

`to_empty` leaves every tensor uninitialised, including the non-persistent ones no checkpoint restores (RoPE's θ,
the router's expert masks); the tests fill them with garbage first, so nothing passes by luck of the allocator.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from configs import tiny_v3_moe
from deepmoe import MoE
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.presets import get_preset

# cpu_only: meta models materialised with to_empty(device="cpu")
pytestmark = pytest.mark.cpu_only

YARN_V2 = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip
YARN_V3 = {**YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}
TINY = dict(vocab_size=128, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=256)


def shrink(name: str, **overrides):
    config = get_preset(name)
    moe = replace(config.moe, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2)
    return replace(config, **TINY, moe=moe, **overrides)


CONFIGS = {
    "v1 (MHA, rotate-half)": lambda: shrink("tiny-deepseek-moe"),
    "v2 (MLA, YaRN, groups)": lambda: replace(
        shrink("tiny-v2"), rope_scaling=dict(YARN_V2), moe=replace(shrink("tiny-v2").moe, n_group=2, n_devices=2)
    ),
    "v3 (MTP, YaRN, bias, q_lora)": lambda: replace(
        shrink("tiny-v3"), rope_scaling=dict(YARN_V3), moe=replace(shrink("tiny-v3").moe, n_group=2, topk_group=1)
    ),
    "v3.2 (DSA indexer: LayerNorm, float32 weights_proj)": lambda: shrink("tiny-v32"),
    "pyramid, tied embeddings": lambda: shrink(
        "tiny-pyramid-moe", moe_experts_per_layer=[0, 4], tie_word_embeddings=True
    ),
}


def scramble(module: torch.nn.Module) -> None:
    """What uninitialised memory may hold: NaN in every float tensor, True in the bool masks."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.fill_(True if t.dtype == torch.bool else float("nan"))


def meta_built(config) -> DeepSeekForCausalLM:
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    scramble(model)
    return model


def all_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, the non-persistent ones (θ, expert masks) included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_reset_is_the_eager_init(name):
    """Same seed: meta + to_empty + reset_parameters gives the eager constructor's values bit for bit."""
    config = CONFIGS[name]()
    torch.manual_seed(3)
    eager = DeepSeekForCausalLM(config)
    model = meta_built(config)
    torch.manual_seed(3)
    model.reset_parameters()
    expected, got = all_tensors(eager), all_tensors(model)
    assert expected.keys() == got.keys()
    assert any(".rotary.inv_freq" in k for k in got) and any("disabled_experts" in k for k in got)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_reset_then_load_gives_the_eager_logits(name):
    """The loaded model's logits, MTP logits and losses equal the eager model's exactly (θ rebuilt)."""
    config = CONFIGS[name]()
    torch.manual_seed(0)
    eager = DeepSeekForCausalLM(config).eval()
    model = meta_built(config)
    model.reset_parameters()
    model.load_state_dict(eager.state_dict())
    model.eval()
    ids = torch.randint(0, config.vocab_size, (2, 80))  # past the YaRN configs' original 64 positions
    with torch.no_grad():
        a, b = eager(ids, labels=ids), model(ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)
    assert len(a.mtp_logits) == len(b.mtp_logits) == config.num_nextn_predict_layers
    assert all(torch.equal(x, y) for x, y in zip(a.mtp_logits, b.mtp_logits, strict=True))


def test_reset_parameters_keeps_rope_float32_after_a_cast():
    config = CONFIGS["v3 (MTP, YaRN, bias, q_lora)"]()
    eager = DeepSeekForCausalLM(config)
    model = meta_built(config).to(torch.bfloat16)
    model.reset_parameters()
    rotary = model.model.layers[0].self_attn.rotary
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, eager.model.layers[0].self_attn.rotary.inv_freq)


MOE = tiny_v3_moe(
    hidden_size=16, moe_intermediate_size=8, n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True
)


def test_bare_moe_on_meta():
    """A bare MoE: meta + to_empty + reset_parameters is the constructor under the same seed (finite outputs),
    and after load_state_dict its outputs are the eager layer's."""
    torch.manual_seed(1)
    eager = MoE(MOE)
    with torch.device("meta"):
        layer = MoE(MOE)
    layer.to_empty(device="cpu")
    scramble(layer)
    torch.manual_seed(1)
    layer.reset_parameters()
    expected, got = all_tensors(eager), all_tensors(layer)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert not layer.gate.has_expert_mask

    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert torch.isfinite(out.hidden_states).all()
    with torch.device("meta"):
        loaded = MoE(MOE)
    loaded.to_empty(device="cpu")
    scramble(loaded)
    loaded.reset_parameters()
    with torch.no_grad():
        eager.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    loaded.load_state_dict(eager.state_dict())
    assert torch.equal(loaded(x).hidden_states, eager(x).hidden_states)
