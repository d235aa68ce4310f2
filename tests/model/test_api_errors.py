"""Wrong arguments get one clear error naming the argument and what to do, not a raw torch or Python error."""

from __future__ import annotations

import warnings

import pytest
import torch

from configs import tiny_model_config, tiny_v3_moe
from deepmoe import MoE
from deepmoe.model import DeepSeekForCausalLM
from deepmoe.moe import router as router_module
from deepmoe.tools.merge import merge_checkpoints

CONFIG = tiny_model_config()  # vocab 64, layer 1 is a V3-routed MoE with a selection bias


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekForCausalLM(CONFIG).eval()


def ids(*shape):
    return torch.randint(0, CONFIG.vocab_size, shape or (2, 6))


@pytest.mark.parametrize(
    "labels, match",
    [
        (lambda x: x[:, :4], r"labels must have the shape of input_ids \(2, 6\)"),
        (lambda x: x[None], r"labels must have the shape of input_ids"),
        (lambda x: x.float(), r"labels must be an integer"),
        (lambda x: x.tolist(), r"labels must be an integer .*list"),
        (lambda x: torch.full_like(x, 64), r"label 64 is outside the vocabulary \[0, 64\).*-100"),
        (lambda x: torch.full_like(x, -5), r"label -5 is outside the vocabulary"),
    ],
)
def test_bad_labels(model, labels, match):
    x = ids()
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(x, labels=labels(x))


def test_ignore_index_stays_allowed(model):
    x = ids()
    labels = x.clone()
    labels[:, :3] = -100  # the loss's ignore_index
    with torch.no_grad():
        out = model(x, labels=labels)
        all_ignored = model(x, labels=torch.full_like(x, -100))
    assert torch.isfinite(out.loss)
    assert all_ignored.lm_loss is not None  # NaN (nothing to average), as F.cross_entropy gives: no error


def test_meta_input_and_meta_model(model):
    with pytest.raises(ValueError, match="input_ids is on the meta device"):
        model(ids().to("meta"))
    with torch.device("meta"):
        empty = DeepSeekForCausalLM(CONFIG)
    with pytest.raises(ValueError, match=r"weights are on the meta device.*to_empty"):
        empty(ids())


def test_update_bias_accepts_a_list():
    """A list (or tuple) of token counts is converted: the same step as the tensor."""
    a, b = MoE(tiny_v3_moe()), MoE(tiny_v3_moe())
    load = [5, 1, 0, 3, 9, 2, 2, 2]
    a.update_bias(torch.tensor(load))
    b.update_bias(load)
    b.gate.update_bias(tuple(load))
    a.gate.update_bias(torch.tensor(load))
    assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
    assert b.gate.e_score_correction_bias.abs().sum() > 0
    with pytest.raises(ValueError, match=r"load must have shape \(8,\)"):
        a.update_bias([1, 2, 3])
    with pytest.raises(TypeError, match="load must be the tokens routed to each expert"):
        a.update_bias("12345678")
    with pytest.raises(TypeError, match="load must hold numbers"):
        a.update_bias([True] * 8)


def test_update_expert_bias_takes_stats_or_loads():
    torch.manual_seed(0)
    a, b = DeepSeekForCausalLM(CONFIG), DeepSeekForCausalLM(CONFIG)
    b.load_state_dict(a.state_dict())
    x = ids()
    stats = a(x).routing_stats
    load = stats[1].tokens_per_expert
    a.update_expert_bias(stats)
    b.update_expert_bias({1: load.tolist()})
    assert torch.equal(a.moe_layers()[1].gate.e_score_correction_bias, b.moe_layers()[1].gate.e_score_correction_bias)
    with pytest.raises(TypeError, match="dict of layer index -> RoutingStats"):
        a.update_expert_bias([stats[1]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, top_p=-0.5), r"top_p must be None or a number in \(0, 1\], got -0.5"),
        (dict(do_sample=True, top_k=2.5), r"top_k must be None or an integer >= 1, got 2.5"),
        (dict(do_sample=True, top_k=0), r"top_k must be None or an integer >= 1"),
        (dict(top_p=0.9), r"top_p=0.9 only applies when sampling"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(ids(1, 4), max_new_tokens=2, **kwargs)


def test_merge_refuses_models(model, tmp_path):
    with pytest.raises(
        TypeError, match=r"checkpoint directories \(paths\), got a DeepSeekForCausalLM.*save_pretrained"
    ):
        merge_checkpoints([model, model], [0.5, 0.5], tmp_path / "out")
    with pytest.raises(TypeError, match="a list of checkpoint directories"):
        merge_checkpoints(str(tmp_path), [1.0], tmp_path / "out")


def test_float64_routes_in_float32_with_one_warning(monkeypatch):
    monkeypatch.setattr(router_module, "_warned_float64", False)
    torch.manual_seed(0)
    layer = MoE(tiny_v3_moe())
    wide = MoE(tiny_v3_moe()).double()
    wide.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match="router computes in float32"):
        out = wide(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = wide(x.double())  # once per process
    assert out.hidden_states.dtype == again.hidden_states.dtype == torch.float64
    assert out.routing.scores.dtype == torch.float32
    assert torch.equal(out.routing.topk_idx, layer(x).routing.topk_idx)  # the float32 layer's routing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # float32: no warning
