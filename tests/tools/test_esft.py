"""ESFT (docs/design.md#s3-expert-specialised-fine-tuning): the two expert scores against hand-computed
examples, the selection rule against a plain
reference of the paper's (raw scores against p, no per-layer normalisation),
training that changes only the selected expert slices (bit-identical elsewhere, AdamW weight decay
included), the expert delta (round trip, size, bad files) and the `deepmoe esft` command end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from corpora import byte_level_bpe
from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, get_preset
from deepmoe.cli.esft import add_arguments, run
from deepmoe.io.delta import DELTA_META, DELTA_WEIGHTS, DeltaError, apply_delta, delta_size, load_delta, save_delta
from deepmoe.model import save_pretrained
from deepmoe.tools.esft import (
    esft_finetune,
    expert_scores,
    full_finetune,
    select_experts,
    trainable_parameters,
)
from deepmoe.tools.routing import LayerRouting, collect_routing

VOCAB = 64


# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


def _routing(tokens: int, counts: list[int], gate_sum: list[float]) -> LayerRouting:
    n = len(counts)
    return LayerRouting(
        tokens,
        torch.tensor(counts, dtype=torch.long),
        torch.tensor(gate_sum, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, n, dtype=torch.long),
        None,
    )


# 4 tokens, 4 experts, top-2, the gates of each token scaled by 2.5 (V3's routed scaling factor):
#   t0: e0 0.6, e1 0.4   t1: e0 0.7, e2 0.3   t2: e1 0.5, e3 0.5   t3: e0 0.9, e1 0.1     (× 2.5)
# counts = [3, 3, 1, 1]; Σ_t g = 2.5 · [2.2, 1.0, 0.3, 0.5]
HAND = _routing(4, [3, 3, 1, 1], [2.5 * 2.2, 2.5 * 1.0, 2.5 * 0.3, 2.5 * 0.5])


def test_average_gate_score_by_hand():
    # g_i = (1/T) Σ_t g_i,t = 2.5 · [0.55, 0.25, 0.075, 0.125], raw: ESFT does not normalise it over the layer,
    # so the layer sums to 2.5 (the routed scaling factor), not 1
    scores = expert_scores({1: HAND}, "gate")[1]
    assert scores.dtype == torch.float64
    assert torch.allclose(scores, torch.tensor([1.375, 0.625, 0.1875, 0.3125], dtype=torch.float64), atol=1e-12)
    assert select_experts({1: scores}, 0.9) == {1: [0]}  # 1.375 >= 0.9 (as shares it took [0, 1, 3])
    assert select_experts({1: scores}, 1.5) == {1: [0, 1]}  # p above 1 is reachable with the scaling factor


def test_token_selection_ratio_by_hand():
    # r_i = (tokens choosing i) / (T · K) = [3, 3, 1, 1] / (4 · 2)
    scores = expert_scores({1: HAND}, "token")[1]
    assert torch.equal(scores, torch.tensor([3 / 8, 3 / 8, 1 / 8, 1 / 8], dtype=torch.float64))


def test_scores_of_a_layer_without_tokens_are_zero_and_method_is_checked():
    empty = _routing(0, [0, 0, 0], [0.0, 0.0, 0.0])
    assert torch.equal(expert_scores({2: empty}, "gate")[2], torch.zeros(3, dtype=torch.float64))
    assert select_experts(expert_scores({2: empty}, "token"), 0.5) == {2: [0, 1, 2]}  # total 0 < p: every expert
    with pytest.raises(ValueError, match="method='mean'"):
        expert_scores({1: HAND}, "mean")


def test_scores_from_a_real_routing_pass():
    model = _tiny_model()
    routing = collect_routing(model, [torch.randint(0, VOCAB, (2, 16))])
    scale = model.config.moe.routed_scaling_factor  # 2.5; tiny-v3 normalises the top-K weights, then scales
    for method, total in (("gate", scale), ("token", 1.0)):
        for layer, s in expert_scores(routing, method).items():
            assert s.shape == (16,) and abs(float(s.sum()) - total) < 1e-6, (method, layer)
    k = model.config.moe.num_experts_per_tok
    r = routing[1]
    assert torch.allclose(expert_scores(routing, "token")[1], r.counts.double() / (r.tokens * k))
    assert torch.equal(expert_scores(routing, "gate")[1], r.gate_sum / r.tokens)


@pytest.mark.parametrize(
    ("p", "want"),
    [
        (0.5, [0]),  # 0.55 >= 0.5
        (0.55, [0]),  # reached exactly
        (0.6, [0, 1]),  # 0.55 + 0.25 = 0.8
        (0.8, [0, 1]),
        (0.81, [0, 1, 3]),  # + 0.125 (expert 3 scores above expert 2)
        (0.95, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_select_smallest_set_reaching_p(p, want):
    scores = {1: torch.tensor([0.55, 0.25, 0.075, 0.125], dtype=torch.float64)}
    assert select_experts(scores, p) == {1: want}


def test_select_ties_zero_scores_and_rounding():
    ties = {3: torch.tensor([1 / 8, 3 / 8, 1 / 8, 3 / 8], dtype=torch.float64)}
    assert select_experts(ties, 0.3) == {3: [1]}  # equal scores: the lower index first
    assert select_experts(ties, 0.5) == {3: [1, 3]}
    assert select_experts(ties, 0.8) == {3: [0, 1, 3]}
    zeros = {0: torch.tensor([0.0, 0.5, 0.0, 0.5])}
    assert select_experts(zeros, 1.0) == {0: [1, 3]}  # experts scoring 0 are never needed
    tenths = {0: torch.full((10,), 0.1, dtype=torch.float64)}  # cumulative sums like 0.30000000000000004
    assert [len(select_experts(tenths, p / 10)[0]) for p in range(1, 11)] == list(range(1, 11))
    unnormalised = {0: torch.tensor([2.0, 6.0, 2.0])}  # p is compared with the scores, not shares of the total
    assert select_experts(unnormalised, 0.7) == {0: [1]}
    for bad in (0.0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="p="):
            select_experts(ties, bad)


def _paper_rule(scores: dict[int, list[float]], p: float) -> dict[int, list[int]]:
    """ESFT's selection as the paper and the authors' generate_expert_config.py state it, written out plainly:
    per layer, walk the experts by decreasing score (equal scores: lower index first), adding each while the
    running sum of the raw scores is still below p. A layer whose scores sum to less than p gets them all."""
    selected = {}
    for layer, values in scores.items():
        ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
        running, taken = 0.0, []
        for i in ranked:
            if running >= p:
                break
            taken.append(i)
            running += values[i]
        selected[layer] = sorted(taken)
    return selected


# Binary fractions, so every running sum is exact. Layer 1 is gate-like (sums to 0.4375, like V2-Lite's
# unnormalised top-6 softmax weights), with ties; layer 2 sums to 0.25; layer 3 is a selection ratio (sums to 1);
# layer 4 saw nothing.
PAPER_SCORES = {
    1: [0.125, 0.0625, 0.0625, 0.03125, 0.125, 0.0, 0.03125, 0.0],
    2: [0.0625, 0.0625, 0.0625, 0.0625],
    3: [0.375, 0.125, 0.375, 0.125],
    4: [0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("p", [0.0625, 0.125, 0.2, 0.25, 0.3, 0.4, 0.4375, 0.5, 0.75, 0.8, 1.0, 1.5])
def test_selection_follows_the_papers_rule(p):
    tensors = {layer: torch.tensor(v, dtype=torch.float64) for layer, v in PAPER_SCORES.items()}
    assert select_experts(tensors, p) == _paper_rule(PAPER_SCORES, p)


def test_the_papers_rule_by_hand():
    # the reference itself, checked by hand: ties by lower index, Σ >= p inclusive, a total below p takes all
    assert _paper_rule(PAPER_SCORES, 0.2) == {1: [0, 4], 2: [0, 1, 2, 3], 3: [0], 4: [0, 1, 2]}
    assert _paper_rule(PAPER_SCORES, 0.25) == {1: [0, 4], 2: [0, 1, 2, 3], 3: [0], 4: [0, 1, 2]}
    assert _paper_rule(PAPER_SCORES, 0.3) == {1: [0, 1, 4], 2: [0, 1, 2, 3], 3: [0], 4: [0, 1, 2]}
    assert _paper_rule(PAPER_SCORES, 0.4375) == {1: [0, 1, 2, 3, 4, 6], 2: [0, 1, 2, 3], 3: [0, 2], 4: [0, 1, 2]}
    assert _paper_rule(PAPER_SCORES, 0.5) == {1: list(range(8)), 2: [0, 1, 2, 3], 3: [0, 2], 4: [0, 1, 2]}
    assert _paper_rule(PAPER_SCORES, 0.125)[2] == [0, 1]
    # per-layer shares (the old rule) picked far fewer in the gate-like layer: 0.125 / 0.4375 = 0.29 >= 0.2
    shares = {1: torch.tensor(PAPER_SCORES[1], dtype=torch.float64) / 0.4375}
    assert select_experts(shares, 0.5) == {1: [0, 4]}


def _v2_lite_like_gate(seed: int, tokens: int = 512, experts: int = 64, k: int = 6) -> torch.Tensor:
    """The average gate of a layer like DeepSeek-V2-Lite's: top-6 softmax weights, not normalised, scale 1."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64) + torch.randn(
        experts, generator=g, dtype=torch.float64
    )
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    return torch.zeros(tokens, experts, dtype=torch.float64).scatter(1, index, weights).mean(0)


