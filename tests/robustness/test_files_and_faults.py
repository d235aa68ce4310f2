"""Robustness of checkpoint files and of training under faults.

Checkpoints: one tiny saved model attacked by a table of mutations (truncation, flipped header bytes,
wrong shapes and dtypes, missing shards and index entries, another model type, NaN/inf); each must give
one `CheckpointError`, one line, naming the file (and the tensor where there is one).

Faults: `deepmoe train` killed with SIGKILL at varied moments (one during a checkpoint write) and
resumed ends with the same weights, bit for bit, as an uninterrupted run; a full disk fails a save
cleanly and leaves the previous checkpoint byte-identical.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepmoe.io import CheckpointError, load_checkpoint
from deepmoe.io import checkpoint as ckpt_module
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.presets import get_preset
from deepmoe.train import checkpoint as train_ckpt

# cpu_only: files, faults and subprocesses
pytestmark = pytest.mark.cpu_only

NORM = "model.norm.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


# ---- one tiny saved checkpoint ---------------------------------------------------------------------


def tiny_model() -> DeepSeekForCausalLM:
    config = dataclasses.replace(get_preset("tiny-v3"), num_hidden_layers=2, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    return DeepSeekForCausalLM(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A single-file and a sharded save of the same tiny model (each test works on a copy)."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    return {"single": root / "single", "sharded": root / "sharded"}


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def truncate(at):
    def damage(d: Path) -> Path:
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: at(data)])
        return f

    return damage


def flip(at):
    """XOR one byte of the header (offset from `at(header length)`)."""

    def damage(d: Path) -> Path:
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[at(header_len(f))] ^= 0x5A
        f.write_bytes(bytes(data))
        return f

    return damage


def rewrite(name: str, make):
    def damage(d: Path) -> Path:
        f = d / "model.safetensors"
        tensors = load_file(str(f))
        tensors[name] = make(tensors[name])
        save_file(tensors, str(f), metadata={"format": "pt"})
        return f

    return damage


def poke(name: str, value: float):
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t

    return rewrite(name, make)


def sharded(action):
    def damage(d: Path) -> Path:
        index_path = d / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3
        if action == "delete shard":
            (d / shards[1]).unlink()
            return d / shards[1]
        index["weight_map"][NORM] = "model-00099-of-00099.safetensors"
        index_path.write_text(json.dumps(index))
        return index_path

    return damage


def model_type(value):
    def damage(d: Path) -> Path:
        f = d / "config.json"
        raw = json.loads(f.read_text())
        raw["model_type"] = value
        f.write_text(json.dumps(raw))
        return f

    return damage


# name -> (which save, damage(dir) -> the file the error must name, the tensor it must name or None)
ATTACKS = {
    "truncate to 0 bytes": ("single", truncate(lambda b: 0), None),
    "truncate to 5 bytes": ("single", truncate(lambda b: 5), None),
    "truncate in the header": ("single", truncate(lambda b: 8 + header_len_of(b) // 2), None),
    "truncate after the header": ("single", truncate(lambda b: 8 + header_len_of(b) + 10), None),
    "truncate the last byte": ("single", truncate(lambda b: len(b) - 1), None),
    "flip header length byte 0": ("single", flip(lambda n: 0), None),
    "flip header length byte 5": ("single", flip(lambda n: 5), None),
    "flip header first byte": ("single", flip(lambda n: 8), None),
    "flip header byte at 1/3": ("single", flip(lambda n: 8 + n // 3), None),
    "flip header byte at 2/3": ("single", flip(lambda n: 8 + 2 * n // 3), None),
    "flip header last byte": ("single", flip(lambda n: 8 + n - 1), None),
    "wrong shape": ("single", rewrite(O_PROJ, lambda t: t[:, :-1].contiguous()), O_PROJ),
    "wrong rank": ("single", rewrite(NORM, lambda t: t[None]), NORM),
    "int64 weight": ("single", rewrite(O_PROJ, lambda t: t.to(torch.int64)), O_PROJ),
    "bool weight": ("single", rewrite(NORM, lambda t: t > 0), NORM),
    "complex weight": ("single", rewrite(NORM, lambda t: t.to(torch.complex64)), NORM),
    "NaN": ("single", poke(NORM, math.nan), NORM),
    "inf": ("single", poke(O_PROJ, math.inf), O_PROJ),
    "-inf": ("single", poke(O_PROJ, -math.inf), O_PROJ),
    "missing shard": ("sharded", sharded("delete shard"), None),
    "index names a missing file": ("sharded", sharded("missing file"), None),
    "model_type llama": ("single", model_type("llama"), None),
    "model_type deepseek": ("single", model_type("deepseek"), None),
    "model_type null": ("single", model_type(None), None),
}


def header_len_of(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("case", list(ATTACKS))
def test_damaged_checkpoint_gives_one_clear_error(case, saved, tmp_path, ledger):
    which, damage, tensor = ATTACKS[case]
    d = copy_of(saved[which], tmp_path / "ckpt")
    file = damage(d)
    try:
        from_pretrained(d)
    except CheckpointError as err:
        message = str(err)
        clear = "\n" not in message and file.name in message and (tensor is None or tensor in message)
        ledger.record("checkpoints", "clear_error" if clear else "crash", f"{case}: {message}")
        assert "\n" not in message, message
        assert file.name in message, message
        assert tensor is None or repr(tensor) in message, message
    except Exception as err:  # anything else is a crash
        ledger.record("checkpoints", "crash", f"{case}: {type(err).__name__}: {err}")
        raise
    else:
        ledger.record("checkpoints", "crash", f"{case}: loaded without an error")
        pytest.fail(f"{case}: the damaged checkpoint loaded")


def test_undamaged_copies_load(saved, tmp_path, ledger):
    reference = tiny_model().state_dict()
    for which, path in saved.items():
        model = from_pretrained(copy_of(path, tmp_path / which))
        same = all(torch.equal(model.state_dict()[n], t) for n, t in reference.items())
        ledger.record("checkpoints", "ok" if same else "data_lost", f"undamaged {which}")
        assert same


# ---- full disk -------------------------------------------------------------------------------------


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["shard write", "config write"])
def test_full_disk_during_save_pretrained_keeps_the_previous_checkpoint(where, saved, tmp_path, monkeypatch, ledger):
    target = copy_of(saved["sharded"], tmp_path / "ckpt")
    before = snapshot(target)
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    if where == "shard write":
        monkeypatch.setattr(ckpt_module, "write_file", disk_full)
    else:
        monkeypatch.setattr(ckpt_module, "write_json", disk_full)
    try:
        model.save_pretrained(target, max_shard_size="60KB")
    except OSError as err:
        clear = err.errno == errno.ENOSPC and "\n" not in str(err)
    else:
        clear = False
    intact = snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    ledger.record("faults", "clear_error" if clear and intact else ("data_lost" if not intact else "crash"), where)
    assert clear and intact
    monkeypatch.undo()
    from_pretrained(target)  # still loadable


def test_full_disk_during_a_training_checkpoint(tmp_path, monkeypatch, ledger, data_dir):
    from deepmoe.train.trainer import TrainingError, resume

    out = tmp_path / "run"
    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "cache"))
    assert cli(["--steps", "2", "--out", str(out), "--data", str(data_dir)]).returncode == 0
    before = snapshot(out / "step-2")
    last_before = (out / "last").read_text()
    monkeypatch.setattr(ckpt_module, "write_file", disk_full)
    try:
        resume(out, steps=3)
    except TrainingError as err:
        message = str(err)
        clear = "No space left" in message and "step-2" in message and "\n" not in message
    else:
        clear, message = False, "no error"
    intact = snapshot(out / "step-2") == before and (out / "last").read_text() == last_before
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    ok = intact and not leftovers and not (out / "step-3").exists()
    ledger.record("faults", "clear_error" if clear and ok else ("data_lost" if not ok else "crash"), message)
    assert clear, message
    assert ok, leftovers
    monkeypatch.undo()
    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "cache"))
    assert resume(out, steps=3).step == 3


# ---- SIGKILL at random moments -----------------------------------------------------------------------

STEPS = 6
FLAGS = [
    "--preset",
    "tiny-v3",
    "--layers",
    "1",
    "--hidden",
    "64",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--save-every",
    "1",
    "--eval-every",
    "0",
    "--vocab-size",
    "300",
    "--keep-last",
    "2",
    "--no-progress",
]

# Runs `deepmoe train`; with DEEPMOE_TEST_SLOW_STATE set, each training-state write first sleeps that long,
# so that a checkpoint's staging directory is certainly there to be killed in.
LAUNCHER = """
import os, sys, time
delay = float(os.environ.get("DEEPMOE_TEST_SLOW_STATE") or 0)
if delay:
    from deepmoe.train import checkpoint
    real = checkpoint.write_training_state
    def slow(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)
    checkpoint.write_training_state = slow
