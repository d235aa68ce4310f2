"""The command line's error and warning lines: one line each, naming flags and paths, never a traceback
or an errno text."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest

from deepmoe.cli import common, main


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
