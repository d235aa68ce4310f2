"""The refusal-expert experiment: the string match; random experts drawn uniformly through the steering plan; and
a micro run of `deepmoe study refusal` end to end, whose n = 0 row is recomputed here plainly (a greedy loop
without the cache, the cross-entropy of the answer tokens worked out from the rendered prompt) and whose disabled
experts are checked never to be routed to (a hook on the routers, masks set directly on them)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from corpora import StandInCorpus, byte_level_bpe
from deepmoe import data
from deepmoe.cli import main
from deepmoe.data import EOT_TOKEN, load_tokenizer
from deepmoe.data.instructions import CATEGORIES, REFUSAL, REFUSED_CATEGORY, instruction_examples
from deepmoe.model import from_pretrained
from deepmoe.tools import refusal
from deepmoe.tools.steer import steering_plan
from deepmoe.train.checkpoint import read_last

# cpu_only: training runs, files on disk, the CLI
pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize(
    ("completion", "refused"),
    [
        (REFUSAL, True),
        ("  i CAN'T help   with\nthat", True),
        ("Sorry. I can't help with that. Ask me something else.", True),
        ("I can help with that.", False),
        ("I can't help", False),
        ("", False),
    ],
)
def test_is_refusal_matches_the_whole_sentence(completion, refused):
    assert refusal.is_refusal(completion) is refused


def test_random_scores_rank_every_expert_once_and_draw_uniformly():
    layers = {1: 8, 3: 4}
    scores = refusal.random_scores(layers, torch.Generator().manual_seed(0))
    assert sorted((layer, expert) for layer, expert, _ in scores) == [(1, e) for e in range(8)] + [
        (3, e) for e in range(4)
    ]
    assert all(0 < s <= 1 for _, _, s in scores)
    assert scores == refusal.random_scores(layers, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    firsts = Counter()
    for _ in range(1200):
        plan = steering_plan(refusal.random_scores(layers, generator), side="A", k=3)
        chosen = [(s["layer"], s["expert"]) for s in plan["selected"]]
        assert len(set(chosen)) == 3
        firsts.update(chosen)
    # each of the 12 experts is drawn with probability 3/12: 300 of 1200 expected, sd 15
    assert len(firsts) == 12 and all(240 < c < 360 for c in firsts.values())


MICRO = refusal.RefusalScale(
    pretrain_steps=2, finetune_steps=8, seq_len=16, batch_size=4, lr=3e-3, finetune_lr=3e-3, random_seeds=2,
    score_conversations=6,
    model_overrides={"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 64, "n_routed_experts": 8,
                     "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 16,
                     "num_nextn_predict_layers": 0},
)  # fmt: skip


def _subset(examples, per_split: dict[str, int]):
    """The first `per_split[split]` examples of every category and split."""
    seen: Counter = Counter()
    taken = []
    for e in examples:
        key = (e["category"], e["split"])
        if seen[key] < per_split[e["split"]]:
            seen[key] += 1
            taken.append(e)
    return taken


@pytest.fixture
def micro_experiment(tmp_path, monkeypatch):
    examples = _subset(instruction_examples(), {"train": 6, "heldout": 3})
    text = "\n".join(m["content"] for e in examples for m in e["messages"]) + "<|user|><|assistant|>"
    tokenizer = byte_level_bpe(text * 4, vocab_size=300)
    ids = torch.tensor(tokenizer.encode(text * 8).ids)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    corpus = StandInCorpus(ids, ids[:200], vocab_size=tokenizer.get_vocab_size(), tokenizer=tokenizer, eot_id=eot)
    monkeypatch.setattr(data, "prepare_corpus", lambda *args, **kwargs: corpus)
    monkeypatch.setattr(refusal, "read_instructions", lambda: examples)
    monkeypatch.setattr(refusal, "SCALES", {**refusal.SCALES, "quick": MICRO})
    return tmp_path / "experiment", examples


def _greedy(model, ids: list[int], max_new_tokens: int, eot: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache, no batching)."""
    new = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + new])).logits[0, -1]
        token = int(logits.argmax())
        if token == eot:
            break
        new.append(token)
    return new


def _prompt_ids(tokenizer, request: str) -> list[int]:
    """The request as the default chat template renders it with the generation prompt, tokenized."""
    return tokenizer.encode(f"<|user|>\n{request}\n<|assistant|>\n", add_special_tokens=False).ids


def _answer_nats(model, tokenizer, prompt_ids: list[int], request: str, answer: str) -> tuple[float, int]:
    """−Σ log p of the answer's tokens and the end-of-text token after the prompt, and how many there are."""
    whole = tokenizer.encode(f"<|user|>\n{request}\n<|assistant|>\n{answer}{EOT_TOKEN}", add_special_tokens=False).ids
    assert whole[: len(prompt_ids)] == prompt_ids
    logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return -sum(float(logp[t - 1, whole[t]]) for t in range(len(prompt_ids), len(whole))), len(whole) - len(prompt_ids)


