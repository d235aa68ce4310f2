"""Models from checkpoint files and back (`deepmoe.model.pretrained`): a HF folder, a training step's
directory and a run directory (its `last` step) all load, through the library and the command line;
a delta merged into a checkpoint equals the delta applied on load; `deepmoe.io` knows no model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import deepmoe
from configs import tiny_preset
from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.io import CheckpointError, checkpoint_dir, load_checkpoint, load_config
from deepmoe.io.checkpoint import LAST_NAME, read_last
from deepmoe.io.delta import merge_delta, save_delta
from deepmoe.model import DeepSeekForCausalLM, from_pretrained, save_pretrained
from deepmoe.train.trainer import TrainConfig, train

# cpu_only: from_pretrained on files, loaded to the CPU
pytestmark = pytest.mark.cpu_only

VOCAB = 64


def tiny_config() -> DeepSeekConfig:
    return tiny_preset(num_hidden_layers=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny training run: step-2 and step-4, `last` naming step-4."""
    out = tmp_path_factory.mktemp("run") / "run"
    g = torch.Generator().manual_seed(0)
    corpus = StandInCorpus(torch.randint(0, VOCAB, (3000,), generator=g), torch.randint(0, VOCAB, (300,), generator=g))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(
            TrainConfig(preset="tiny-v3", layers=2, hidden_size=64, seq_len=16, batch_size=2, steps=4, warmup_steps=1,
                        eval_every=0, save_every=2, keep_last=0, seed=0, progress=False, out=str(out)),
            corpus,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert (out / LAST_NAME).read_text().strip() == "step-4"
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_directory_means_its_newest_complete_step(run_dir):
    step = run_dir / "step-4"
    assert checkpoint_dir(run_dir) == read_last(run_dir) == step
    assert checkpoint_dir(step) == step  # a step (or HF) directory means itself
    assert same_weights(from_pretrained(run_dir), from_pretrained(step))
    assert same_weights(DeepSeekForCausalLM.from_pretrained(run_dir), from_pretrained(step))
    assert load_config(run_dir) == load_config(step)
    (_, state), (_, want) = load_checkpoint(run_dir), load_checkpoint(step)
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in state)


def test_commands_take_a_run_directory(run_dir, capsys):
    argv = ["--ids", "1", "2", "3", "--max-new-tokens", "4"]
    assert main(["generate", str(run_dir / "step-4"), *argv]) == 0
    want = capsys.readouterr().out.split()
    assert main(["generate", str(run_dir), *argv]) == 0
    assert capsys.readouterr().out.split() == want and len(want) == 4
    assert main(["inspect", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2


def test_a_bad_last_file_is_one_error_naming_it(tmp_path):
    (tmp_path / LAST_NAME).write_text("step-9\n")
    with pytest.raises(CheckpointError, match=r"last: names step-9, but .*step-9 does not exist"):
        from_pretrained(tmp_path)
    (tmp_path / LAST_NAME).write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="does not name a checkpoint directory"):
        load_config(tmp_path)
    (tmp_path / LAST_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):  # neither a checkpoint nor a run
        from_pretrained(tmp_path)


def test_save_and_load_through_every_public_name(tmp_path):
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config())
    assert deepmoe.save_pretrained is save_pretrained and deepmoe.from_pretrained == from_pretrained
    save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    loaded = deepmoe.from_pretrained(tmp_path / "a")
    assert type(loaded) is DeepSeekForCausalLM and not loaded.training
    assert same_weights(loaded, model) and same_weights(DeepSeekForCausalLM.from_pretrained(tmp_path / "b"), model)


def test_a_merged_delta_is_the_delta_applied_on_load(tmp_path):
    torch.manual_seed(0)
    base = DeepSeekForCausalLM(tiny_config())
    save_pretrained(base, tmp_path / "base")
    tuned = from_pretrained(tmp_path / "base")
    layer = min(tuned.moe_layers())
    with torch.no_grad():
        tuned.moe_layers()[layer].experts.down_proj[1].add_(0.5)
    save_delta(tuned, tmp_path / "base", tmp_path / "delta", {layer: [1]})
    merge_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "merged")
    assert same_weights(from_pretrained(tmp_path / "merged"), tuned)
    assert same_weights(from_pretrained(tmp_path / "base", delta=tmp_path / "delta"), tuned)


def test_io_imports_no_model():
    """One direction: deepmoe.model builds on deepmoe.io, never the other way round."""
    io_dir = Path(deepmoe.__file__).parent / "io"
    for path in sorted(io_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.startswith("deepmoe.model")], f"{path.name} imports {names}"
