"""`deepmoe analyze`: each scoring formula against a hand-computed example, the report of a tiny
random model, the files it writes and the command line's errors."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch

from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, get_preset
from deepmoe.cli.analyze import add_arguments, run
from deepmoe.tools.analyze import analyze
from deepmoe.tools.analyze_files import write_analysis
from deepmoe.tools.routing_metrics import (
    coactivation_lift,
    entropy,
    independent_lift,
    js_divergence,
    load_metrics,
    specificity,
    token_lift,
    top_pairs,
)

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only

# ---- formulas ------------------------------------------------------------------------------------


def test_js_divergence_by_hand():
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    assert js_divergence(torch.tensor([3, 1]), torch.tensor([6, 2])) == pytest.approx(0.0, abs=1e-12)
    # P = (1/2, 1/2), Q = (1, 0), M = (3/4, 1/4):
    # KL(P||M) = 1/2 log2(2/3) + 1/2 log2(2), KL(Q||M) = log2(4/3)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    expected = (kl_p + kl_q) / 2
    assert expected == pytest.approx(0.311278, abs=1e-6)
    assert js_divergence(torch.tensor([1, 1]), torch.tensor([2, 0])) == pytest.approx(expected)
    assert js_divergence(torch.tensor([2, 0]), torch.tensor([1, 1])) == pytest.approx(expected)  # symmetric


def test_entropy_and_load_metrics_by_hand():
    assert entropy(torch.tensor([1, 1, 1, 1])) == pytest.approx(math.log(4))
    assert entropy(torch.tensor([2, 2, 0, 0])) == pytest.approx(math.log(2))
    m = load_metrics(torch.tensor([2, 2, 0, 0]))
    # mean 1, max 2: MaxVio 1; std 1: CV 1; H = ln 2 → H / ln 4 = 1/2, 2 effective experts of 4
    assert m["maxvio"] == pytest.approx(1.0)
    assert m["cv"] == pytest.approx(1.0)
    assert m["normalized_entropy"] == pytest.approx(0.5)
    assert m["effective_experts"] == pytest.approx(2.0)
    assert m["dead_experts"] == [2, 3]
    assert m["dominant_experts"] == []  # 2 = 2 × mean is not more than twice the mean
    # exp(H) = 2 is not < N/2 = 2 and no share is > 1/2, but 2 dead experts ≥ N/4 = 1
    assert m["collapse"]["warning"] and m["collapse"]["reasons"] == ["2 of 4 experts are dead (>= N/4)"]

    balanced = load_metrics(torch.tensor([10, 10, 10, 10, 10, 10, 10, 11]))
    assert not balanced["collapse"]["warning"] and balanced["dead_experts"] == [] and balanced["dominant_experts"] == []
    skewed = load_metrics(torch.tensor([70, 10, 10, 10]))
    assert skewed["dominant_experts"] == [0]  # 70 > 2 × 25
    assert skewed["maxvio"] == pytest.approx((70 - 25) / 25)
    assert any("holds 70%" in r for r in skewed["collapse"]["reasons"])


def test_specificity_by_hand():
    # A = (3, 1), B = (1, 3); +1 smoothing: p~_A = (4/6, 2/6), p~_B = (2/6, 4/6)
    spec = specificity(torch.tensor([[3, 1], [1, 3]]))
    assert spec.flatten().tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])
    # three sources: p~ = (c + 1) / 6; expert 0 in A: log2((5/6) / mean(1/6, 1/6)) = log2(5)
    spec = specificity(torch.tensor([[4, 0], [0, 4], [0, 4]]))
    assert float(spec[0, 0]) == pytest.approx(math.log2(5))
    assert float(spec[1, 1]) == pytest.approx(math.log2((5 / 6) / ((1 / 6 + 5 / 6) / 2)))
    with pytest.raises(ValueError):
        specificity(torch.tensor([[1, 2]]))


def test_coactivation_lift_by_hand():
    # T = 4 tokens choose {0,1}, {0,1}, {0,2}, {1,2}: c = (3, 3, 2); C01 = 2, C02 = 1, C12 = 1
    coact = torch.tensor([[3, 2, 1], [2, 3, 1], [1, 1, 2]])
    lift = coactivation_lift(coact, tokens=4)
    assert float(lift[0, 1]) == pytest.approx(2 * 4 / (3 * 3))
    assert float(lift[0, 2]) == pytest.approx(1 * 4 / (3 * 2))
    assert float(lift[1, 2]) == pytest.approx(2 / 3)
    assert independent_lift(16, 4) == pytest.approx(3 * 16 / (4 * 15))
    by_lift = top_pairs(coact, 4, top_k=2, by="lift", min_count=1)
    assert [p["experts"] for p in by_lift] == [[0, 1], [0, 2]]  # 8/9, then 2/3 (ties in expert order)
    assert top_pairs(coact, 4, top_k=5, by="lift", min_count=2) == [{"experts": [0, 1], "count": 2, "lift": 8 / 9}]
    assert [p["count"] for p in top_pairs(coact, 4, top_k=3, by="count")] == [2, 1, 1]


def test_token_lift_by_hand():
    # token 0 seen twice, both times with expert 0; token 1 seen twice, once with expert 0
    # T = 4, expert 0 chosen by 3 tokens: r_0 = 3/4
    token_expert = torch.tensor([[2, 0], [1, 1]])
    lift = token_lift(token_expert, torch.tensor([2, 2]), torch.tensor([3, 1]), tokens=4)
    assert float(lift[0, 0]) == pytest.approx(1.0 / 0.75)
    assert float(lift[1, 0]) == pytest.approx(0.5 / 0.75)
    assert float(lift[1, 1]) == pytest.approx(0.5 / 0.25)


# ---- the analysis of a tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report():
    config = DeepSeekConfig.from_dict(
        {**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 3, "vocab_size": 64, "num_nextn_predict_layers": 0}
    )
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    sources = {
        "low": [torch.randint(0, 32, (4, 32), generator=generator) for _ in range(2)],
        "high": [torch.randint(32, 64, (4, 32), generator=generator) for _ in range(2)],
    }
    return config, analyze(model, sources, top_k=3)


def test_specific_experts_leave_out_near_dead_ones():
    """An expert chosen a handful of times can be 100 % one source's: it is not a finding. Experts seen fewer
    than min_count times are not ranked (they were listed first, with the largest specificity)."""
    config = DeepSeekConfig.from_dict(
        {**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 2, "vocab_size": 64, "num_nextn_predict_layers": 0}
    )
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    sources = {"low": [torch.randint(0, 32, (2, 16), generator=generator)],
               "high": [torch.randint(32, 64, (2, 16), generator=generator)]}  # fmt: skip
    ranked = analyze(model, sources, top_k=16, min_count=1)["layers"]
    filtered = analyze(model, sources, top_k=16, min_count=20)["layers"]
    dropped = 0
    for idx, layer in filtered.items():
        load = layer["tokens_per_expert"]
        for name, experts in layer["specific_experts"].items():
            everyone = [e["expert"] for e in ranked[idx]["specific_experts"][name]]
            assert [e["expert"] for e in experts] == [i for i in everyone if load[i] >= 20]
            dropped += len(everyone) - len(experts)
    assert dropped > 0  # the check is not vacuous: some specific experts were seen fewer than 20 times


def test_analyze_reports_every_key_with_valid_numbers(tiny_report):
    config, report = tiny_report
    json.dumps(report, allow_nan=False)  # JSON-serialisable, no NaN
    n, k = config.moe.n_routed_experts, config.moe.num_experts_per_tok
    assert report["sources"] == {"low": {"tokens": 256}, "high": {"tokens": 256}}
    assert sorted(report["layers"]) == ["1", "2"]  # layer 0 is dense (first_k_dense_replace)
    for layer in report["layers"].values():
        assert layer["tokens"] == 512 and layer["experts"] == n and layer["experts_per_token"] == k
        assert sum(layer["tokens_per_expert"]) == 512 * k
        assert sum(layer["share"]) == pytest.approx(1.0)
        assert 0 <= layer["normalized_entropy"] <= 1 and layer["maxvio"] >= 0 and layer["cv"] >= 0
        assert 1 <= layer["effective_experts"] <= n
        assert isinstance(layer["collapse"]["warning"], bool)
        for name in ("low", "high"):
            src = layer["sources"][name]
            assert src["tokens"] == 256 and sum(src["tokens_per_expert"]) == 256 * k
            assert sum(src["share"]) == pytest.approx(1.0)
            assert len(layer["specificity"][name]) == n
            for e in layer["specific_experts"][name]:
                assert e["specificity"] > 0 and e["share"] > e["share_others"]
        (pair,) = layer["js_divergence"]
        assert pair["sources"] == ["low", "high"] and 0 <= pair["js"] <= 1
        assert layer["max_js"] == pair
        coact = layer["coactivation"]
        assert torch.tensor(coact["matrix"]).diagonal().tolist() == layer["tokens_per_expert"]
        assert len(coact["top_pairs_by_count"]) == 3
        counts = [p["count"] for p in coact["top_pairs_by_count"]]
        assert counts == sorted(counts, reverse=True)
        assert len(layer["vocabulary"]) == n
        for i, tokens in enumerate(layer["vocabulary"]):
            assert len(tokens) <= 3
            for t in tokens:
                assert t["occurrences"] >= report["min_count"] and t["token"] is None
                expected = t["p_expert_given_token"] / layer["selection_ratio"][i]
                assert t["lift"] == pytest.approx(expected)
    assert set(report["summary"]["max_js"]) == {"1", "2"}


def test_disjoint_vocabularies_route_differently(tiny_report):
    """The two sources share no token, so a random router still separates them somewhat."""
    _, report = tiny_report
    assert all(js > 0.01 for js in report["summary"]["max_js"].values())


def test_write_analysis_writes_tables_and_valid_pngs(tiny_report, tmp_path):
    _, report = tiny_report
    written = write_analysis(report, tmp_path / "out")
    names = {p.name for p in written}
    assert {"report.json", "layers.csv", "load.csv", "js.csv", "coactivation.csv", "vocabulary.csv"} <= names
    assert {"load_heatmap.png", "sources_layer_1.png", "coactivation_layer_2.png"} <= names
    for path in written:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sources"] == report["sources"]
    rows = list(csv.DictReader((tmp_path / "out" / "load.csv").open()))
    n = report["layers"]["1"]["experts"]
    assert len(rows) == 2 * n
    assert {"share[low]", "share[high]", "specificity[low]"} <= set(rows[0])
    assert int(rows[0]["tokens"]) == int(rows[0]["tokens[low]"]) + int(rows[0]["tokens[high]"])
    assert len(list(csv.DictReader((tmp_path / "out" / "coactivation.csv").open()))) == 2 * n * (n - 1) // 2
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind


def test_single_source_has_no_comparison():
    config = DeepSeekConfig.from_dict({**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 2, "vocab_size": 32})
    model = DeepSeekForCausalLM(config).eval()
    report = analyze(model, {"only": [torch.randint(0, 32, (2, 16))]})
    layer = report["layers"]["1"]
    assert layer["js_divergence"] == [] and layer["max_js"] is None and layer["specific_experts"] == {}
    json.dumps(report, allow_nan=False)
    with pytest.raises(ValueError, match="vocabulary"):
        analyze(model, {"bad": [torch.tensor([[0, 40]])]})


# ---- command line ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmoe analyze")
    add_arguments(parser)
    return parser


def test_missing_data_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["some/model"])
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_bad_model_or_source_is_one_line_error(tmp_path, capsys):
    args = _parser().parse_args([str(tmp_path / "missing"), "--data", "bundled:english"])
    assert run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("deepmoe analyze: error:") and "not a checkpoint directory" in err
    (tmp_path / "model").mkdir()
    args = _parser().parse_args([str(tmp_path / "model"), "--data", "bundled:english"])
    assert run(args) == 1
    assert "tokenizer.json" in capsys.readouterr().err
    args = _parser().parse_args([str(tmp_path / "model"), "--data", "a.txt", "--data", "a.txt"])
    assert run(args) == 1
    assert "twice" in capsys.readouterr().err