def test_v2_lite_like_gate_scores_against_p():
    gate = _v2_lite_like_gate(0)
    assert 0.45 < float(gate.sum()) < 0.46  # V2-Lite's published layer sums are 0.26-0.53
    plain = {0: gate.tolist()}
    counts = {p: len(select_experts({0: gate}, p)[0]) for p in (0.1, 0.2, 0.3, 0.5)}
    assert counts == {p: len(_paper_rule(plain, p)[0]) for p in counts}
    assert counts == {0.1: 3, 0.2: 8, 0.3: 14, 0.5: 64}  # 0.5 is more than the layer holds: every expert
    shares = {0: gate / gate.sum()}  # what normalising per layer picked: 1, 2, 5 and 9 experts
    assert [len(select_experts(shares, p)[0]) for p in (0.1, 0.2, 0.3, 0.5)] == [1, 2, 5, 9]


def test_tiny_v3_gate_selection_follows_the_paper():
    model = _tiny_model()
    routing = collect_routing(model, _batches())
    scores = expert_scores(routing, "gate")
    assert set(scores) == {1, 2}
    for layer, s in scores.items():  # the raw average gate: tiny-v3's normalised top-4 weights × 2.5
        assert torch.equal(s, routing[layer].gate_sum / routing[layer].tokens)
        assert abs(float(s.sum()) - 2.5) < 1e-6
    plain = {layer: s.tolist() for layer, s in scores.items()}
    for p in (0.2, 0.5, 1.0, 2.0, 3.0):
        assert select_experts(scores, p) == _paper_rule(plain, p), p
    assert {la: len(e) for la, e in select_experts(scores, 0.2).items()} == {1: 1, 2: 1}
    assert {la: len(e) for la, e in select_experts(scores, 1.0).items()} == {1: 5, 2: 4}
    assert select_experts(scores, 3.0) == {1: list(range(16)), 2: list(range(16))}  # above the 2.5 a layer holds
    normalised = {layer: s / s.sum() for layer, s in scores.items()}  # the old rule picked 2 per layer at 0.2
    assert {la: len(e) for la, e in select_experts(normalised, 0.2).items()} == {1: 2, 2: 2}