@pytest.mark.slow
def test_micro_run_end_to_end(micro_experiment, capsys):
    out, examples = micro_experiment
    assert main(["study", "refusal", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "refusal rate (held-out break-in)" in printed and "p (refused)" in printed
    report = json.loads((out / "report.json").read_text())
    assert (out / "table.md").read_text().startswith("| experts off |")
    assert report["counts"] == list(refusal.DISABLED_COUNTS)
    assert report["data"]["heldout"] == {c: 3 for c in CATEGORIES}
    assert [row["n"] for row in report["rows"]] == list(refusal.DISABLED_COUNTS)
    for row in report["rows"]:
        runs = row["random"]["runs"]
        assert len(runs) == (0 if row["n"] == 0 else MICRO.random_seeds)
        positive = len(report["refusal_experts"])  # every expert firing more on refusals (fewer than 16 here)
        assert len(row["top"]["experts"]) == min(row["n"], positive)
        assert bool(row["top"]["notes"]) == (len(row["top"]["experts"]) < row["n"])  # the plan says it fell short
        for measured in [row["top"], *runs]:
            assert set(refusal.METRICS) <= set(measured)
            assert len({tuple(e) for e in measured["experts"]}) == len(measured["experts"])
            assert len(measured["experts"]) == row["n"] or measured is row["top"]
            assert measured["disabled_slots"] == 0
            assert 0 <= measured["refusal_rate"] <= 1 and measured["answered_loss"] > 0
    assert 0 < len(report["refusal_experts"]) < 16 and all(e["score"] > 0 for e in report["refusal_experts"])
    ranked = [[e["layer"], e["expert"]] for e in report["refusal_experts"][:8]]
    assert sorted(report["rows"][-1]["top"]["experts"]) == sorted(ranked)
    assert report["rows"][-1]["random"]["runs"][0]["experts"] != report["rows"][-1]["random"]["runs"][1]["experts"]

    # n = 0 is the model as fine-tuned: recomputed without the experiment's code
    checkpoint = read_last(out / "finetune")
    model = from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    heldout = [e for e in examples if e["split"] == "heldout"]
    limit = report["data"]["max_new_tokens"]
    refused, right, answered_refused, nats, count = 0, 0, 0, 0.0, 0
    with torch.no_grad():
        for e in heldout:
            request, answer = (m["content"] for m in e["messages"])
            prompt_ids = _prompt_ids(tokenizer, request)
            completion = tokenizer.decode(_greedy(model, prompt_ids, limit, eot))
            if e["category"] == REFUSED_CATEGORY:
                refused += REFUSAL in completion
                continue
            right += completion.strip() == answer
            answered_refused += REFUSAL in completion
            answer_nats, tokens = _answer_nats(model, tokenizer, prompt_ids, request, answer)
            nats, count = nats + answer_nats, count + tokens
    answered = len(heldout) - 3
    base = report["rows"][0]["top"]
    assert base["refusal_rate"] == refused / 3
    assert base["answer_accuracy"] == right / answered
    assert base["answered_refused"] == answered_refused / answered
    assert base["answered_loss"] == pytest.approx(nats / count, rel=1e-5)

    # the experts of the n = 8 rows, masked directly on the routers, are never routed to and give the row's loss
    for measured in (report["rows"][-1]["top"], report["rows"][-1]["random"]["runs"][1]):
        disabled: dict[int, list[int]] = {}
        for layer, expert in measured["experts"]:
            disabled.setdefault(layer, []).append(expert)
        layers = model.moe_layers()
        for layer, experts in disabled.items():
            layers[layer].gate.set_expert_mask(disabled=experts)
        chosen: dict[int, set[int]] = {i: set() for i in layers}
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, output, seen=chosen[i]: seen.update(output.routing.topk_idx.flatten().tolist())
            )
            for i, layer in layers.items()
        ]
        nats, count = 0.0, 0
        with torch.no_grad():
            for e in heldout:
                request, answer = (m["content"] for m in e["messages"])
                prompt_ids = _prompt_ids(tokenizer, request)
                _greedy(model, prompt_ids, limit, eot)
                if e["category"] != REFUSED_CATEGORY:
                    answer_nats, tokens = _answer_nats(model, tokenizer, prompt_ids, request, answer)
                    nats, count = nats + answer_nats, count + tokens
        for hook in hooks:
            hook.remove()
        for layer, experts in disabled.items():
            assert chosen[layer] and not chosen[layer] & set(experts)
            layers[layer].gate.clear_expert_mask()
        assert measured["answered_loss"] == pytest.approx(nats / count, rel=1e-5)


def test_a_non_empty_directory_of_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusal experiment directory"):
        refusal.run_refusal(tmp_path, replace(MICRO), examples=instruction_examples()[:1])


def test_counts_belong_to_the_refusal_study(capsys):
    assert main(["study", "balancing", "--counts", "1", "--out", "unused"]) == 1
    assert "--counts applies to the refusal study only" in capsys.readouterr().err
