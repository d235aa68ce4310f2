"""Expert pruning (docs/design.md#s6-pruning): the three scores against a plain per-token loop of their
formulas, a pruned model equal to the unpruned one with the removed experts masked out (V3-style groups and
bias, V2-style softmax), the written checkpoint loaded by deepmoe and by transformers with the same logits, and
the command's refusals (a keep larger than N_r or one that breaks group routing, a non-empty --out)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from configs import tiny_model_config, tiny_preset
from corpora import byte_level_bpe
from deepmoe import DeepSeekConfig, DeepSeekForCausalLM
from deepmoe.cli import main
from deepmoe.cli.prune import add_arguments, keep_value, run
from deepmoe.io.files import OutputDirectoryError
from deepmoe.model import save_pretrained
from deepmoe.tools.prune import (
    PRUNE_REPORT,
    collect_expert_stats,
    expert_scores,
    kept_count,
    prune,
    prune_model,
    select_kept,
)
from reference import route, swiglu, transformers_logits

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]

V2_STYLE = dict(scoring_func="softmax", topk_method="group_limited_greedy", use_expert_bias=False,
                norm_topk_prob=True, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)  # fmt: skip


def _v3_config(**overrides) -> DeepSeekConfig:
    """tiny-v3 cut to 2 layers (a dense one, an MoE one) and an MTP block: 16 experts in 4 groups, top-2 groups,
    top-4, sigmoid scores with a selection bias."""
    return tiny_preset("tiny-v3", **{"num_hidden_layers": 2, "vocab_size": 96, **overrides})


def _model(config: DeepSeekConfig, seed: int = 0) -> DeepSeekForCausalLM:
    """A random model whose selection biases are not zero (so that they matter to the routing)."""
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            if layer.gate.e_score_correction_bias is not None:
                layer.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def _ids(config: DeepSeekConfig, shape=(2, 12), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---- scores ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [None, V2_STYLE], ids=["v3", "v2-softmax"])
def test_scores_match_a_per_token_loop_of_their_formulas(moe):
    config = tiny_model_config(num_nextn_predict_layers=1, **({"moe": moe} if moe else {}))
    model = _model(config)
    ids = _ids(config)
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, args, _out, idx=idx: inputs.setdefault(idx, []).append(args[0]))
        for idx, layer in model.moe_layers().items()
    ]
    stats = collect_expert_stats(model, [ids[:1], ids[1:]])  # two batches: the sums add up
    for hook in hooks:
        hook.remove()
    assert set(stats) == set(model.moe_layers()) == {1, 2}  # the MTP block (layer 2) is scored too

    for idx, layer in model.moe_layers().items():
        cfg, inter = layer.config, layer.config.moe_intermediate_size
        n = cfg.n_routed_experts
        saliency, routed, score_sum, tokens = [0.0] * n, [0] * n, [0.0] * n, 0
        for x in inputs[idx]:
            x = x.reshape(-1, cfg.hidden_size).detach()
            for t, (chosen, weights, scores) in enumerate(
                route(x, layer.gate.weight, layer.gate.e_score_correction_bias, cfg)
            ):
                tokens += 1
                for j in range(n):
                    score_sum[j] += scores[j]
                for j in chosen:
                    gate_up = layer.experts.gate_up_proj[j].detach()
                    f = swiglu(x[t], gate_up[:inter], gate_up[inter:], layer.experts.down_proj[j].detach())
                    saliency[j] += weights[j] * float(f.norm())
                    routed[j] += 1
        reap = torch.tensor([s / c if c else 0.0 for s, c in zip(saliency, routed, strict=True)], dtype=torch.float64)
        assert torch.allclose(expert_scores(stats, "reap")[idx], reap, rtol=1e-5, atol=1e-7)
        assert expert_scores(stats, "frequency")[idx].tolist() == [float(c) for c in routed]
        gate = torch.tensor(score_sum, dtype=torch.float64) / tokens
        assert torch.allclose(expert_scores(stats, "gate")[idx], gate, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="method='mean'"):
        expert_scores(stats, "mean")


def test_selection_keeps_the_best_of_each_group_and_checks_the_count():
    config = _v3_config()  # 16 experts, 4 groups of 4, top-2 groups, top-4
    scores = {1: torch.arange(16, dtype=torch.float64).flip(0)}  # expert 0 best: groups keep their first members
    scores[1][5] = 100.0  # the best expert of all, in group 1
    assert select_kept(config, scores, 8) == {1: [0, 1, 4, 5, 8, 9, 12, 13]}  # 2 per group, not the global top 8
    assert select_kept(config, scores, 0.75) == {1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]}
    assert kept_count(config, 16, 1.0) == 16 and kept_count(config, 16, 0.6) == 8  # round(0.6 · 4) = 2 per group
    with pytest.raises(ValueError, match="cannot be split equally over n_group=4"):
        kept_count(config, 16, 10)
    with pytest.raises(ValueError, match="topk_group=2 groups would hold 2 experts, fewer than num_experts_per_tok=4"):
        kept_count(config, 16, 4)
    with pytest.raises(ValueError, match=r"must be in \[1, n_routed_experts=16\]"):
        kept_count(config, 16, 17)
    greedy = tiny_model_config(moe=dict(n_routed_experts=8, n_group=1, topk_group=1, topk_method="greedy"))
    assert select_kept(greedy, {1: torch.tensor([5.0, 1, 7, 0, 3, 3, 2, 9])}, 3) == {1: [0, 2, 7]}
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok=2"):
        kept_count(greedy, 8, 1)


# ---- the pruned model ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["v3-groups-bias", "v2-softmax"])
def test_pruned_model_equals_the_original_with_those_experts_masked(case):
    if case == "v3-groups-bias":
        config, keep = _v3_config(), 8
    else:
        config, keep = tiny_model_config(num_nextn_predict_layers=1, moe=V2_STYLE), 4
    model = _model(config)
    ids = _ids(config, (2, 16))
    stats = collect_expert_stats(model, [ids])
    kept = select_kept(config, expert_scores(stats, "reap"), keep)
    pruned = prune_model(model, kept)
    assert pruned.config.moe.n_routed_experts == keep and pruned.config.moe_experts_per_layer is None
    for idx, layer in pruned.moe_layers().items():
        original = model.moe_layers()[idx]
        assert torch.equal(layer.gate.weight, original.gate.weight[kept[idx]])
        assert torch.equal(layer.experts.down_proj, original.experts.down_proj[kept[idx]])
        if original.gate.e_score_correction_bias is not None:
            assert torch.equal(layer.gate.e_score_correction_bias, original.gate.e_score_correction_bias[kept[idx]])
        n = original.config.n_routed_experts
        original.gate.set_expert_mask(disabled=[i for i in range(n) if i not in kept[idx]])
    with torch.no_grad():
        got, want = pruned(ids, output_mtp=True), model(ids, output_mtp=True)
    assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.mtp_logits[0], want.mtp_logits[0], atol=1e-5, rtol=1e-5)
    for idx, s in got.routing_stats.items():  # the same experts chose the same tokens, renumbered
        assert torch.equal(s.tokens_per_expert, want.routing_stats[idx].tokens_per_expert[kept[idx]])


# ---- the command -----------------------------------------------------------------------------------

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(150))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A V3-style checkpoint (16 experts in 4 groups, MTP block) with a tokenizer, and its calibration text."""
    root = tmp_path_factory.mktemp("prune")
    (root / "task.py").write_text(TEXT)
    tokenizer = byte_level_bpe(TEXT)
    config = _v3_config(vocab_size=tokenizer.get_vocab_size())
    directory = save_pretrained(_model(config), root / "base")
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    data = str(checkpoint.parent / "task.py")
    return [str(checkpoint), "--data", data, "--out", str(out), "--tokens", "512", "--seq-len", "32",
            "--device", "cpu", *extra]  # fmt: skip


