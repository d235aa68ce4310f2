"""The command line's error and warning lines: one line each, naming flags and paths, never a traceback
or an errno text."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest

from deepmoe.cli import common, main

# cpu_only: the CLI's error messages, on checkpoints on disk
pytestmark = pytest.mark.cpu_only


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_oserror_is_path_and_reason():
    assert common.error_line(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert common.error_line(FileExistsError(17, "File exists", "a", None, "b")) == "a: b: File exists"
    assert common.error_line(ValueError("first\nsecond")) == "first"


def test_train_errors_name_the_flag(capsys):
    assert main(["train", "--lr", "-1", "--steps", "1"]) == 1
    line = error_line(capsys)
    assert line.startswith("deepmoe train: error: --lr=-1.0 is invalid"), line
    assert "TrainConfig" not in line


def test_train_config_unknown_model_override_is_named(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_overrides": {"bogus_field": 2}, "steps": 1, "out": str(tmp_path / "run")}))
    assert main(["train", "--config", str(config)]) == 1
    line = error_line(capsys)
    assert "model_overrides.bogus_field" in line and "Traceback" not in line


def test_steer_refuses_an_unwritable_out_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"a": "to be", "b": "def f():"}\n')
    out = blocker / "x.json"  # under a file: fails for root too
    assert main(["steer", str(tmp_path / "no-model"), "--pairs", str(pairs), "--out", str(out)]) == 1
    line = error_line(capsys)
    assert str(out) in line and "no-model" not in line and "[Errno" not in line


def test_esft_refuses_an_unwritable_out_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    out = blocker / "delta"
    assert main(["esft", str(tmp_path / "no-model"), "--data", "bundled:english", "--out", str(out)]) == 1
    line = error_line(capsys)
    assert str(blocker) in line and "no-model" not in line and "[Errno" not in line


def test_warnings_print_as_one_line_and_only_during_the_command(monkeypatch, capsys):
    import deepmoe.cli.inspect as inspect_command

    def run(args):
        warnings.warn("careful: something odd", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(inspect_command, "run", run)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["inspect", "anything"]) == 0
    assert error_line(capsys) == "warning: careful: something odd"
    assert warnings.showwarning.__module__ != logging.__name__  # captureWarnings is off again


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a 0o555 directory")
def test_steer_refuses_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"a": "to be", "b": "def f():"}\n')
    assert main(["steer", str(tmp_path / "no-model"), "--pairs", str(pairs), "--out", str(locked / "s.json")]) == 1
    assert "is not writable" in error_line(capsys)


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """A checkpoint saved without tokenizer.json (as transformers saves one), and a tokenizer elsewhere."""
    import torch

    from configs import tiny_preset
    from corpora import byte_level_bpe
    from deepmoe import DeepSeekForCausalLM

    root = tmp_path_factory.mktemp("bare")
    tokenizer = byte_level_bpe("to be or not to be, that is the question\ndef f(x):\n    return x + 1\n" * 20, 300)
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    DeepSeekForCausalLM(tiny_preset(num_hidden_layers=2, vocab_size=300)).save_pretrained(root / "model")
    (root / "text.txt").write_text("to be or not to be, that is the question\n" * 30)
    return root


def test_missing_tokenizer_mentions_the_option(bare_checkpoint, capsys):
    model = str(bare_checkpoint / "model")
    assert main(["generate", model, "--prompt", "to be"]) == 1
    line = error_line(capsys)
    assert "tokenizer.json not found" in line and "--tokenizer" in line
    argv = ["analyze", model, "--data", str(bare_checkpoint / "text.txt"), "--out", str(bare_checkpoint / "a")]
    assert main(argv) == 1
    assert "--tokenizer" in error_line(capsys)


def test_tokenizer_option_for_a_checkpoint_without_one(bare_checkpoint, capsys):
    model, tok = str(bare_checkpoint / "model"), bare_checkpoint / "tok"
    argv = ["generate", model, "--prompt", "to be", "--max-new-tokens", "3", "--tokenizer", str(tok)]
    assert main(argv) == 0
    capsys.readouterr()
    argv = ["analyze", model, "--data", str(bare_checkpoint / "text.txt"), "--out", str(bare_checkpoint / "a")]
    argv += ["--max-tokens", "256", "--seq-len", "32", "--batch-size", "2", "--tokenizer", str(tok / "tokenizer.json")]
    assert main(argv) == 0
    assert (bare_checkpoint / "a" / "report.json").is_file()
    capsys.readouterr()
    assert main(["generate", model, "--prompt", "x", "--tokenizer", str(bare_checkpoint / "nothing")]) == 1
    assert "nothing" in error_line(capsys)


def _without_mtp_tensors(tmp_path, mtp: int) -> str:
    """A checkpoint whose config declares `mtp` MTP modules, saved without their tensors (as transformers does)."""
    import torch
    from safetensors.torch import load_file, save_file

    from configs import tiny_preset
    from deepmoe import DeepSeekForCausalLM

    torch.manual_seed(0)
    DeepSeekForCausalLM(tiny_preset(num_hidden_layers=2, num_nextn_predict_layers=mtp)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.2.")}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return str(tmp_path)


def test_speculative_says_whether_the_mtp_weights_or_the_module_are_missing(tmp_path, capsys):
    argv = ["--ids", "1", "2", "--max-new-tokens", "2", "--speculative"]
    assert main(["generate", _without_mtp_tensors(tmp_path / "dropped", 1), *argv]) == 1
    err = capsys.readouterr().err
    assert "needs the MTP weights" in err and "num_nextn_predict_layers=1" in err
    assert main(["generate", _without_mtp_tensors(tmp_path / "none", 0), *argv]) == 1
    assert "the model has none (num_nextn_predict_layers=0)" in error_line(capsys)


def test_inspect_reports_the_mtp_the_checkpoint_holds(tmp_path, capsys):
    assert main(["inspect", _without_mtp_tensors(tmp_path, 1), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mtp_modules"] == 0 and report["mtp_params"] == 0
