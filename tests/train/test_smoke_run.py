"""A short (smoke) run stays short: the final evaluation is bounded by `final_eval_batches`, a warmup longer
than the run is reported, `--no-progress` hides only the bar, and the banner and report.json agree on the
parameter count and say which loss they show."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.parameters import count_parameters
from deepmoe.train import TrainConfig, train
from deepmoe.train import trainer as trainer_module

# cpu_only: the trainer's CLI run on files
pytestmark = pytest.mark.cpu_only

VOCAB, SEQ_LEN, BATCH = 64, 16, 2


def big_heldout_corpus() -> StandInCorpus:
    """A held-out split of 200 batches of BATCH × SEQ_LEN windows."""
    g = torch.Generator().manual_seed(0)
    return StandInCorpus(
        torch.randint(0, VOCAB, (4000,), generator=g), torch.randint(0, VOCAB, (200 * BATCH * SEQ_LEN,), generator=g)
    )


def tiny(out, **overrides) -> TrainConfig:
    options = dict(
        preset="tiny-v3", layers=2, hidden_size=32, seq_len=SEQ_LEN, batch_size=BATCH, steps=2, warmup_steps=1,
        eval_every=0, save_every=0, keep_last=0, progress=False, out=str(out),
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture
def eval_calls(monkeypatch):
    """Counts the model's forward calls in eval mode (the held-out evaluations')."""
    calls = []
    original = DeepSeekForCausalLM.forward

    def forward(model, *args, **kwargs):
        if not model.training:
            calls.append(1)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(DeepSeekForCausalLM, "forward", forward)
    return calls


@pytest.mark.parametrize(("bound", "expected"), [(None, 2), (5, 5), (0, 200)])
def test_the_final_evaluation_is_bounded(tmp_path, eval_calls, bound, expected):
    """Default: a 2-step run evaluates on 2 batches; N: N batches; 0: the whole held-out set (200)."""
    result = train(tiny(tmp_path / "run", final_eval_batches=bound), big_heldout_corpus())
    assert len(eval_calls) == expected
    assert result.report["heldout_tokens"] == expected * BATCH * (SEQ_LEN - 1)


def test_the_default_bound_of_a_long_run(tmp_path, eval_calls, monkeypatch):
    monkeypatch.setattr(trainer_module, "FINAL_EVAL_BATCHES", 3)  # 200 in a real run
    train(tiny(tmp_path / "run", steps=4, grad_accum=2), big_heldout_corpus())
    assert len(eval_calls) == 3
    with pytest.raises(ValueError, match="final_eval_batches"):
        TrainConfig(final_eval_batches=-1)


def test_a_warmup_longer_than_the_run_is_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        train(tiny(tmp_path / "long", warmup_steps=100, final_eval_batches=1), big_heldout_corpus())
    assert any("warmup_steps=100" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        train(tiny(tmp_path / "short", warmup_steps=1, final_eval_batches=1), big_heldout_corpus())
    assert not any("warmup" in r.getMessage() for r in caplog.records)


def run_model_config(out) -> DeepSeekConfig:
    return from_pretrained(out / "step-2").config


def test_report_labels_the_losses_and_parameters(tmp_path):
    result = train(tiny(tmp_path / "run", final_eval_batches=1), big_heldout_corpus())
    report = json.loads((result.out_dir / "report.json").read_text())
    last = json.loads((result.out_dir / "log.jsonl").read_text().splitlines()[-1])
    assert report["final_train_loss"] == last["loss"] and report["final_train_lm_loss"] == last["lm_loss"]
    assert report["final_train_lm_loss"] < report["final_train_loss"]  # the MTP and aux losses are added
    counts = count_parameters(run_model_config(result.out_dir))
    assert (report["parameters"], report["mtp_parameters"]) == (counts.total, counts.mtp) and counts.mtp > 0


def test_no_progress_hides_only_the_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "load_corpus", lambda config, corpus, *rest: big_heldout_corpus())
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny-v3", "--layers", "2", "--hidden", "32", "--seq-len", str(SEQ_LEN),
            "--batch-size", str(BATCH), "--steps", "2", "--warmup-steps", "1", "--eval-every", "1",
            "--final-eval-batches", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    report = json.loads((out / "report.json").read_text())
    banner = f"{report['parameters'] / 1e6:.2f} M parameters + {report['mtp_parameters'] / 1e6:.2f} M MTP"
    assert banner in text  # the banner, counting like report.json
    assert "step 1: held-out loss" in text  # the periodic evaluation
    assert "heldout_tokens" in text and "final_train_lm_loss" in text  # the report table
    assert "━" not in text  # no bar
