"""analyze, steer, esft and merge on the tiny-v4 preset (DeepSeek-V4: its first layer hash-routed): hash-routed
layers reported as such, never steered (the router refuses masks there: the table picks the experts), fine-tuned
like any layer, and their tables kept, not averaged, by a merge; each checked against counts or sums computed
plainly."""

from __future__ import annotations

import re

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from deepmoe import DeepSeekForCausalLM, get_preset
from deepmoe.cli.analyze import summary_table
from deepmoe.model import save_pretrained
from deepmoe.tools.analyze import analyze
from deepmoe.tools.esft import esft_finetune
from deepmoe.tools.merge import merge_checkpoints, tensor_class
from deepmoe.tools.routing import collect_routing
from deepmoe.tools.steer import steering_plan

pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]  # checkpoints on disk

HASH_LAYER = 0  # tiny-v4: mlp_layer_types = ["hash_moe", "moe", "moe", "moe"]


def tiny_v4(seed: int, table_seed: int = 0) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(get_preset("tiny-v4")).eval()
    table = model.model.layers[HASH_LAYER].mlp.gate.tid2eid
    n = model.config.moe.n_routed_experts
    draws = torch.rand(table.shape[0], n, generator=torch.Generator().manual_seed(table_seed))
    table.copy_(draws.argsort(-1)[:, : table.shape[1]])
    return model


def token_batches(seed: int, n: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (2, 40), generator=generator) for _ in range(n)]


def test_analyze_reports_the_hash_layer_as_hash_routed():
    model = tiny_v4(seed=1)
    model.model.layers[HASH_LAYER].mlp.gate.tid2eid[:] = torch.tensor([0, 1, 2, 3])  # every token: experts 0-3
    sources = {"a": token_batches(1), "b": token_batches(2)}
    report = analyze(model, sources, min_count=1)
    layers = report["layers"]
    assert [layers[str(i)]["routing"] for i in range(4)] == ["hash", "learned", "learned", "learned"]
    assert report["summary"]["hash_layers"] == [HASH_LAYER]
    hashed = layers[str(HASH_LAYER)]
    tokens = sum(b.numel() for batches in sources.values() for b in batches)
    assert hashed["tokens_per_expert"] == [tokens] * 4 + [0] * 12  # the table, counted plainly
    # 12 of 16 experts dead would be a learned router's collapse; the table's load is not one
    assert hashed["dead_experts"] == list(range(4, 16))
    assert not hashed["collapse"]["warning"] and "hash-routed" in hashed["collapse"]["note"]
    assert HASH_LAYER not in report["summary"]["collapse_layers"]
    console = Console(record=True, width=120)
    console.print(summary_table(report))
    assert f"{HASH_LAYER} (hash)" in console.export_text() and "1 (hash)" not in console.export_text()


def test_steering_skips_the_hash_layers_experts():
    model = tiny_v4(seed=1)
    expert = int(collect_routing(model, token_batches(3, n=1))[HASH_LAYER].counts.argmax())
    scores = [(HASH_LAYER, expert, 0.9), (2, 5, 0.5), (3, 1, 0.4), (1, 0, -0.3)]
    plan = steering_plan(scores, side="A", k=2, config=model)
    assert plan["layers"] == {"2": [5], "3": [1]}  # the next two of side A in rank order
    assert [(s["layer"], s["expert"]) for s in plan["skipped"]] == [(HASH_LAYER, expert)]
    assert "hash-routed" in plan["skipped"][0]["reason"]


def test_esft_trains_only_the_selected_experts_of_v4_including_a_hash_layer():
    model = tiny_v4(seed=2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    selection = {HASH_LAYER: [3], 2: [0, 7]}
    esft_finetune(model, selection, token_batches(4), steps=2, lr=1e-2)
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    projections = ("gate_up_proj", "down_proj")
    assert changed == {f"model.layers.{i}.mlp.experts.{p}" for i in (HASH_LAYER, 2) for p in projections}
    for layer, experts in selection.items():
        for p in projections:
            name = f"model.layers.{layer}.mlp.experts.{p}"
            moved = [e for e in range(16) if not torch.equal(before[name][e], after[name][e])]
            assert moved == experts


def test_merge_of_v4_checkpoints_by_class_keeps_the_hash_table(tmp_path):
    a, b = tiny_v4(seed=3), tiny_v4(seed=4)
    save_pretrained(a, tmp_path / "a")
    save_pretrained(b, tmp_path / "b")
    report = merge_checkpoints([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "m",
                               class_weights={"routed_experts": [0.0, 1.0], "attention": [1.0, 0.0]})  # fmt: skip
    assert report.weights["routed_experts"] == [0.0, 1.0]
    gates = [
        n for n in load_file(tmp_path / "a" / "model.safetensors") if re.search(r"\.gate\.(weight|bias|tid2eid)$", n)
    ]
    assert report.classes["router"].tensors == len(gates)  # each gate's weight, selection bias or hash table
    merged = DeepSeekForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    for name, t in merged.items():
        if ".mlp.experts." in name:
            assert torch.equal(t, sb[name]), name
        elif ".self_attn." in name:
            assert torch.equal(t, sa[name]), name
        elif name.endswith("tid2eid"):
            assert torch.equal(t, sa[name]) and torch.equal(t, sb[name])
        elif name.endswith(("attn_hc.fn", "mlp.gate.weight", "model.hc_head.hc_fn")):
            assert torch.equal(t, 0.5 * sa[name] + 0.5 * sb[name]), name

    tiny_v4(seed=4, table_seed=1).save_pretrained(tmp_path / "c")  # another hash table
    with pytest.raises(ValueError, match="tables of expert ids cannot be averaged"):
        merge_checkpoints([tmp_path / "a", tmp_path / "c"], [0.5, 0.5], tmp_path / "m2")


def test_v4_tensor_classes():
    classes = {
        "model.layers.1.ffn.experts.3.w1.weight": "routed_experts",
        "model.layers.1.ffn.shared_experts.w2.weight": "shared_experts",
        "model.layers.1.ffn.gate.weight": "router",
        "model.layers.1.ffn.gate.bias": "router",
        "model.layers.0.ffn.gate.tid2eid": "router",
        "model.layers.1.attn.wq_a.weight": "attention",
        "model.layers.1.attn.indexer.compressor.ape": "attention",
        "model.layers.1.attn_norm.weight": "embeddings_norms",
        "head.weight": "embeddings_norms",
        "model.embed_tokens.weight": "embeddings_norms",
        "model.layers.1.hc_attn_fn": "other",
        "model.hc_head.hc_base": "other",
    }
    assert {name: tensor_class(name) for name in classes} == classes
