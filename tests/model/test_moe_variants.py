"""DeepSpeed-MoE's variants as configs (docs/design.md#e4-layer-placement-and-the-deepspeed-moe-variants):
Pyramid-MoE (`moe_experts_per_layer`) and
Residual-MoE (a shared dense MLP plus a top-1 routed correction): validation, the built layers,
parameter counts against a hand count, the HF round trip, and a few training steps of each preset."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from corpora import StandInCorpus
from deepmoe.config import DeepSeekConfig
from deepmoe.io import load_config
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.parameters import count_parameters
from deepmoe.moe import MoE, SwiGLU
from deepmoe.presets import get_preset
from deepmoe.train.trainer import TrainConfig, train


def pyramid(**overrides) -> DeepSeekConfig:
    return dataclasses.replace(get_preset("tiny-pyramid-moe"), **overrides)


@pytest.mark.parametrize(
    "counts, message",
    [
        ([0, 8, 16], r"list of num_hidden_layers=4"),
        ([4, 8, 16, 32], r"entry 0 must be 0: layer 0 is dense"),
        ([0, 8, 0, 32], r"entry 2 must be an integer >= 1"),
        ([0, 8, 2.5, 32], r"entry 2 must be an integer >= 1"),
        ([0, 3, 16, 32], r"\[1\]=3 is invalid: .*num_experts_per_tok"),
        ("8,16", r"must be a list"),
    ],
)
def test_pyramid_counts_are_validated(counts, message):
    with pytest.raises(ValueError, match=r"moe_experts_per_layer.*" + message):
        pyramid(moe_experts_per_layer=counts)


def test_pyramid_count_must_suit_the_groups():
    grouped = get_preset("tiny-v3")  # 4 groups, top-2 groups, noaux_tc
    with pytest.raises(ValueError, match=r"moe_experts_per_layer\[2\]=6 is invalid: .*n_group"):
        dataclasses.replace(grouped, moe_experts_per_layer=[0, 8, 6, 16])
    with pytest.raises(ValueError, match="needs moe"):
        dataclasses.replace(grouped, moe=None, moe_experts_per_layer=[0, 0, 0, 0])


def test_pyramid_layers_have_their_expert_counts():
    config = pyramid(vocab_size=64, num_nextn_predict_layers=1)
    model = DeepSeekForCausalLM(config)
    assert isinstance(model.model.layers[0].mlp, SwiGLU)
    counts = {i: layer.config.n_routed_experts for i, layer in model.moe_layers().items()}
    assert counts == {1: 8, 2: 16, 3: 32, 4: config.moe.n_routed_experts}  # the MTP block keeps moe's count
    for i in (1, 2, 3):
        layer = model.moe_layers()[i]
        assert layer.gate.weight.shape == (counts[i], 128) and layer.experts.gate_up_proj.shape[0] == counts[i]
    out = model(torch.randint(0, 64, (2, 7)), labels=torch.randint(0, 64, (2, 7)))
    assert {i: s.tokens_per_expert.numel() for i, s in out.routing_stats.items()} == counts


def _hand_count(config: DeepSeekConfig, routed_counts: dict[int, int]) -> tuple[int, int]:
    """(total, active) from the shapes: embedding + head, MHA (4 H×H), norms, dense and MoE FFNs."""
    h, moe = config.hidden_size, config.moe
    total = 2 * config.vocab_size * h + config.num_hidden_layers * (4 * h * h + 2 * h) + h
    inactive = 0
    for i in range(config.num_hidden_layers):
        if i not in routed_counts:
            total += 3 * h * config.intermediate_size
            continue
        n, expert = routed_counts[i], 3 * h * moe.moe_intermediate_size
        total += n * h + n * expert + moe.n_shared_experts * expert
        inactive += (n - moe.num_experts_per_tok) * expert
    return total, total - inactive


@pytest.mark.parametrize(
    "name, routed_counts", [("tiny-pyramid-moe", {1: 8, 2: 16, 3: 32}), ("tiny-residual-moe", {1: 8, 2: 8, 3: 8})]
)
def test_parameter_counts_match_a_hand_count(name, routed_counts):
    config = get_preset(name)
    count = count_parameters(config)
    assert (count.total, count.active) == _hand_count(config, routed_counts)


def test_residual_moe_is_a_dense_mlp_plus_a_top1_correction():
    config = get_preset("tiny-residual-moe")
    moe = config.moe
    assert (moe.n_shared_experts, moe.num_experts_per_tok) == (1, 1)
    # a token's FFN: the fixed MLP (shared expert) and one routed expert of the same width
    assert 2 * moe.moe_intermediate_size == config.intermediate_size
    layer = MoE(moe)
    x = torch.randn(5, moe.hidden_size)
    out = layer(x)
    routing = out.routing
    assert routing.topk_idx.shape == (5, 1)
    expected = layer.shared_experts(x)
    for t in range(5):
        e = int(routing.topk_idx[t, 0])
        gate_up = layer.experts.gate_up_proj[e]
        gate, up = gate_up[: moe.moe_intermediate_size], gate_up[moe.moe_intermediate_size :]
        routed = layer.experts.down_proj[e] @ (torch.nn.functional.silu(gate @ x[t]) * (up @ x[t]))
        expected[t] += routing.topk_weight[t, 0] * routed
    torch.testing.assert_close(out.hidden_states, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cpu_only  # files on disk, loaded to the CPU
@pytest.mark.parametrize("name", ["tiny-pyramid-moe", "tiny-residual-moe"])
def test_save_and_load_keep_the_variant(tmp_path, name):
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset(name), vocab_size=64)
    model = DeepSeekForCausalLM(config).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)
    if name == "tiny-pyramid-moe":  # transformers' classes have one expert count for all layers
        assert any("moe_experts_per_layer" in str(w.message) for w in caught)
    assert load_config(tmp_path) == config
    loaded = from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.cpu_only  # the trainer: CPU data pipeline, checkpoints on disk
@pytest.mark.filterwarnings("ignore:config written as deepseek, but its MoE layers")
@pytest.mark.parametrize("name", ["tiny-pyramid-moe", "tiny-residual-moe"])
def test_variant_presets_train(tmp_path, name):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    corpus = StandInCorpus(torch.randint(0, 64, (3000,), generator=g), torch.randint(0, 64, (300,), generator=g))
    config = TrainConfig(
        preset=name, hidden_size=64, seq_len=32, batch_size=4, steps=3, warmup_steps=1, eval_every=0,
        eval_batches=1, save_every=0, progress=False, out=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(config, corpus)
    assert result.step == 3 and not result.interrupted
    trained = from_pretrained(result.checkpoint)
    assert trained.config.moe_experts_per_layer == get_preset(name).moe_experts_per_layer
    assert {i: m.config.n_routed_experts for i, m in trained.moe_layers().items()} == {
        i: get_preset(name).moe_config(i).n_routed_experts for i in (1, 2, 3)
    }
