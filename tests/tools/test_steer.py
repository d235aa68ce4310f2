"""SteerMoE-style steering: scores against hand-computed examples, plan limits, masks on real routing."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, get_preset
from deepmoe.cli.steer import add_arguments, run
from deepmoe.evaluate import heldout_loss
from deepmoe.io.files import write_json
from deepmoe.moe.router import Router
from deepmoe.tools.routing import LayerRouting, collect_routing
from deepmoe.tools.steer import (
    activation_frequencies,
    load_pairs,
    score_experts,
    steering_effect,
    steering_plan,
)
from deepmoe.tools.steering_file import apply_steering, clear_steering

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only


def _routing(tokens: int, counts: list[int], gates: list[float]) -> LayerRouting:
    n = len(counts)
    return LayerRouting(
        tokens,
        torch.tensor(counts, dtype=torch.long),
        torch.tensor(gates, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, n, dtype=torch.long),
        None,
    )


# Two layers of 4 experts; A has 8 tokens, B 16 (binary fractions, so every score below is exact).
ROUTING_A = {1: _routing(8, [6, 2, 0, 0], [3.0, 1.0, 0.0, 0.0]), 2: _routing(8, [1, 3, 2, 2], [0.5, 1.5, 1.0, 1.0])}
ROUTING_B = {1: _routing(16, [2, 2, 4, 8], [1.0, 1.0, 2.0, 4.0]), 2: _routing(16, [8, 2, 5, 1], [4.0, 1.0, 2.5, 0.5])}


def test_risk_difference_matches_a_hand_computed_example():
    # p_A(1) = [6, 2, 0, 0]/8 = [.75, .25, 0, 0], p_B(1) = [2, 2, 4, 8]/16 = [.125, .125, .25, .5]
    # p_A(2) = [1, 3, 2, 2]/8 = [.125, .375, .25, .25], p_B(2) = [8, 2, 5, 1]/16 = [.5, .125, .3125, .0625]
    assert activation_frequencies(ROUTING_A) == {1: [0.75, 0.25, 0.0, 0.0], 2: [0.125, 0.375, 0.25, 0.25]}
    want = {
        (1, 0): 0.625,
        (1, 1): 0.125,
        (1, 2): -0.25,
        (1, 3): -0.5,
        (2, 0): -0.375,
        (2, 1): 0.25,
        (2, 2): -0.0625,
        (2, 3): 0.1875,
    }
    by_abs = score_experts(ROUTING_A, ROUTING_B)
    assert {(layer, expert): s for layer, expert, s in by_abs} == want
    # |score| descending; the tie at .25 goes to the lower layer
    assert [(la, e) for la, e, _ in by_abs] == [(1, 0), (1, 3), (2, 0), (1, 2), (2, 1), (2, 3), (1, 1), (2, 2)]
    by_a = score_experts(ROUTING_A, ROUTING_B, order="A")
    assert [s for *_, s in by_a] == [0.625, 0.25, 0.1875, 0.125, -0.0625, -0.25, -0.375, -0.5]
    by_b = score_experts(ROUTING_A, ROUTING_B, order="b")
    assert [(la, e) for la, e, _ in by_b[:3]] == [(1, 3), (2, 0), (1, 2)]


def test_gate_score_matches_a_hand_computed_example():
    # ḡ_A(1) = [3, 1, 0, 0]/8, ḡ_B(1) = [1, 1, 2, 4]/16; ḡ_A(2) = [.5, 1.5, 1, 1]/8, ḡ_B(2) = [4, 1, 2.5, .5]/16
    got = {(la, e): s for la, e, s in score_experts(ROUTING_A, ROUTING_B, method="gate")}
    assert got == {
        (1, 0): 0.3125,
        (1, 1): 0.0625,
        (1, 2): -0.125,
        (1, 3): -0.25,
        (2, 0): -0.1875,
        (2, 1): 0.125,
        (2, 2): -0.03125,
        (2, 3): 0.09375,
    }
    with pytest.raises(ValueError, match="unknown scoring method"):
        score_experts(ROUTING_A, ROUTING_B, method="entropy")
    with pytest.raises(ValueError, match="different MoE layers"):
        score_experts(ROUTING_A, {1: ROUTING_B[1]})


def test_plan_takes_one_side_in_rank_order_and_is_json():
    scores = score_experts(ROUTING_A, ROUTING_B)
    plan = steering_plan(scores, side="A", k=3)
    assert plan["layers"] == {"1": [0], "2": [1, 3]}
    assert [(s["layer"], s["expert"]) for s in plan["selected"]] == [(1, 0), (2, 1), (2, 3)]
    assert json.loads(json.dumps(plan)) == plan
    # per layer; only experts of B's sign count, so layer 1 has just 2 and layer 2 just 2
    plan_b = steering_plan(scores, side="B", k=3, per_layer=True, action="force")
    assert plan_b["layers"] == {"1": [2, 3], "2": [0, 2]}
    assert any("fewer than 3" in note for note in plan_b["notes"])
    assert steering_plan(scores, side="A", k=0)["layers"] == {}
    with pytest.raises(ValueError, match="action"):
        steering_plan(scores, action="mute")


def test_plan_respects_the_routers_limits():
    moe = get_preset("tiny-v3").moe  # 16 experts in 4 groups of 4, top-2 groups, K = 4, noaux_tc
    scores = [(1, e, (16 - e) / 100) for e in range(16)] + [(2, e, (e + 1) / 1000) for e in range(16)]

    forced = steering_plan(scores, k=16, per_layer=True, action="force", config=moe)
    assert forced["layers"] == {"1": [0, 1, 2, 3], "2": [12, 13, 14, 15]}
    assert len(forced["dropped"]) == 24 and not forced["skipped"]
    assert all("num_experts_per_tok=4" in s["reason"] for s in forced["dropped"])

    disabled = steering_plan(scores, k=16, per_layer=True, action="disable", config=moe)
    for layer in ("1", "2"):
        off = disabled["layers"][layer]
        assert 4 <= len(off) < 16
        router = Router(moe)
        router.set_expert_mask(disabled=off)  # the plan is accepted as a whole
        for skip in (s for s in disabled["skipped"] if s["layer"] == int(layer)):
            with pytest.raises(ValueError, match="reachable"):
                router.set_expert_mask(disabled=[*off, skip["expert"]])
    assert disabled["skipped"] and any("skipped" in note for note in disabled["notes"])

    # global k goes by rank over layers: layer 1's scores are all larger than layer 2's, so the top 6 are all
    # layer 1's; it forces 4 and drops 2 (SteerMoE), or, with full_layer="next", layer 2's best two take their place
    top6 = steering_plan(scores, k=6, action="force", config=moe)
    assert top6["layers"] == {"1": [0, 1, 2, 3]} and [d["expert"] for d in top6["dropped"]] == [4, 5]
    assert any("dropped" in note for note in top6["notes"]) and top6["full_layer"] == "drop"
    refilled = steering_plan(scores, k=6, action="force", config=moe, full_layer="next")
    assert refilled["layers"] == {"1": [0, 1, 2, 3], "2": [14, 15]} and not refilled["dropped"]
    with pytest.raises(ValueError, match="full_layer"):
        steering_plan(scores, action="force", full_layer="spill")


def _steermoe_force(scores: list[tuple[int, int, float]], k: int, experts_per_tok: int) -> dict[str, list[int]]:
    """SteerMoE's forcing (adobe-research/SteerMoE, src/utils.py `steer_moe`) written out plainly for side A:
    rank by risk difference (here: descending, ties by layer, then expert), keep the positive ones, take the
    first k of them, then force each in turn only while its layer forces fewer than num_experts_per_tok."""
    positive = sorted((s for s in scores if s[2] > 0), key=lambda s: (-s[2], s[0], s[1]))
    forced: dict[int, list[int]] = {}
    for layer, expert, _ in positive[:k]:
        if len(forced.get(layer, [])) < experts_per_tok:
            forced.setdefault(layer, []).append(expert)
    return {str(layer): sorted(experts) for layer, experts in sorted(forced.items())}


# Three layers of 16 experts, binary-fraction scores, ranks interleaved across layers; ties within layer 3 and
# across layers 1/2; negative scores (side B) in between that side A never takes.
STEER_SCORES = (
    [(1, e, (40 - 2 * e) / 64) for e in range(7)]  # 40/64, 38/64, ..., 28/64
    + [(2, e, (39 - 4 * e) / 64) for e in range(5)]  # 39/64, 35/64, ..., 23/64
    + [(3, e, 32 / 64) for e in range(6)]  # six ties at 32/64
    + [(2, 5, 38 / 64), (1, 9, -50 / 64), (3, 9, -1 / 64), (2, 9, 1 / 64)]
)


@pytest.mark.parametrize("k", [0, 1, 3, 5, 6, 8, 10, 12, 14, 16, 20, 30])
def test_force_drops_candidates_of_full_layers_as_steermoe(k):
    moe = get_preset("tiny-v3").moe  # K = 4
    plan = steering_plan(STEER_SCORES, side="A", k=k, action="force", config=moe)
    assert plan["layers"] == _steermoe_force(STEER_SCORES, k, moe.num_experts_per_tok)
    positives = sum(s[2] > 0 for s in STEER_SCORES)
    assert len(plan["selected"]) + len(plan["dropped"]) == min(k, positives)  # dropped ones count toward k
    for experts in plan["layers"].values():
        Router(moe).set_expert_mask(forced=experts)  # each layer's mask is one the router accepts


def test_steermoe_reference_by_hand():
    # the ranking: (1,0) 40, (2,0) 39, (1,1) 38, (2,5) 38, (1,2) 36, (2,1) 35, (1,3) 34, (1,4) 32, (3,0..5) 32, ...
    assert _steermoe_force(STEER_SCORES, 6, 4) == {"1": [0, 1, 2], "2": [0, 1, 5]}
    # (1,4) is layer 1's fifth: dropped; then the layer-3 ties in index order, until k = 10 runs out
    assert _steermoe_force(STEER_SCORES, 10, 4) == {"1": [0, 1, 2, 3], "2": [0, 1, 5], "3": [0, 1]}
    moe = get_preset("tiny-v3").moe
    plan = steering_plan(STEER_SCORES, k=10, action="force", config=moe)
    assert [(d["layer"], d["expert"]) for d in plan["dropped"]] == [(1, 4)]
    # the deepmoe option takes the next-ranked expert instead: 10 forced
    refill = steering_plan(STEER_SCORES, k=10, action="force", config=moe, full_layer="next")
    assert refill["layers"] == {"1": [0, 1, 2, 3], "2": [0, 1, 5], "3": [0, 1, 2]}


def _model(seed: int = 0) -> DeepSeekForCausalLM:
    config = DeepSeekConfig.from_dict({**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 3, "vocab_size": 50})
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(config).eval()


def _two_sources():
    g = torch.Generator().manual_seed(1)
    a = [torch.randint(0, 25, (2, 16), generator=g) for _ in range(2)]
    b = [torch.randint(25, 50, (2, 16), generator=g) for _ in range(2)]
    return a, b


def test_apply_steering_masks_real_routing_and_clear_restores(tmp_path):
    model = _model()
    a, b = _two_sources()
    batches = a + b
    before = collect_routing(model, batches)
    scores = score_experts(collect_routing(model, a), collect_routing(model, b))
    for layer in (1, 2):  # Σ_i p(i) = K on both sides, so the scores of a layer sum to 0
        assert abs(sum(s for la, _, s in scores if la == layer)) < 1e-9

    off = steering_plan(scores, side="A", k=3, per_layer=True, config=model)
    path = write_json(tmp_path / "steer.json", off)
    applied = apply_steering(model, path)
    assert applied == {int(la): e for la, e in off["layers"].items()} and len(applied[1]) == 3
    routing = collect_routing(model, batches)
    for layer, experts in applied.items():
        assert routing[layer].counts[experts].sum() == 0
        assert routing[layer].counts.sum() == routing[layer].tokens * 4

    on = steering_plan(scores, side="B", k=2, per_layer=True, action="force", config=model)
    applied = apply_steering(model, on)  # replaces the earlier mask
    routing = collect_routing(model, batches)
    for layer, experts in applied.items():
        assert len(experts) == 2
        assert (routing[layer].counts[experts] == routing[layer].tokens).all()

    clear_steering(model)
    after = collect_routing(model, batches)
    assert all(torch.equal(after[la].counts, before[la].counts) for la in before)


def test_apply_steering_refuses_bad_plans_and_leaves_no_mask(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match=r"layers \[0\].*MoE layers are \[1, 2, 3\]"):
        apply_steering(model, {"action": "disable", "layers": {"0": [1]}})
    with pytest.raises(ValueError, match="steering layer 2: 5 forced experts exceed"):
        apply_steering(model, {"action": "force", "layers": {"1": [0], "2": [0, 1, 2, 3, 4]}})
    assert not any(layer.gate.has_expert_mask for layer in model.moe_layers().values())
    with pytest.raises(ValueError, match="version 2"):
        apply_steering(model, {"version": 2, "action": "force", "layers": {}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        apply_steering(model, bad)


def test_steering_effect_rows_and_masks_restored():
    model = _model()
    a, b = _two_sources()
    scores = score_experts(collect_routing(model, a), collect_routing(model, b))
    model.moe_layers()[3].gate.set_expert_mask(disabled=[0])  # a mask of the caller's, kept
    base = (heldout_loss(model, a), heldout_loss(model, b))
    rows = steering_effect(model, a, b, scores, ks=(0, 2, 4), per_layer=True)
    assert [r["k"] for r in rows] == [0, 2, 4] and [r["experts"] for r in rows] == [0, 4, 8]
    assert rows[0]["delta_a"] == rows[0]["delta_b"] == 0
    assert rows[2]["per_layer"] == {"1": 4, "2": 4}
    assert rows[2]["loss_a"] != rows[0]["loss_a"]
    assert model.moe_layers()[3].gate.disabled_experts.nonzero().flatten().tolist() == [0]
    assert not model.moe_layers()[1].gate.has_expert_mask
    assert (heldout_loss(model, a), heldout_loss(model, b)) == base


def test_pairs_parse_and_a_bad_line_is_named(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"a": "to be", "b": "def f():"}\n\n{"a": "or not", "b": "return 1"}\n')
    assert load_pairs(good) == (["to be", "or not"], ["def f():", "return 1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "to be", "b": "x = 1"}\n\n{"a": "or not"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl, line 3: expected an object with text fields "a" and "b"'):
        load_pairs(bad)
    bad.write_text('{"a": "to be", "b": "x = 1"}\n{"a": "or not", "b": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_pairs(bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from deepmoe.data import TextSource, get_tokenizer

    path = tmp_path_factory.mktemp("ckpt")
    texts = [TextSource("e", "english", "to be or not to be, that is the question " * 20)]
    texts.append(TextSource("c", "code", "def f(x):\n    return x + 1\n" * 20))
    tokenizer = get_tokenizer(texts, 300, cache_dir=path / "cache")
    tokenizer.save(str(path / "tokenizer.json"))
    config = DeepSeekConfig.from_dict({**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 3, "vocab_size": 300})
    torch.manual_seed(0)
    DeepSeekForCausalLM(config).save_pretrained(path)
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_steer_with_pairs_and_with_sources(checkpoint, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"a": f"to be or not to be {i}", "b": f"def f(x):\n    return x + {i}"} for i in range(6)]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "steer.json"
    args = _args(str(checkpoint), "--pairs", str(pairs), "--out", str(out), "--top", "2", "--per-layer", "--effect")
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "Top A experts" in printed and "Held-out mean token loss" in printed
    plan = json.loads(out.read_text())
    assert plan["action"] == "disable" and plan["inputs"]["score_pairs"] == 3
    assert all(len(e) <= 2 for e in plan["layers"].values())
    assert [r["k"] for r in plan["effect"]["A"]] == [0, 1, 2, 4, 8]
    model = _model()
    assert apply_steering(model, out) == {int(la): e for la, e in plan["layers"].items()}

    (tmp_path / "a.txt").write_text("to be or not to be, that is the question\n" * 8)
    (tmp_path / "b.txt").write_text("def f(x):\n    return x + 1\n" * 8)
    args = _args(
        str(checkpoint), "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "b.txt"), "--out", str(out),
        "--side", "b", "--action", "force", "--top", "3", "--seq-len", "16",
    )  # fmt: skip
    assert run(args) == 0
    plan = json.loads(out.read_text())
    assert plan["side"] == "B" and plan["action"] == "force" and len(plan["selected"]) <= 3
    assert plan["full_layer"] == "drop" and len(plan["selected"]) + len(plan["dropped"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "pairs.jsonl", "steer.json"]  # replaced
    with pytest.raises(ValueError, match="give both --a SRC and --b SRC"):
        run(_args(str(checkpoint), "--a", "x.txt", "--out", str(out)))


def test_steer_out_never_overwrites_a_file_it_did_not_write(tmp_path):
    from deepmoe.tools.steering_file import check_steering_target

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"a": "to be", "b": "def f():"}\n')
    targets = {
        "notes.txt": b"my notes\n",
        "config.json": b'{"hidden_size": 128}\n',
        "broken.json": b'{"format": "deepmoe-steering", ',
        "binary.bin": b"\xff\xfe\x00",
        "other.json": b'{"format": "deepmoe-steering", "action": "mute", "layers": {}}',
        "handmade.json": b'{"action": "disable", "layers": {"1": [0]}}',  # readable, but not written by steer
    }
    for name, data in targets.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()
    for name in [*targets, "folder"]:
        target = tmp_path / name
        # refused before any work: the model path does not even exist
        with pytest.raises(ValueError, match=rf"--out {target}: exists and is not a steering file") as error:
            run(_args(str(tmp_path / "nowhere"), "--pairs", str(pairs), "--out", str(target)))
        assert "refusing to overwrite" in str(error.value)
    for name, data in targets.items():
        assert (tmp_path / name).read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*targets, "folder", "pairs.jsonl"])
    with pytest.raises(ValueError, match="does not exist"):
        check_steering_target(tmp_path / "missing" / "steer.json")
    check_steering_target(tmp_path / "new.json")  # a new file is fine
    ours = steering_plan(STEER_SCORES, k=2)
    write_json(tmp_path / "ours.json", ours)
    check_steering_target(tmp_path / "ours.json")  # a steering file may be replaced


def test_steer_and_generate_with_mmap_give_what_they_give_without(checkpoint, tmp_path, capsys):
    """--mmap (weights memory-mapped, each layer's experts built when it runs): the same steering file (plan,
    frequencies, effect) and, with it applied, the same generated ids as the ordinary load."""
    from deepmoe.cli import main

    pairs = tmp_path / "pairs.jsonl"
    lines = [{"a": f"to be or not to be {i}", "b": f"def f(x):\n    return x + {i}"} for i in range(6)]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plans = {}
    for name, extra in (("plain", []), ("mapped", ["--mmap"])):
        out = tmp_path / f"{name}.json"
        argv = [str(checkpoint), "--pairs", str(pairs), "--out", str(out), "--top", "2", "--effect", "--device", "cpu"]
        assert run(_args(*argv, *extra)) == 0
        plans[name] = json.loads(out.read_text())
    assert plans["mapped"]["layers"] == plans["plain"]["layers"]
    assert plans["mapped"]["frequencies"] == plans["plain"]["frequencies"]
    assert plans["mapped"]["effect"] == plans["plain"]["effect"]
    capsys.readouterr()
    generated = []
    for extra in ([], ["--mmap"]):
        argv = ["generate", str(checkpoint), "--ids", "5", "6", "7", "--max-new-tokens", "6", "--no-eos", "--steer",
                str(tmp_path / "plain.json"), *extra]  # fmt: skip
        assert main(argv) == 0
        generated.append(capsys.readouterr().out)
    assert generated[0] == generated[1] and generated[0].strip()