def test_prune_command_writes_a_checkpoint_deepmoe_and_transformers_load(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "pruned"
    assert run(parser.parse_args(_argv(checkpoint, out, "--keep", "0.5", "--method", "reap", "--json"))) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / PRUNE_REPORT).read_text()) == {k: v for k, v in report.items() if k != "out"}
    assert report["n_routed_experts"] == {"before": 16, "after": 8} and set(report["layers"]) == {"1", "2"}
    assert report["calibration"]["tokens"] == 512
    for entry in report["layers"].values():
        assert (
            len(entry["kept"]) == 8
            and len(entry["scores"]) == 16
            and sorted(entry["kept"] + entry["removed"]) == list(range(16))
        )
        assert [sum(1 for i in entry["kept"] if i // 4 == g) for g in range(4)] == [2, 2, 2, 2]
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    hf = json.loads((out / "config.json").read_text())
    assert hf["n_routed_experts"] == 8 and hf["n_group"] == 4 and hf["num_experts_per_tok"] == 4

    original = DeepSeekForCausalLM.from_pretrained(checkpoint)
    for idx, layer in original.moe_layers().items():
        layer.gate.set_expert_mask(disabled=report["layers"][str(idx)]["removed"])
    pruned = DeepSeekForCausalLM.from_pretrained(out)
    assert all(not layer.gate.has_expert_mask for layer in pruned.moe_layers().values())
    ids = _ids(pruned.config, (2, 9))
    with torch.no_grad():
        want, ours = original(ids).logits.double(), pruned(ids).logits.double()
    assert torch.allclose(ours, want, atol=1e-5, rtol=1e-5)
    theirs = transformers_logits(out, ids)
    assert float((theirs - ours).norm() / ours.norm()) < 1e-5


def test_prune_refuses_bad_keeps_and_a_non_empty_out(checkpoint, tmp_path, capsys):
    for keep, message in [
        (17, r"keep=17 is invalid: must be in \[1, n_routed_experts=16\]"),
        (6, "cannot be split equally over n_group=4 groups"),
        (4, "leaves 1 per group: a token's topk_group=2 groups would hold 2 experts, fewer than num_experts_per_tok=4"),
        (0.25, "leaves 1 per group"),
    ]:
        with pytest.raises(ValueError, match=message):
            prune(checkpoint, str(checkpoint.parent / "task.py"), tmp_path / f"out-{keep}", keep=keep, device="cpu")
        assert not (tmp_path / f"out-{keep}").exists() or not any((tmp_path / f"out-{keep}").iterdir())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirectoryError, match="is not empty"):
        prune(checkpoint, str(checkpoint.parent / "task.py"), taken, keep=8, device="cpu")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert main(["prune", *_argv(checkpoint, checkpoint, "--keep", "8")]) == 1  # the command: one line, status 1
    assert "error:" in capsys.readouterr().err and sorted(p.name for p in checkpoint.iterdir())[0] == "config.json"
    with pytest.raises(OutputDirectoryError, match="is the checkpoint being pruned"):
        prune(checkpoint, str(checkpoint.parent / "task.py"), checkpoint, keep=8, device="cpu")
    dense = save_pretrained(DeepSeekForCausalLM(tiny_model_config(moe=None)), tmp_path / "dense")
    with pytest.raises(ValueError, match="a dense model has no experts to prune"):
        prune(dense, str(checkpoint.parent / "task.py"), tmp_path / "d", keep=2)
    with pytest.raises(ValueError, match="method='best'"):
        prune(checkpoint, str(checkpoint.parent / "task.py"), tmp_path / "m", keep=8, method="best")


def test_keep_option_reads_counts_and_fractions():
    assert keep_value("8") == 8 and isinstance(keep_value("8"), int)
    assert keep_value("0.5") == 0.5 and keep_value("1.0") == 1.0
    for bad in ("0", "1.5", "-2", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            keep_value(bad)
