"""`deepmoe study`: the compared models are what the DeepSeekMoE paper compares, at equal active width;
a micro run writes every row with finite values; a finished study is reused, not retrained."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from configs import tiny_preset
from corpora import StandInCorpus
from deepmoe import data
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.tools import study

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only

VOCAB = 64
MICRO = replace(
    study.SCALES["quick"], hidden_size=32, seq_len=16, batch_size=2, steps=3, warmup_steps=1,
    eval_every=2, eval_batches=2, vocab_size=VOCAB,
)  # fmt: skip


@pytest.fixture
def stand_in_corpus(monkeypatch):
    g = torch.Generator().manual_seed(0)
    corpus = StandInCorpus(torch.randint(0, VOCAB, (4000,), generator=g), torch.randint(0, VOCAB, (400,), generator=g))
    monkeypatch.setattr(data, "prepare_corpus", lambda *args, **kwargs: corpus)
    monkeypatch.setattr(study, "SCALES", {**study.SCALES, "quick": MICRO})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield corpus
    torch.set_num_threads(threads)


def _config(variant: study.Variant, scale: study.StudyScale) -> DeepSeekConfig:
    return tiny_preset(study.BASE_PRESET, **variant.model_overrides)  # a `moe` dict changes the preset's MoE


def _token_ffn_widths(config: DeepSeekConfig) -> list[int]:
    """Per layer, the FFN width one token goes through: dense width, or shared + K chosen experts' widths."""
    widths = []
    for i in range(config.num_hidden_layers):
        if not config.is_moe_layer(i):
            widths.append(config.intermediate_size)
        else:
            moe = config.moe
            widths.append(moe.moe_intermediate_size * (moe.n_shared_experts + moe.num_experts_per_tok))
    return widths