# ---- training ------------------------------------------------------------------------------------


def _tiny_config() -> DeepSeekConfig:
    return DeepSeekConfig.from_dict({**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 3, "vocab_size": VOCAB})


def _tiny_model(seed: int = 0) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(_tiny_config()).eval()


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(n)]


SELECTION = {1: [0, 5, 11], 2: [7]}


def _finetuned(selection=SELECTION, weight_decay: float = 0.1):
    model = _tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    esft_finetune(model, selection, _batches(), steps=4, lr=1e-2, weight_decay=weight_decay)
    return model, base


def test_esft_changes_only_the_selected_expert_slices():
    model, base = _finetuned()
    state = model.state_dict()
    assert state.keys() == base.keys()  # the parametrisation is gone again
    fused = {
        f"model.layers.{i}.mlp.experts.{w}": e for i, e in SELECTION.items() for w in ("gate_up_proj", "down_proj")
    }
    changed_rows = 0
    for name, t in state.items():
        if name in fused:
            for j in range(t.shape[0]):
                if j in fused[name]:
                    assert not torch.equal(t[j], base[name][j]), (name, j)
                    changed_rows += 1
                else:
                    assert torch.equal(t[j], base[name][j]), (name, j)  # bit-identical through weight decay
        else:
            assert torch.equal(t, base[name]), name  # attention, router, bias, shared experts, MTP, ...
    assert changed_rows == 2 * 4
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert trainable_parameters(model, SELECTION) == 4 * 3 * 64 * 128


