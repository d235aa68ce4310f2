"""Robustness of the command line: missing or wrong arguments exit with code 2 and end with one line
`deepmoe ...: error: ...`; runtime errors (a path that does not exist) exit with code 1 and print exactly
one line `deepmoe <cmd>: error: ...`; never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepmoe.cli import main

# cpu_only: the CLI's argument handling
pytestmark = pytest.mark.cpu_only

ARGUMENT_ERRORS = {
    "no command": [],
    "unknown command": ["bogus"],
    "unknown top flag": ["--bogus"],
    "demo --steps x": ["demo", "--steps", "x"],
    "demo --steps 0": ["demo", "--steps", "0"],
    "demo --steps -1": ["demo", "--steps", "-1"],
    "demo --seed 1.5": ["demo", "--seed", "1.5"],
    "demo unknown flag": ["demo", "--bogus"],
    "demo stray positional": ["demo", "extra"],
    "balance-demo --tokens x": ["balance-demo", "--tokens", "x"],
    "balance-demo --favoured 0": ["balance-demo", "--favoured", "0"],
    "balance-demo --gamma abc": ["balance-demo", "--gamma", "abc"],
    "balance-demo --steps missing value": ["balance-demo", "--steps"],
    "train --steps x": ["train", "--steps", "x"],
    "train --steps -1": ["train", "--steps", "-1"],
    "train --steps 0": ["train", "--steps", "0"],
    "train --batch-size 0": ["train", "--batch-size", "0"],
    "train --seq-len -5": ["train", "--seq-len", "-5"],
    "train --grad-accum 0": ["train", "--grad-accum", "0"],
    "train --lr abc": ["train", "--lr", "abc"],
    "train --preset unknown": ["train", "--preset", "no-such"],
    "train --schedule unknown": ["train", "--schedule", "linear"],
    "train --device unknown": ["train", "--device", "tpu"],
    "train unknown flag": ["train", "--bogus", "1"],
    "analyze no args": ["analyze"],
    "analyze missing --data": ["analyze", "ckpt"],
    "analyze --seq-len 0": ["analyze", "ckpt", "--data", "bundled:code", "--seq-len", "0"],
    "analyze --top-k x": ["analyze", "ckpt", "--data", "bundled:code", "--top-k", "x"],
    "steer no args": ["steer"],
    "steer missing --out": ["steer", "ckpt", "--a", "bundled:code", "--b", "bundled:english"],
    "steer --top -1": ["steer", "ckpt", "--out", "s.json", "--top", "-1"],
    "steer --ks bad": ["steer", "ckpt", "--out", "s.json", "--ks", "1,x"],
    "steer --side c": ["steer", "ckpt", "--out", "s.json", "--side", "c"],
    "esft no args": ["esft"],
    "esft missing --out": ["esft", "ckpt", "--data", "bundled:code"],
    "esft --steps -1": ["esft", "ckpt", "--data", "bundled:code", "--out", "d", "--steps", "-1"],
    "esft --batch-size 0": ["esft", "ckpt", "--data", "bundled:code", "--out", "d", "--batch-size", "0"],
    "esft --method bad": ["esft", "ckpt", "--data", "bundled:code", "--out", "d", "--method", "bad"],
    "esft --p x": ["esft", "ckpt", "--data", "bundled:code", "--out", "d", "--p", "x"],
    "inspect no args": ["inspect"],
    "inspect two models": ["inspect", "a", "b"],
    "generate no args": ["generate"],
    "generate missing prompt": ["generate", "ckpt"],
    "generate --prompt and --ids": ["generate", "ckpt", "--prompt", "hi", "--ids", "1"],
    "generate --ids x": ["generate", "ckpt", "--ids", "x"],
    "generate --ids empty": ["generate", "ckpt", "--ids"],
    "generate --max-new-tokens 0": ["generate", "ckpt", "--ids", "1", "--max-new-tokens", "0"],
    "generate --top-k -1": ["generate", "ckpt", "--ids", "1", "--top-k", "-1"],
    "generate --temperature x": ["generate", "ckpt", "--ids", "1", "--temperature", "x"],
    "generate --dtype float8": ["generate", "ckpt", "--ids", "1", "--dtype", "float8"],
}


@pytest.mark.parametrize("name", list(ARGUMENT_ERRORS))
def test_argument_errors_exit_2_with_one_line(ledger, capsys, name):
    argv = ARGUMENT_ERRORS[name]
    try:
        main(argv)
    except SystemExit as stop:
        code = stop.code
    except Exception as error:  # noqa: BLE001
        ledger.record("cli", "crash", f"{name}: {error!r}")
        raise AssertionError(f"deepmoe {argv} raised {error!r}") from error
    else:
        ledger.record("cli", "crash", f"{name}: was accepted")
        raise AssertionError(f"deepmoe {argv} was accepted")
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1] if err else ""
    ok = code == 2 and last.startswith("deepmoe") and ": error: " in last and "Traceback" not in "\n".join(err)
    ledger.record("cli", "clear_error" if ok else "crash", f"{name}: exit {code}: {last}")
    assert ok, f"deepmoe {argv}: exit {code}, stderr {err}"


def runtime_errors(tmp_path) -> dict[str, list[str]]:
    missing = str(tmp_path / "no-such-dir")
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return {
        "inspect missing model": ["inspect", missing],
        "generate missing model": ["generate", missing, "--ids", "1"],
        "generate empty folder": ["generate", str(empty), "--ids", "1"],
        "analyze missing model": ["analyze", missing, "--data", "bundled:code", "--out", str(tmp_path / "a")],
        "steer missing model": [
            "steer",
            missing,
            "--a",
            "bundled:code",
            "--b",
            "bundled:english",
            "--out",
            str(tmp_path / "s.json"),
        ],  # fmt: skip
        "esft missing model": ["esft", missing, "--data", "bundled:code", "--out", str(tmp_path / "d")],
        "train missing data": ["train", "--data", missing, "--out", str(tmp_path / "t1"), "--steps", "1"],
        "train empty data folder": ["train", "--data", str(empty), "--out", str(tmp_path / "t2"), "--steps", "1"],
        "train missing --config": ["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "t3")],
        "train missing --resume": ["train", "--resume", missing],
    }


def test_runtime_errors_exit_1_with_one_line(ledger, capsys, tmp_path):
    for name, argv in runtime_errors(tmp_path).items():
        try:
            code = main(argv)
        except BaseException as error:  # noqa: BLE001 - SystemExit included: these arguments parse
            ledger.record("cli", "crash", f"{name}: {error!r}")
            raise AssertionError(f"deepmoe {argv} raised {error!r}") from error
        err = capsys.readouterr().err.strip().splitlines()
        ok = code == 1 and len(err) == 1 and err[0].startswith(f"deepmoe {argv[0]}: error: ")
        ledger.record("cli", "clear_error" if ok else "crash", f"{name}: exit {code}: {err}")
        assert ok, f"deepmoe {argv}: exit {code}, stderr {err}"


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepmoe", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["train", "--steps", "-1"], 2),
        (["generate", "ckpt", "--ids", "x"], 2),
        (["esft"], 2),
        (["inspect", "/no/such/model"], 1),
        (["generate", "/no/such/model", "--ids", "1", "2"], 1),
    ],
)
def test_end_to_end_no_traceback(ledger, argv, code):
    result = _run(argv)
    lines = result.stderr.strip().splitlines()
    ok = (
        result.returncode == code
        and "Traceback" not in result.stderr
        and lines
        and lines[-1].startswith("deepmoe")
        and ": error: " in lines[-1]
        and (code == 2 or len(lines) == 1)
    )
    ledger.record("cli", "clear_error" if ok else "crash", f"subprocess {argv}: exit {result.returncode}")
    assert ok, f"deepmoe {argv}: exit {result.returncode}, stderr {result.stderr!r}"