from deepmoe.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    words = "alpha beta gamma delta river stone cloud light night tree water fire moon sun bird fish".split()
    r = random.Random(0)
    for i in range(3):
        lines = (" ".join(r.choice(words) for _ in range(12)) + "." for _ in range(400))
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return root


def launch(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *FLAGS, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = launch(args, env)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def weights(step_dir: Path) -> bytes:
    return (step_dir / "model.safetensors").read_bytes()


def last_is_complete(out: Path) -> bool:
    try:
        step_dir = train_ckpt.read_last(out)
        if step_dir is None:
            return True  # killed before its first checkpoint: nothing was promised
        load_checkpoint(step_dir)
        train_ckpt.read_training_state(step_dir)
        return True
    except CheckpointError:
        return False


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir) -> tuple[bytes, float, Path]:
    root = tmp_path_factory.mktemp("reference")
    env = {"DEEPMOE_CACHE": str(root / "cache")}
    start = time.monotonic()
    done = cli(["--steps", str(STEPS), "--out", str(root / "run"), "--data", str(data_dir)], env)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    return weights(root / "run" / f"step-{STEPS}"), elapsed, root / "cache"


# (fraction of the reference wall time to sleep before the kill) or "write": kill inside a checkpoint write
KILLS = [0.45, 0.7, 0.9, "write"]