@pytest.mark.parametrize("scale_name", ["quick", "default"])
def test_compared_models_are_the_papers_at_equal_active_width(scale_name):
    scale = study.SCALES[scale_name]
    a, n, m, ks = scale.active_ffn, scale.n_experts, scale.granularity, scale.shared
    variants = {v.name: v for v in study.architecture_variants(scale)}
    configs = {name: _config(v, scale) for name, v in variants.items()}
    expected = {  # (routed experts, shared, top-K, expert width) as DeepSeekMoE §4.1 defines them
        "gshard": (n, 0, 2, a // 2),
        "switch": (n, 0, 1, a),
        "fine-grained": (m * n, 0, 2 * m, a // (2 * m)),
        "deepseekmoe": (m * n - ks, ks, 2 * m - ks, a // (2 * m)),
        "residual-moe": (n, 1, 1, a // 2),
    }
    for name, (routed, shared, k, width) in expected.items():
        moe = configs[name].moe
        assert (moe.n_routed_experts, moe.n_shared_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (
            routed,
            shared,
            k,
            width,
        ), name
    assert configs["dense"].moe is None and configs[f"dense-x{n // 2}"].moe is None
    for name, config in configs.items():
        widths = _token_ffn_widths(config)
        if variants[name].equal_active:
            assert widths == [a] * scale.layers, name
        else:  # the upper bound: the GShard / fine-grained models' total FFN width in every layer
            assert widths == [n * a // 2] * scale.layers
    pyramid = configs["pyramid-moe"].moe_experts_per_layer
    assert pyramid[0] == 0 and pyramid[1:] == sorted(pyramid[1:]) and len(set(pyramid[1:])) > 1
    assert sum(pyramid[1:]) == pytest.approx((m * n - ks) * (scale.layers - 1), abs=scale.layers)


def test_balancing_methods_differ_only_in_balancing():
    variants = study.balancing_variants(study.SCALES["default"])
    moes = {v.name: v.model_overrides["moe"] for v in variants}
    balance_fields = {"aux_loss_alpha", "seq_aux_loss_alpha", "use_expert_bias", "bias_update_speed"}
    reference = {k: v for k, v in moes["none"].items() if k not in balance_fields}
    for name, moe in moes.items():
        assert {k: v for k, v in moe.items() if k not in balance_fields} == reference, name
    assert moes["none"]["aux_loss_alpha"] == 0 and not moes["none"]["use_expert_bias"]
    assert moes["bias-0.01"]["use_expert_bias"] and moes["bias-0.01"]["bias_update_speed"] == 0.01
    assert moes["seq-aux-0.01"]["seq_aux_loss_alpha"] == 0.01 and moes["aux-0.1"]["aux_loss_alpha"] == 0.1
    assert moes["none"]["scoring_func"] == "sigmoid" and moes["none"]["norm_topk_prob"]


def _finite_rows(rows):
    for row in rows:
        for key in ("active_params", "total_params", "heldout_loss", "maxvio", "maxvio_batch", "tokens_per_second"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["name"], key)


def test_quick_architectures_study_writes_every_row(stand_in_corpus, tmp_path, capsys):
    out = tmp_path / "arch"
    assert main(["study", "architectures", "--quick", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == [v.name for v in study.architecture_variants(MICRO)]
    _finite_rows(rows)
    assert all(r["tokens_per_second_side_by_side"] > 0 and math.isfinite(r["speed_vs_dense"]) for r in rows)
    assert rows[0]["speed_vs_dense"] == 1.0
    active = [r["active_params"] for r in rows if r["equal_active"]]
    assert max(active) <= 1.02 * min(active)
    assert all(r["steps"] == MICRO.steps for r in rows)
    assert rows[0]["maxvio"] == 0.0 and all(r["maxvio"] > 0 for r in rows if r["name"] in ("gshard", "deepseekmoe"))
    redundancy = json.loads((out / "redundancy.json").read_text())
    for name in ("gshard", "deepseekmoe"):
        disabled = [r["disabled"] for r in redundancy[name]]
        assert disabled[0] == 0 and disabled == sorted(disabled) and disabled[-1] > 0
        assert redundancy[name][0]["loss_increase"] == 0.0
        assert all(math.isfinite(r["heldout_loss"]) for r in redundancy[name])
    for name in ("table.md", "loss.png", "maxvio.png", "redundancy.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| deepseekmoe |" in printed and "disabled" in printed


def test_quick_balancing_study_and_rerun_reuses_finished_runs(stand_in_corpus, tmp_path, monkeypatch):
    out = tmp_path / "bal"
    assert main(["study", "balancing", "--quick", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    _finite_rows(rows)
    assert [r["name"] for r in rows] == [v.name for v in study.balancing_variants(MICRO)]
    assert all(isinstance(r["dead_experts"], int) and r["maxvio_batch"] > 0 for r in rows)
    bias = json.loads((out / "runs" / "bias-0.01" / "train_config.json").read_text())
    assert bias["model_overrides"]["moe"]["bias_update_speed"] == 0.01

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "train", no_training)
    monkeypatch.setattr(study, "resume", no_training)
    assert main(["study", "balancing", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text()) == rows


def test_redundancy_test_without_disabling_is_the_plain_loss(stand_in_corpus, tmp_path):
    variant = next(v for v in study.architecture_variants(MICRO) if v.name == "deepseekmoe")
    row = study.run_variant(variant, MICRO, tmp_path / "run", stand_in_corpus, seed=0)
    batches = data.heldout_batches(stand_in_corpus.heldout, MICRO.batch_size, MICRO.seq_len)
    rows = study.redundancy_test(tmp_path / "run" / "step-3", batches, fractions=(0.0, 0.5))
    assert rows[0]["heldout_loss"] == pytest.approx(row["heldout_loss"], rel=1e-5)
    assert rows[1]["disabled"] == 8  # half of the 15 routed experts, rounded


def test_unknown_study_is_refused():
    with pytest.raises(ValueError, match="unknown study 'sizes'"):
        study.variants_of("sizes", study.SCALES["quick"])
