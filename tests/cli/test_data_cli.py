"""`deepmoe data prepare` as typed: the summary, bad input as one line naming file and line (exit 1), the
skip count, the options in --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepmoe.cli import main

# cpu_only: the data CLI: files on disk
pytestmark = pytest.mark.cpu_only


def write_jsonl(path, n: int, bad_line: int | None = None) -> None:
    lines = [json.dumps({"text": f"document number {i}: some words to tokenize"}) for i in range(n)]
    if bad_line is not None:
        lines[bad_line - 1] = '{"text": '
    path.write_text("\n".join(lines) + "\n")


def test_prepare_prints_a_summary(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", 40)
    argv = ["data", "prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--vocab-size", "270",
            "--heldout-fraction", "0.1", "--workers", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train: 36 documents" in out and "heldout: 4 documents" in out and "tokens/s" in out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"]["train"]["documents"] == 36 and index["options"]["vocab_size"] == 270
    assert main([*argv[:3], str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out2"), "--tokenizer",
                 str(tmp_path / "out"), "--no-progress"]) == 0  # fmt: skip
    assert (tmp_path / "out2" / "tokenizer.json").read_bytes() == (tmp_path / "out" / "tokenizer.json").read_bytes()


def test_bad_input_is_one_line_naming_file_and_line(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", 5, bad_line=3)
    argv = [sys.executable, "-m", "deepmoe", "data", "prepare", str(tmp_path / "in.jsonl"), "--out",
            str(tmp_path / "out"), "--vocab-size", "270", "--no-progress"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"deepmoe data: error: {tmp_path / 'in.jsonl'}:3: malformed JSON: Expecting value (column 9)"
    )
    result = subprocess.run([*argv, "--on-error", "skip"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"skipped 1 bad documents of {tmp_path / 'in.jsonl'}" in " ".join(result.stdout.split())
    assert "in.jsonl:3: malformed JSON" in " ".join(result.stderr.split())  # the skipped document is named


def test_help_lists_the_command_and_its_options(capsys):
    try:
        main(["data", "prepare", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for option in ("--tokenizer", "--vocab-size", "--format", "--field", "--chat", "--workers", "--shard-tokens",
                   "--heldout-fraction", "--on-error", "<|assistant|>"):  # fmt: skip
        assert option in out, option
    result = subprocess.run([sys.executable, "-m", "deepmoe", "--help"], capture_output=True, text=True)
    assert "data" in result.stdout
