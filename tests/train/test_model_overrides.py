"""`TrainConfig.model_overrides`: DeepSeekConfig and MoEConfig fields at the top level or under "moe", an
unknown field refused by name, an invalid value one line naming the field."""

import pytest

from deepmoe.train.config import TrainConfig, build_model_config


def build(overrides):
    return build_model_config(TrainConfig(model_overrides=overrides), vocab_size=300)


def test_flat_model_and_moe_fields():
    config = build({"num_hidden_layers": 2, "n_routed_experts": 8, "n_group": 1, "topk_group": 1})
    assert config.num_hidden_layers == 2
    assert config.moe.n_routed_experts == 8


def test_nested_moe_fields_and_hidden_size_sets_both():
    config = build({"hidden_size": 96, "moe": {"n_routed_experts": 8, "n_group": 1, "topk_group": 1}})
    assert config.hidden_size == config.moe.hidden_size == 96
    assert config.moe.n_routed_experts == 8


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"bogus": 1}, "model_overrides.bogus"), ({"moe": {"bogus": 1}}, "model_overrides.moe.bogus")],
)
def test_unknown_field_is_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        build(overrides)


def test_invalid_value_is_one_line_naming_the_field():
    with pytest.raises(ValueError) as info:
        build({"n_routed_experts": 6})
    message = str(info.value)
    assert "\n" not in message and "MoEConfig(" not in message
    assert message.startswith("TrainConfig.model_overrides: MoEConfig.")
    with pytest.raises(ValueError, match=r"Config\.hidden_size=-1 is invalid") as info:
        build({"hidden_size": -1})
    assert "MoEConfig(" not in str(info.value)
