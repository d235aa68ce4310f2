"""Resuming and loading from a run directory whose `last` names a deleted step, and `--resume` given a
step directory instead of its run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.io.checkpoint import CheckpointError, checkpoint_dir, read_last
from deepmoe.train import TrainConfig, resume, train

# cpu_only: the trainer's checkpoints on disk
pytestmark = pytest.mark.cpu_only


def corpus() -> StandInCorpus:
    g = torch.Generator().manual_seed(1)
    return StandInCorpus(torch.randint(0, 64, (6000,), generator=g), torch.randint(0, 64, (600,), generator=g))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run with checkpoints at steps 2 and 4 (`last` names step-4)."""
    out = tmp_path / "run"
    config = TrainConfig(
        preset="tiny-v3", layers=2, hidden_size=64, seq_len=32, batch_size=4, steps=4, lr=1e-2, warmup_steps=1,
        eval_every=0, eval_batches=1, save_every=2, keep_last=0, progress=False, out=str(out),
    )  # fmt: skip
    train(config, corpus())
    assert read_last(out) == out / "step-4" and (out / "step-2").is_dir()
    return out


def test_a_deleted_last_step_falls_back_to_the_newest_complete_one(run_dir):
    shutil.rmtree(run_dir / "step-4")
    (run_dir / ".step-6.tmp-x").mkdir()  # a staging directory is never a checkpoint
    with pytest.warns(UserWarning, match="names step-4, which does not exist: using step-2"):
        assert checkpoint_dir(run_dir) == run_dir / "step-2"
    with pytest.warns(UserWarning, match="using step-2"):
        result = resume(run_dir, corpus(), steps=4)
    assert result.step == 4 and read_last(run_dir) == run_dir / "step-4"


def test_no_complete_step_left_is_an_error(run_dir):
    shutil.rmtree(run_dir / "step-4")
    shutil.rmtree(run_dir / "step-2")
    with pytest.raises(CheckpointError, match="step-4 does not exist"):
        read_last(run_dir)


def test_resume_a_step_directory_names_the_run_directory(run_dir, capsys):
    with pytest.raises(ValueError, match=r"step-2 is a checkpoint of the run .*run: resume the run directory"):
        resume(run_dir / "step-2", corpus())
    assert main(["train", "--resume", str(run_dir / "step-2")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"resume the run directory ({run_dir})" in err
