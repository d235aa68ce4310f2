"""Training with the routed experts in fine-grained FP8 (`TrainConfig.fp8_experts`, `--fp8-experts`)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from test_trainer import pattern_corpus, tiny

from deepmoe.cli.train import add_arguments, options_from_args
from deepmoe.train import TrainConfig, resume, train
from deepmoe.train import checkpoint as ckpt

# cpu_only: the trainer on files, fp8 on CPU kernels
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


def test_fp8_training_runs_and_reports_the_fp8_error(tmp_path):
    out = tmp_path / "run"
    result = train(tiny(out, hidden_size=128, steps=8, warmup_steps=2, fp8_experts=True), pattern_corpus())
    assert result.step == 8 and not result.interrupted
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in log]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-2:]) / 2 < losses[0] - 0.3
    report = json.loads((out / "report.json").read_text())
    assert math.isfinite(report["heldout_loss"]) and report["config"]["fp8_experts"]
    errors = report["fp8_error_per_layer"]
    assert sorted(errors) == ["1", "2"]  # the MoE layer and the MTP block's
    for e in errors.values():
        assert 0 < e["bf16"] < e["fp8"] < 0.1
    state, _ = ckpt.read_training_state(result.checkpoint)  # what --resume rebuilds the model from
    assert state["model_config"]["moe"]["fp8_experts"] and state["train_config"]["fp8_experts"]
    # the flag is part of the run: it cannot change on resume
    with pytest.raises(ValueError, match="cannot change fp8_experts"):
        resume(out, pattern_corpus(), steps=9, fp8_experts=False)


def test_fp8_experts_flag_and_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args(["--fp8-experts"]))["fp8_experts"] is True
    assert options_from_args(parser.parse_args(["--no-fp8-experts"]))["fp8_experts"] is False
    assert "fp8_experts" not in options_from_args(parser.parse_args([]))
    assert TrainConfig().fp8_experts is False
    with pytest.raises(ValueError, match="fp8_experts"):
        TrainConfig(fp8_experts=1)