def test_esft_lowers_the_training_loss_and_is_reproducible():
    model, _ = _finetuned()
    again, _ = _finetuned()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    fresh = _tiny_model()
    batch = torch.cat(_batches())
    with torch.no_grad():
        assert model(batch, labels=batch).lm_loss < fresh(batch, labels=batch).lm_loss


def test_esft_rejects_bad_selections_and_leaves_the_model_as_it_was_on_a_failure():
    model = _tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        esft_finetune(model, {0: [1]}, _batches(), steps=1)
    with pytest.raises(ValueError, match="no expert 16"):
        esft_finetune(model, {1: [16]}, _batches(), steps=1)
    with pytest.raises(ValueError, match="no expert"):
        esft_finetune(model, {1: []}, _batches(), steps=1)
    with pytest.raises(ValueError, match="layer 3 is a multi-token-prediction block"):
        esft_finetune(model, {1: [0], 3: [0]}, _batches(), steps=1)
    with pytest.raises(ValueError, match="ran out"):
        esft_finetune(model, {1: [0]}, iter(_batches(1)), steps=2)
    with pytest.raises(ValueError, match="(?i)nan|inf"):
        esft_finetune(model, {1: [0], 2: [3]}, _batches(), steps=3, lr=1e30)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_full_finetune_changes_everything_it_trains():
    model = _tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    full_finetune(model, _batches(), steps=2, lr=1e-3)
    state = model.state_dict()
    assert not torch.equal(
        state["model.layers.0.self_attn.o_proj.weight"], base["model.layers.0.self_attn.o_proj.weight"]
    )
    assert not torch.equal(state["model.layers.1.mlp.gate.weight"], base["model.layers.1.mlp.gate.weight"])


# ---- the delta -----------------------------------------------------------------------------------


def test_delta_round_trip_is_exact_and_small(tmp_path):
    model, base = _finetuned()
    out = save_delta(model, base, tmp_path / "delta", SELECTION, metadata={"method": "gate"})
    loaded = load_delta(out)
    assert loaded["selection"] == SELECTION and loaded["training"] == {"method": "gate"}
    assert sorted(loaded["tensors"]) == sorted(
        f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"
        for i, experts in SELECTION.items()
        for j in experts
        for proj in ("gate_proj", "up_proj", "down_proj")
    )
    assert loaded["tensors"]["model.layers.1.mlp.experts.5.down_proj.weight"].shape == (128, 64)
    restored = _tiny_model()
    apply_delta(restored, out)
    for name, t in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], t), name
    checkpoint = save_pretrained(_tiny_model(), tmp_path / "ckpt")
    full = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    assert delta_size(out) < 0.1 * full
    with pytest.raises(DeltaError, match="not the delta's base"):
        apply_delta(restored, out)  # twice
    other = _tiny_model(seed=5)
    with pytest.raises(DeltaError, match="not the delta's base"):
        apply_delta(other, out)
    apply_delta(other, out, check_base=False)  # on purpose


def test_delta_names_an_mtp_layer_as_on_disk(tmp_path):
    model = _tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.mtp[0].block.mlp.experts.down_proj[2] += 1.0
    save_delta(model, base, tmp_path / "d", {3: [2]})
    assert "model.layers.3.mlp.experts.2.down_proj.weight" in load_delta(tmp_path / "d")["tensors"]
    restored = apply_delta(_tiny_model(), tmp_path / "d")
    assert torch.equal(
        restored.model.mtp[0].block.mlp.experts.down_proj, model.model.mtp[0].block.mlp.experts.down_proj
    )


def test_save_delta_refuses_a_model_changed_outside_the_selection(tmp_path):
    model, base = _finetuned()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] += 1
    with pytest.raises(DeltaError, match="o_proj.weight"):
        save_delta(model, base, tmp_path / "d", SELECTION)
    model, base = _finetuned()
    with pytest.raises(DeltaError, match=r"experts \[0, 5, 11\]"):
        save_delta(model, base, tmp_path / "d", {1: [1], 2: [7]})
    assert not (tmp_path / "d").exists()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(DeltaError, match="not a delta directory"):
        save_delta(model, base, tmp_path / "ckpt", SELECTION)