@pytest.mark.slow
@pytest.mark.parametrize("when", KILLS, ids=[str(k) for k in KILLS])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(when, reference_run, data_dir, tmp_path, ledger):
    reference, elapsed, cache = reference_run
    env = {"DEEPMOE_CACHE": str(cache)}  # tokenized once by the reference run
    out = tmp_path / "run"
    first = ["--steps", str(STEPS), "--out", str(out), "--data", str(data_dir)]
    killed_in_write = False
    if when == "write":
        proc = launch(first, {**env, "DEEPMOE_TEST_SLOW_STATE": "0.5"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # kill inside the second checkpoint write: step-1 is complete, step-2 is being staged
            if (out / "last").is_file() and any(p.name.startswith(".step-2.tmp-") for p in out.iterdir()):
                killed_in_write = True
                break
            time.sleep(0.01)
    else:
        proc = launch(first, env)
        time.sleep(elapsed * when)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    if when == "write":
        assert killed_in_write, "the staging directory never appeared"
    complete = last_is_complete(out)
    detail = f"SIGKILL at {when}: last={(out / 'last').read_text().strip() if (out / 'last').exists() else None}"
    if not complete:
        ledger.record("faults", "data_lost", detail)
    assert complete, detail
    if when == "write":
        assert (out / "last").read_text().strip() == "step-1"
        assert any(p.name.startswith(".step-") for p in out.iterdir())  # a staging leftover for resume to face

    for _ in range(3):
        if train_ckpt.read_last(out) is None:  # killed before the first checkpoint: start again
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            done = cli(first, env)
        else:
            done = cli(["--resume", str(out), "--steps", str(STEPS)], env)
        if done.returncode == 0:
            break
    else:
        ledger.record("faults", "crash", f"{detail}: resume failed: {done.stderr.strip()[-300:]}")
        pytest.fail(done.stderr)
    same = train_ckpt.read_last(out).name == f"step-{STEPS}" and weights(out / f"step-{STEPS}") == reference
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    ledger.record("faults", "data_lost" if not same else ("crash" if leftovers else "ok"), f"{detail} {leftovers}")
    assert same, detail
    assert not leftovers, leftovers


def test_resume_clears_every_temporary_a_kill_can_leave(tmp_path, ledger):
    """A kill can land inside any atomic write of a run: the staging checkpoint, `last`, the logs,
    the report or a plot. Only those temporaries go; complete files stay."""
    run = tmp_path / "run"
    (run / "step-1").mkdir(parents=True)
    (run / "last").write_text("step-1\n")
    (run / "report.json").write_text("{}")
    leftovers = [
        ".step-2.tmp-ab12",
        "..step-2.tmp-ab12.tmp-cd34",
        ".last.tmp-x1",
        ".report.json.tmp-y2",
        ".loss.png.tmp-z3",
        ".log.jsonl.tmp-w4",
        ".step-1.old-v5",
    ]
    for name in leftovers:
        (run / name).mkdir() if name.startswith((".step", "..step")) or ".old-" in name else (run / name).write_text("")
    train_ckpt.remove_stale_staging(run)
    left = sorted(p.name for p in run.iterdir())
    ledger.record("faults", "ok" if left == ["last", "report.json", "step-1"] else "crash", str(left))
    assert left == ["last", "report.json", "step-1"]
