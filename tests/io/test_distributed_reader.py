"""Distributed (DCP) checkpoints read in one process: the lazy reader, and load_checkpoint / read_last
on a multi-process run's step directories."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from configs import tiny_model_config
from dcp_steps import perturbed_model, write_step
from deepmoe.io.checkpoint import CheckpointError, checkpoint_dir, load_checkpoint, read_last
from deepmoe.io.distributed import DISTRIBUTED_DIR, DistributedCheckpoint, is_distributed_checkpoint
from deepmoe.model import from_pretrained

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.cpu_only,  # cpu_only: checkpoint files read to CPU tensors, gloo process groups
]


@pytest.fixture(scope="module")
def model():
    return perturbed_model(0.02)


@pytest.mark.parametrize("ranks", [1, 3])
def test_reader_gives_every_model_tensor_whole(model, tmp_path, ranks):
    state = model.state_dict()
    step = write_step(tmp_path / "step-5", model.config, state, ranks)
    assert is_distributed_checkpoint(step) and not is_distributed_checkpoint(tmp_path)
    tensors = DistributedCheckpoint(step)
    assert list(tensors) == sorted(state) and len(tensors) == len(state)  # no optimizer state
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert tensors.shape(name) == tuple(state[name].shape) and tensors.dtype(name) == torch.float32
    for name, t in state.items():
        assert torch.equal(tensors[name], t), name
    assert tensors[name] is tensors[name]  # the most recent tensor is kept, not read again


def test_reader_casts_but_keeps_the_expert_bias_float32(model, tmp_path):
    state = model.state_dict()
    tensors = DistributedCheckpoint(write_step(tmp_path / "step-1", model.config, state, ranks=2), torch.bfloat16)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert tensors.dtype(bias) == tensors[bias].dtype == torch.float32 and torch.equal(tensors[bias], state[bias])
    head = tensors["lm_head.weight"]
    assert tensors.dtype("lm_head.weight") == head.dtype == torch.bfloat16
    assert torch.equal(head, state["lm_head.weight"].to(torch.bfloat16))


def test_reader_errors_name_the_directory_and_tensor(model, tmp_path):
    with pytest.raises(CheckpointError, match="distributed checkpoint directory not found"):
        DistributedCheckpoint(tmp_path / "nowhere")
    step = write_step(tmp_path / "step-1", model.config, model.state_dict(), ranks=2)
    with pytest.raises(CheckpointError, match=r"has no tensor 'model\.nonsense'"):
        DistributedCheckpoint(step)["nonsense"]
    first, second = sorted((step / DISTRIBUTED_DIR).iterdir())
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{step / DISTRIBUTED_DIR}: not a readable distributed checkpoint"):
        DistributedCheckpoint(step)
    second.unlink()  # the last rank's rows are gone: shapes shrink (load_checkpoint then refuses them)
    assert DistributedCheckpoint(step).shape("lm_head.weight")[0] < model.config.vocab_size
    second.write_bytes(data)
    first.unlink()  # the first rank's rows are gone
    with pytest.raises(CheckpointError, match="only partly stored .*a rank's shard file is missing"):
        DistributedCheckpoint(step)


def test_load_checkpoint_and_from_pretrained_read_a_distributed_run(model, tmp_path):
    run = tmp_path / "run"
    write_step(run / "step-2", model.config, model.state_dict(), ranks=2)
    write_step(run / "step-4", model.config, model.state_dict(), ranks=3)
    (run / "last").write_text("step-4\n")
    assert checkpoint_dir(run) == read_last(run) == run / "step-4"
    config, state = load_checkpoint(run)
    assert config == model.config and state.keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pretrained(run).eval()(ids).logits, model(ids).logits)
    shutil.rmtree(run / "step-4")  # `last` names a deleted step: the newest complete one, a distributed one
    with pytest.warns(UserWarning, match="using step-2"):
        assert read_last(run) == run / "step-2"


def test_load_checkpoint_checks_a_distributed_step_against_its_config(model, tmp_path):
    state = dict(model.state_dict())
    del state["model.norm.weight"]
    step = write_step(tmp_path / "step-1", model.config, state)
    with pytest.raises(CheckpointError, match=r"does not match config.json: missing 1 tensor\(s\) 'model.norm.weight'"):
        load_checkpoint(step)
    other = tmp_path / "other"
    write_step(other, tiny_model_config(num_nextn_predict_layers=1, vocab_size=96), model.state_dict())
    with pytest.raises(CheckpointError, match=r"'model.model.embed_tokens.weight' has shape \[64, 32\], config"):
        load_checkpoint(other)
    bad = dict(model.state_dict())
    bad["model.norm.weight"] = torch.full_like(bad["model.norm.weight"], float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = write_step(tmp_path / "nan", model.config, bad)
    with pytest.raises(CheckpointError, match="tensor 'model.model.norm.weight' contains NaN"):
        load_checkpoint(step)
    assert torch.isnan(load_checkpoint(step, check_finite=False)[1]["model.norm.weight"]).all()
