"""The causal LM: presets and parameter counts, losses, MTP, input validation, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from configs import tiny_preset
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.generate import generate, generate_speculative, sample_next
from deepmoe.model.parameters import count_parameters
from deepmoe.presets import PRESETS, get_preset

# (total, active) parameters as published, in billions, and whether the active figure counts the
# input embedding table: the V2-Lite report leaves it out (with it: 2.66B), the others keep it in.
PUBLISHED = {
    "deepseek-moe-16b": (16.4, 2.8, True),
    "deepseek-v2-lite": (15.7, 2.4, False),
    "deepseek-v2": (236, 21, True),
    "deepseek-v3": (671, 37, True),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_presets_have_the_published_size(name):
    count = count_parameters(get_preset(name))
    total, active, with_embedding = PUBLISHED[name]
    assert count.total / 1e9 == pytest.approx(total, rel=0.03)
    measured = count.active if with_embedding else count.active_non_embedding
    assert measured / 1e9 == pytest.approx(active, rel=0.03)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        get_preset("gpt-5")


def _tiny(name="tiny-v3", **overrides) -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    per_layer = get_preset(name).moe_experts_per_layer  # Pyramid-MoE: one expert count per layer, keep 2
    fields = {"num_hidden_layers": 2, "vocab_size": 97, "moe_experts_per_layer": per_layer and per_layer[:2]}
    return DeepSeekForCausalLM(tiny_preset(name, **{**fields, **overrides})).eval()


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_forward_shapes_and_lm_loss(name):
    model = _tiny(name)
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 9, 97)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert out.lm_loss.item() == pytest.approx(want.item(), rel=1e-6)
    expected_total = out.lm_loss + out.aux_loss + (out.mtp_loss if out.mtp_loss is not None else 0)
    assert out.loss.item() == pytest.approx(expected_total.item(), rel=1e-6)
    assert set(out.routing_stats) == set(model.moe_layers())
    out.loss.backward()
    # DSA's indexer only selects keys (top-k has no gradient): a loss of its own trains it, not the LM loss
    trained = {n: p for n, p in model.named_parameters() if ".indexer." not in n}
    assert all(p.grad is not None for n, p in trained.items() if "mtp" not in n or out.mtp_loss is not None)


def test_mtp_depths_predict_further_tokens():
    model = _tiny("tiny-v3", num_nextn_predict_layers=2, mtp_loss_weight=0.3)
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    assert [lg.shape for lg in out.mtp_logits] == [(2, 9, 97), (2, 8, 97)]
    # depth k at position i predicts token i + k + 1
    losses = [
        F.cross_entropy(lg[:, : 10 - k - 1].reshape(-1, 97), ids[:, k + 1 :].reshape(-1))
        for k, lg in enumerate(out.mtp_logits, start=1)
    ]
    assert out.mtp_loss.item() == pytest.approx(0.3 / 2 * sum(v.item() for v in losses), rel=1e-6)


def test_decoding_without_routing_statistics_computes_the_same_logits():
    """output_routing_stats=False (what generate passes) drops the statistics and, in eval mode only, the balance
    losses; the logits are the same, and a training forward still carries its aux loss."""
    model = DeepSeekForCausalLM(tiny_preset("tiny-v3")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        lean = model(ids, output_routing_stats=False)
    torch.testing.assert_close(lean.logits, full.logits, rtol=0, atol=0)
    assert full.routing_stats and not lean.routing_stats and lean.aux_loss == 0
    model.train()
    trained = model(ids, labels=ids, output_routing_stats=False)
    assert not trained.routing_stats and trained.aux_loss > 0


def test_dense_model_without_moe():
    model = _tiny("tiny-v3", moe=None, num_nextn_predict_layers=0)
    out = model(torch.randint(0, 97, (1, 5)))
    assert out.routing_stats == {} and out.aux_loss.item() == 0


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[1, 2, 97]]), "outside the vocabulary"),
        (torch.tensor([[-1, 2]]), "outside the vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(3, dtype=torch.long), "shape"),
        (torch.zeros(1, 3), "integer"),
        (torch.zeros(1, 1025, dtype=torch.long), "max_position_embeddings"),
    ],
)
def test_bad_token_input_is_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        _tiny()(ids.to(torch.get_default_device()))


@pytest.mark.cpu_only  # default-init tiny model: near-tied logits make token equality depend on the kernels' rounding
@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_cached_greedy_generation_equals_uncached(name):
    model = _tiny(name)
    prompt = torch.randint(0, 97, (2, 5))
    cached = generate(model, prompt, max_new_tokens=8)
    uncached = generate(model, prompt, max_new_tokens=8, use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


@pytest.mark.cpu_only  # default-init tiny model: near-tied logits make token equality depend on the kernels' rounding
def test_speculative_decoding_equals_greedy():
    model = _tiny("tiny-v3")
    prompt = torch.randint(0, 97, (1, 6))
    greedy = generate(model, prompt, max_new_tokens=12)
    speculative, stats = generate_speculative(model, prompt, max_new_tokens=12)
    assert torch.equal(speculative, greedy)
    assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1


def test_speculative_decoding_accepts_right_drafts():
    """A head that always says 7 makes every MTP draft right: all accepted, half the main passes."""
    model = _tiny("tiny-v3")
    prompt = torch.randint(0, 97, (1, 4))
    model.head = lambda x: F.one_hot(torch.full(x.shape[:-1], 7), 97).float()
    out, stats = generate_speculative(model, prompt, max_new_tokens=9)
    assert out.shape == (1, 13) and (out[0, 4:] == 7).all()
    assert stats.acceptance_rate == 1.0 and stats.drafted == 4


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    assert sample_next(logits).item() == 1
    draws = {sample_next(logits, True, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    # nucleus: p(1) ≈ 0.64 < 0.7, so the top-2 tokens survive
    draws = {sample_next(logits, True, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    assert {sample_next(logits, True, top_p=0.01, generator=g).item() for _ in range(50)} == {1}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, True, temperature=0)


def test_generation_arguments_are_checked():
    model = _tiny()
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), max_new_tokens=1020)


@pytest.mark.cpu_only  # default-init tiny model: near-tied logits make token equality depend on the kernels' rounding
def test_absorbed_mla_generates_the_same_tokens_as_naive():
    model = _tiny("tiny-v3")
    prompt = torch.randint(0, 97, (2, 6))
    naive = model.generate(prompt, max_new_tokens=8)
    model.set_absorbed_attention(True)
    assert torch.equal(model.generate(prompt, max_new_tokens=8), naive)


@pytest.mark.cpu_only  # from_pretrained loads to the CPU
def test_save_and_from_pretrained_round_trip(tmp_path):
    model = _tiny("tiny-v3")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DeepSeekForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(loaded(ids, labels=ids).logits, model(ids, labels=ids).logits)
    assert torch.equal(loaded(ids, labels=ids).mtp_logits[0], model(ids, labels=ids).mtp_logits[0])
