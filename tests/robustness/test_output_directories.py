"""No command deletes or overwrites what it did not create: every command that writes a directory
refuses a non-empty target that is not its own kind of output (leaving every file as it was), and a
second process writing the same target while the first holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configs import tiny_model_config, tiny_preset
from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.io.files import OutputDirectoryError, claim_directory
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.tools.analyze_files import write_analysis
from deepmoe.tools.upcycle import upcycle
from deepmoe.train.trainer import TrainConfig, resume, train

# cpu_only: output directories and subprocesses
pytestmark = pytest.mark.cpu_only

VOCAB = 64
TESTS = Path(__file__).resolve().parents[1]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def thesis(tmp_path) -> Path:
    """A folder of the user's: a file and a subfolder that no command wrote."""
    folder = tmp_path / "mine"
    (folder / "chapters").mkdir(parents=True)
    (folder / "thesis.txt").write_text("four years of work\n")
    (folder / "chapters" / "one.txt").write_text("chapter one\n")
    return folder


def tiny_moe_config() -> DeepSeekConfig:
    moe = {"n_shared_experts": 2, "norm_topk_prob": False, "n_group": 1, "topk_group": 1}
    return tiny_model_config(vocab_size=VOCAB, moe=moe)


def save_model(path: Path, config: DeepSeekConfig, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    DeepSeekForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def parents(tmp_path) -> tuple[Path, Path]:
    return save_model(tmp_path / "a", tiny_moe_config(), 0), save_model(tmp_path / "b", tiny_moe_config(), 1)


def dense_checkpoint(path: Path) -> Path:
    config = tiny_preset(moe=None, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return save_model(path, config)


def random_corpus() -> StandInCorpus:
    g = torch.Generator().manual_seed(1)
    return StandInCorpus(torch.randint(0, VOCAB, (6000,), generator=g), torch.randint(0, VOCAB, (600,), generator=g))


def tiny_run(out: Path, **overrides) -> TrainConfig:
    options = dict(preset="tiny-v3", layers=2, hidden_size=64, seq_len=32, batch_size=4, steps=2, eval_every=0,
                   eval_batches=2, save_every=0, progress=False, out=str(out))  # fmt: skip
    return TrainConfig(**{**options, **overrides})


def refused(argv: list[str], capsys, *words: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


# ---- a foreign, non-empty target is refused and kept --------------------------------------------


def test_merge_refuses_a_foreign_directory(parents, thesis, capsys):
    before = snapshot(thesis)
    refused(["merge", *map(str, parents), "--weights", "0.5", "0.5", "--out", str(thesis)], capsys,
            "thesis.txt", "is not empty and is not a merged checkpoint")  # fmt: skip
    assert snapshot(thesis) == before


def test_merge_into_the_run_directory_of_its_parents_is_refused(tmp_path, capsys):
    """`merge runs/v3/step-30 runs/v3/step-40 --out runs/v3` used to leave only the merged model there."""
    run = tmp_path / "runs" / "v3"
    for step, seed in (("step-30", 0), ("step-40", 1)):
        save_model(run / step, tiny_moe_config(), seed)
    (run / "log.jsonl").write_text("{}\n")
    before = snapshot(run)
    refused(["merge", str(run / "step-30"), str(run / "step-40"), "--weights", "0.5", "0.5", "--out", str(run)],
            capsys, "overlaps a parent")  # fmt: skip
    assert snapshot(run) == before


def test_merge_replaces_its_own_output_and_refuses_the_current_directory(parents, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    for weights in (["0.5", "0.5"], ["0.25", "0.75"]):  # a rerun replaces what the first run wrote
        assert main(["merge", *map(str, parents), "--weights", *weights, "--out", str(out)]) == 0
    assert (out / "merge.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    refused(["merge", *map(str, parents), "--weights", "0.5", "0.5", "--out", "."], capsys, "current directory")
    assert list(empty.iterdir()) == []


def test_upcycle_refuses_a_foreign_directory_and_its_own_source(tmp_path, thesis, capsys):
    dense = dense_checkpoint(tmp_path / "dense")
    before, source = snapshot(thesis), snapshot(dense)
    refused(["upcycle", str(dense), "--experts-per-ffn", "4", "--out", str(thesis)], capsys, "thesis.txt")
    refused(["upcycle", str(dense), "--experts-per-ffn", "4", "--out", str(dense)], capsys, "is the dense checkpoint")
    assert snapshot(thesis) == before and snapshot(dense) == source
    for _ in range(2):  # its own output is replaced by a rerun
        assert upcycle(dense, tmp_path / "moe", experts_per_ffn=4).out == tmp_path / "moe"
    assert (tmp_path / "moe" / "upcycle.json").is_file()


def test_analysis_refuses_a_foreign_directory(thesis):
    before = snapshot(thesis)
    report = {"sources": {}, "layers": {}}
    with pytest.raises(OutputDirectoryError, match="is not empty and is not a routing analysis"):
        write_analysis(report, thesis)
    assert snapshot(thesis) == before


def test_study_refuses_a_foreign_directory(thesis, capsys):
    before = snapshot(thesis)
    refused(["study", "balancing", "--quick", "--out", str(thesis)], capsys, "is not a study directory")
    assert snapshot(thesis) == before


@pytest.mark.parametrize("command", [["train"], ["demo", "--steps", "1"]])
def test_training_refuses_a_foreign_directory(thesis, capsys, command):
    """A new run used to delete a report.json it found there, and write its logs beside the user's files."""
    (thesis / "report.json").write_text('{"mine": true}\n')
    before = snapshot(thesis)
    refused([*command, "--out", str(thesis)], capsys, "is not empty and is not a deepmoe run directory")
    assert snapshot(thesis) == before


def test_a_run_that_died_before_its_first_checkpoint_is_restarted(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text("{}\n")
    (out / "log.jsonl").write_text('{"step": 1}\n')
    result = train(tiny_run(out), random_corpus())
    assert result.step == 2 and len((out / "log.jsonl").read_text().splitlines()) == 2


# ---- a second process on the same target is refused --------------------------------------------


@pytest.mark.parametrize("command", ["merge", "upcycle", "study", "train", "esft"])
def test_a_target_held_by_another_process_is_refused(tmp_path, parents, capsys, command):
    out = tmp_path / "out"
    argv = {
        "merge": ["merge", *map(str, parents), "--weights", "0.5", "0.5", "--out", str(out)],
        "upcycle": ["upcycle", str(dense_checkpoint(tmp_path / "dense")), "--experts-per-ffn", "4", "--out", str(out)],
        "study": ["study", "balancing", "--quick", "--out", str(out)],
        "train": ["train", "--out", str(out)],
        "esft": ["esft", str(parents[0]), "--data", "bundled:code", "--out", str(out)],
    }[command]
    with claim_directory(out, "test"):  # what the other process holds while it writes
        refused(argv, capsys, "another process", f"pid {os.getpid()}")
    assert not out.exists()


def test_analysis_held_by_another_process_is_refused(tmp_path):
    with claim_directory(tmp_path / "out", "test"), pytest.raises(OutputDirectoryError, match="another process"):
        write_analysis({"sources": {}, "layers": {}}, tmp_path / "out")


@pytest.mark.slow
def test_two_training_runs_on_one_directory(tmp_path):
    """Both used to exit 0, their checkpoints and logs interleaved; now the second stops at once and the
    first finishes alone (a real second process, not a simulated lock)."""
    out = tmp_path / "run"
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from corpora import StandInCorpus; from deepmoe.train.trainer import TrainConfig, train;"
        "g = torch.Generator().manual_seed(1);"
        "c = StandInCorpus(torch.randint(0, 64, (6000,), generator=g), torch.randint(0, 64, (600,), generator=g));"
        "train(TrainConfig(preset='tiny-v3', layers=2, hidden_size=64, seq_len=32, batch_size=4, steps=400,"
        " eval_every=0, eval_batches=2, save_every=20, progress=False, out=sys.argv[2]), c)"
    )
    first = subprocess.Popen([sys.executable, "-c", script, str(TESTS), str(out)], stderr=subprocess.PIPE)
    try:

        def wait_for(name: str) -> None:
            deadline = time.monotonic() + 120
            while not (out / name).exists() or not (out / name).read_text():
                assert first.poll() is None, first.stderr.read().decode()
                assert time.monotonic() < deadline, f"the first run wrote no {name}"
                time.sleep(0.05)

        wait_for("log.jsonl")
        with pytest.raises(OutputDirectoryError, match=rf"another process \(pid {first.pid}\) is writing it"):
            train(tiny_run(out, seed=2), random_corpus())
        wait_for("last")
        with pytest.raises(OutputDirectoryError, match="another process"):
            resume(out, random_corpus(), steps=500)
    finally:
        first.kill()
        first.wait()
    assert '"seed": 0' in (out / "train_config.json").read_text()