def _rewrite(directory: Path, change) -> None:
    tensors = load_file(directory / DELTA_WEIGHTS)
    meta = json.loads((directory / DELTA_META).read_text())
    change(tensors, meta)
    save_file(tensors, directory / DELTA_WEIGHTS)
    (directory / DELTA_META).write_text(json.dumps(meta))


def test_bad_deltas_give_clear_errors(tmp_path):
    model, base = _finetuned()
    good = save_delta(model, base, tmp_path / "good", SELECTION)

    def case(name, change, match):
        target = tmp_path / name
        target.mkdir()
        for f in good.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        _rewrite(target, change)
        with pytest.raises(DeltaError, match=match):
            apply_delta(_tiny_model(), target)

    name = "model.layers.1.mlp.experts.5.gate_proj.weight"
    case("shape", lambda t, m: t.__setitem__(name, t[name][:, :-1].contiguous()), r"has shape \[64, 127\].*\[64, 128\]")
    case(
        "unknown",
        lambda t, m: t.__setitem__("model.layers.1.self_attn.o_proj.weight", t[name].clone()),
        "unknown tensor name",
    )
    case(
        "unselected",
        lambda t, m: t.__setitem__("model.layers.1.mlp.experts.6.gate_proj.weight", t[name].clone()),
        "not an expert of the selection",
    )
    case("missing", lambda t, m: t.pop(name), "lacks")
    case("nan", lambda t, m: t[name].__setitem__((0, 0), float("nan")), "NaN")

    def dense_layer(t, m):
        m["selection"]["0"] = [1]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            t[f"model.layers.0.mlp.experts.1.{proj}.weight"] = t[name].clone()

    case("dense", dense_layer, "layer 0 is not an MoE layer")
    case("format", lambda t, m: m.__setitem__("format", "other"), "not a deepmoe delta")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaError, match="has no delta.json"):
        load_delta(tmp_path / "empty")
    with pytest.raises(DeltaError, match="not found"):
        load_delta(tmp_path / "nowhere")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / DELTA_META).write_bytes((good / DELTA_META).read_bytes())
    (tmp_path / "trunc" / DELTA_WEIGHTS).write_bytes((good / DELTA_WEIGHTS).read_bytes()[:100])
    with pytest.raises(DeltaError, match="not a readable safetensors"):
        load_delta(tmp_path / "trunc")
    wider = DeepSeekConfig.from_dict({**_tiny_config().to_dict(), "num_attention_heads": 8})
    with pytest.raises(DeltaError, match="another config.*num_attention_heads"):
        apply_delta(DeepSeekForCausalLM(wider), good)


# ---- the command -----------------------------------------------------------------------------------


def test_esft_command_end_to_end(tmp_path, capsys):
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    (tmp_path / "task.py").write_text(text)
    tokenizer = byte_level_bpe(text)
    config = DeepSeekConfig.from_dict({**_tiny_config().to_dict(), "vocab_size": tokenizer.get_vocab_size()})
    torch.manual_seed(0)
    checkpoint = save_pretrained(DeepSeekForCausalLM(config), tmp_path / "base")
    tokenizer.save(str(checkpoint / "tokenizer.json"))

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "delta").mkdir()  # an empty directory is a fine target
    args = parser.parse_args(
        [str(checkpoint), "--data", str(tmp_path / "task.py"), "--out", str(tmp_path / "delta"), "--steps", "3",
         "--lr", "3e-3", "--seq-len", "32", "--batch-size", "4", "--score-tokens", "512", "--p", "0.3",
         "--device", "cpu", "--compare-full", "--json", "--no-progress"]
    )  # fmt: skip
    assert run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loss_after_esft"] < summary["loss_before"]
    assert summary["delta_bytes"] < summary["checkpoint_bytes"] / 4
    assert 0 < summary["trainable_parameters"] < summary["routed_expert_parameters"]
    assert {"loss_after_full", "selection"} <= set(summary)
    assert all(abs(v - 2.5) < 1e-6 for v in summary["layer_score"].values())  # raw gate: tiny-v3's scaling factor
    assert all(0.3 <= v < 2.5 for v in summary["selected_score"].values())  # p = 0.3 is reached, on the raw scores
    assert load_delta(tmp_path / "delta")["selection"] == {int(k): v for k, v in summary["selection"].items()}

    bad = parser.parse_args([str(checkpoint), "--data", "bundled:nothing", "--out", str(tmp_path / "d2")])
    assert run(bad) == 1
    assert "error: no bundled domain" in capsys.readouterr().err
    assert not (tmp_path / "d2").exists()
    refused = parser.parse_args([str(checkpoint), "--data", str(tmp_path / "task.py"), "--out", str(checkpoint)])
    assert run(refused) == 1
    assert "not a delta directory" in capsys.readouterr().err
    again = parser.parse_args([*argv_again(checkpoint, tmp_path), "--out", str(tmp_path / "delta")])
    assert run(again) == 0  # its own delta directory is replaced
    assert load_delta(tmp_path / "delta")["training"]["steps"] == 1


