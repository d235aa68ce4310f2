"""The MoE layer's API: the sequence layout of [T, H] input, per-layer frozen configs, update_bias forwarding."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from configs import tiny_model_config, tiny_moe
from deepmoe import MoE
from deepmoe.model.decoder import DeepSeekForCausalLM

# per-sequence behaviour: the sequence-wise loss (B4) and no_drop_fraction's protected sequences
PER_SEQUENCE = tiny_moe(
    hidden_size=16, moe_intermediate_size=8, n_shared_experts=1, seq_aux_loss_alpha=0.1, aux_loss_alpha=0.01,
    capacity_factor=0.5, no_drop_fraction=0.5,
)  # fmt: skip


def layer_and_input(batch: int = 4, seq: int = 6):
    torch.manual_seed(0)
    layer = MoE(PER_SEQUENCE).train()
    return layer, torch.randn(batch, seq, 16)


def test_flattened_input_with_batch_size_is_the_batched_input():
    """[B, S, H] and its flattening [B·S, H] with batch_size=B: same outputs, losses, dropping and stats."""
    layer, x = layer_and_input()
    a, b = layer(x), layer(x.flatten(0, 1), batch_size=4)
    assert torch.equal(a.hidden_states.flatten(0, 1), b.hidden_states)
    assert a.losses.keys() == b.losses.keys() and "sequence" in a.losses
    assert all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)
    assert torch.equal(a.aux_loss, b.aux_loss)
    assert torch.equal(a.routing.kept, b.routing.kept) and b.routing.batch_size == 4
    for field in dataclasses.fields(a.stats):
        assert torch.equal(torch.as_tensor(getattr(a.stats, field.name)), torch.as_tensor(getattr(b.stats, field.name)))


def test_flattened_input_without_batch_size_is_one_sequence():
    """As the docstring says: [T, H] alone is one sequence of T tokens, i.e. [1, T, H] (not the batch)."""
    layer, x = layer_and_input()
    flat = x.flatten(0, 1)
    one, batched, alone = layer(flat[None]), layer(x), layer(flat)
    assert torch.equal(alone.losses["sequence"], one.losses["sequence"])
    assert not torch.equal(alone.losses["sequence"], batched.losses["sequence"])
    # no_drop_fraction=0.5 protects the first 2 of 4 sequences, but half of one sequence is nothing
    assert batched.routing.kept[:12].all() and not torch.equal(alone.routing.kept, batched.routing.kept)
    doc = MoE.forward.__doc__
    assert "batch_size" in doc and "ONE sequence" in doc


@pytest.mark.parametrize(
    ("shape", "batch_size"), [((24, 16), 5), ((24, 16), 0), ((24, 16), True), ((24, 16), 2.0), ((4, 6, 16), 3)]
)
def test_bad_batch_size_is_refused(shape, batch_size):
    layer, _ = layer_and_input()
    with pytest.raises(ValueError, match="batch_size"):
        layer(torch.randn(shape), batch_size=batch_size)


def test_batch_size_equal_to_the_batch_is_accepted():
    layer, x = layer_and_input()
    assert torch.equal(layer(x, batch_size=4).hidden_states, layer(x).hidden_states)


# ---- one frozen config per layer ---------------------------------------------------------------------------


def tiny_model() -> DeepSeekForCausalLM:
    moe = tiny_moe(hidden_size=32, moe_intermediate_size=16, n_shared_experts=1)
    config = tiny_model_config(
        intermediate_size=64, num_hidden_layers=3, q_lora_rank=None, moe=moe, num_nextn_predict_layers=1
    )
    torch.manual_seed(0)
    return DeepSeekForCausalLM(config)


def test_config_cannot_be_changed_in_place():
    model = tiny_model()
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.moe_layers()[1].config.num_experts_per_tok = 4


def test_changing_one_layers_config_leaves_the_others():
    model = tiny_model()
    layers = model.moe_layers()
    assert sorted(layers) == [1, 2, 3]  # 3 is the MTP block's
    layers[1].config = replace(layers[1].config, num_experts_per_tok=4)
    assert [layers[i].config.num_experts_per_tok for i in (1, 2, 3)] == [4, 2, 2]
    assert model.config.moe.num_experts_per_tok == 2
    assert layers[1].gate.config.num_experts_per_tok == 4  # the router routes with it
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    assert [out.routing_stats[i].tokens_per_expert.sum().item() for i in (1, 2, 3)] == [2 * 8 * 4, 16 * 2, 14 * 2]


def test_an_invalid_value_is_refused_at_once():
    layer = tiny_model().moe_layers()[1]
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts_per_tok=9 is invalid"):
        layer.config = replace(layer.config, num_experts_per_tok=9)
    assert layer.config.num_experts_per_tok == 2


@pytest.mark.parametrize("field", ["n_routed_experts", "hidden_size", "n_shared_experts", "use_expert_bias"])
def test_a_config_that_does_not_fit_the_weights_is_refused(field):
    layer = tiny_model().moe_layers()[1]
    value = {"n_routed_experts": 16, "hidden_size": 64, "n_shared_experts": 2, "use_expert_bias": True}[field]
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.* is invalid for this layer"):
        layer.config = replace(layer.config, **{field: value})
    assert getattr(layer.config, field) != value


def test_a_config_that_breaks_the_expert_mask_is_refused():
    layer = tiny_model().moe_layers()[1]
    layer.gate.set_expert_mask(disabled=[0, 1, 2, 3, 4])  # 3 experts left, enough for K = 2
    with pytest.raises(ValueError, match="expert mask"):
        layer.config = replace(layer.config, num_experts_per_tok=4)
    assert layer.config.num_experts_per_tok == layer.gate.config.num_experts_per_tok == 2
    layer.config = replace(layer.config, num_experts_per_tok=3)
    assert layer.gate.disabled_experts[:5].all() and layer.gate.has_expert_mask


def test_config_settings_reach_the_experts():
    layer = tiny_model().moe_layers()[1]
    layer.config = replace(layer.config, experts_implementation="loop", fp8_experts=True)
    assert layer.experts.implementation == "loop" and layer.experts.fp8


def test_deepseek_config_stays_mutable():
    """The model config is a recipe, as in HF; its MoE config is replaced, not mutated."""
    config = tiny_model().config
    config.num_hidden_layers = 2
    config.moe = replace(config.moe, num_experts_per_tok=3)
    assert DeepSeekForCausalLM(config).moe_layers()[1].config.num_experts_per_tok == 3


def test_update_bias_forwards_the_process_group():
    config = replace(PER_SEQUENCE, use_expert_bias=True, capacity_factor=None)
    layer = MoE(config)
    seen = {}
    layer.gate.update_bias = lambda load, process_group=None: seen.update(load=load, group=process_group)
    group = object()
    layer.update_bias(torch.ones(8), process_group=group)
    assert seen["group"] is group
    layer.update_bias(torch.ones(8))
    assert seen["group"] is None