def argv_again(checkpoint: Path, tmp_path: Path) -> list[str]:
    return [str(checkpoint), "--data", str(tmp_path / "task.py"), "--steps", "1", "--seq-len", "32", "--batch-size",
            "2", "--score-tokens", "128", "--device", "cpu", "--json", "--no-progress"]  # fmt: skip


def test_esft_out_refuses_what_it_did_not_write(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / DELTA_META).write_text('{"format": "something else"}')  # a delta.json, but not ours
    (tmp_path / "file.bin").write_bytes(b"\x00keep")
    for target in (foreign, tmp_path / "fake", tmp_path / "file.bin"):
        # refused before the model is even read (there is none at "nowhere")
        args = parser.parse_args(["nowhere", "--data", "bundled:code", "--out", str(target)])
        assert run(args) == 1
        err = capsys.readouterr().err
        kind = "is not empty and is not a delta directory" if target.is_dir() else "exists and is not a directory"
        assert err.count("\n") == 1 and f"{target}: {kind}" in err
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == [
        "notes.txt"
    ]
    assert (tmp_path / "fake" / DELTA_META).read_text() == '{"format": "something else"}'
    assert (tmp_path / "file.bin").read_bytes() == b"\x00keep"


def test_from_pretrained_applies_a_delta(tmp_path):
    model, base = _finetuned()
    base_model = _tiny_model()
    checkpoint = save_pretrained(base_model, tmp_path / "ckpt")
    delta = save_delta(model, base, tmp_path / "delta", SELECTION)
    loaded = DeepSeekForCausalLM.from_pretrained(checkpoint, delta=delta)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_esft_on_prepared_chat_data_trains_on_the_assistant_tokens(tmp_path):
    """A prepared chat directory made with the model's tokenizer: ESFT scores on its train split, trains on the
    assistant's tokens only (the prompt tokens are -100 labels) and evaluates on its held-out split; data
    prepared with another tokenizer is refused, naming both."""
    from corpora import write_prepared
    from deepmoe.tools.esft import esft

    text = "".join(f"user: add {i} and {i % 9}\nassistant: {i + i % 9}\n" for i in range(300))
    tokenizer = byte_level_bpe(text)
    config = DeepSeekConfig.from_dict({**_tiny_config().to_dict(), "vocab_size": tokenizer.get_vocab_size()})
    torch.manual_seed(0)
    checkpoint = save_pretrained(DeepSeekForCausalLM(config), tmp_path / "base")
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    convs, masks = [], []
    for i in range(40):
        prompt, answer = (
            tokenizer.encode(f"user: add {i} and {i % 9}\nassistant: ").ids,
            tokenizer.encode(f"{i + i % 9}\n").ids,
        )
        convs.append(prompt + answer + [0])
        masks.append([0] * len(prompt) + [1] * (len(answer) + 1))
    chat = write_prepared(tmp_path / "chat", tokenizer, convs[:32], convs[32:], chat=True,
                          masks={"train": masks[:32], "heldout": masks[32:]})  # fmt: skip
    summary = esft(checkpoint, str(chat), tmp_path / "delta", steps=4, lr=3e-3, seq_len=16, batch_size=4,
                   score_tokens=256, device="cpu", p=0.3)  # fmt: skip
    assert summary["loss_after_esft"] < summary["loss_before"]
    assert summary["train_tokens"] == sum(len(c) for c in convs[:32])

    other = write_prepared(tmp_path / "other", byte_level_bpe(text[::-1]), convs[:32], convs[32:], chat=True,
                           masks={"train": masks[:32], "heldout": masks[32:]})  # fmt: skip
    with pytest.raises(ValueError, match="another tokenizer"):
        esft(checkpoint, str(other), tmp_path / "delta2", steps=1, seq_len=16, batch_size=4, device="cpu")
