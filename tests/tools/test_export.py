"""`deepmoe export`: a distributed (DCP) training step, or an ordinary one, written as a HF checkpoint
that equals `save_checkpoint` of the same model and that transformers loads with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dcp_steps import perturbed_model, write_step
from deepmoe.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepmoe.io.distributed import DISTRIBUTED_DIR
from deepmoe.io.files import OutputDirectoryError
from deepmoe.tools.export import EXPORT_RECORD, export_checkpoint
from reference import transformers_logits

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.cpu_only,  # cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
]


@pytest.fixture(scope="module")
def model():
    return perturbed_model(0.05)


@pytest.fixture
def run(model, tmp_path):
    """A run directory whose newest step, step-3, is a 2-rank distributed checkpoint with a tokenizer."""
    run = tmp_path / "run"
    write_step(run / "step-3", model.config, model.state_dict(), ranks=2)
    (run / "step-3" / "tokenizer.json").write_text('{"model": {}}')
    (run / "step-3" / "training_state.json").write_text('{"distributed": {"world_size": 2}}')
    (run / "last").write_text("step-3\n")
    return run


def _files(directory, names):
    return {n: (directory / n).read_bytes() for n in names}


def test_export_equals_save_checkpoint_of_the_model(model, run, tmp_path):
    out = export_checkpoint(run, tmp_path / "out", max_shard_size="40KB")
    reference = save_checkpoint(model, None, tmp_path / "reference", max_shard_size="40KB")
    weights = sorted(p.name for p in reference.iterdir())
    assert len(weights) > 3 and "model.safetensors.index.json" in weights  # sharded
    assert sorted(p.name for p in out.iterdir()) == sorted([*weights, "tokenizer.json", EXPORT_RECORD])
    assert _files(out, weights) == _files(reference, weights)  # byte for byte, config.json included
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record == {"source": str((run / "step-3").resolve()), "step": 3, "distributed": True, "dtype": None}
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_export_casts_but_keeps_the_expert_bias_float32(model, tmp_path, dtype):
    source = model.to(torch.bfloat16) if dtype == torch.float32 else model
    try:
        state = source.state_dict()
        write_step(tmp_path / "step-1", source.config, state, ranks=2)
        out = export_checkpoint(tmp_path / "step-1", tmp_path / "out", dtype)
    finally:
        model.float()
    tensors = load_file(str(out / "model.safetensors"))
    biases = [n for n in tensors if n.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and {tensors.pop(n).dtype for n in biases} == {torch.float32}  # layer 1 and MTP
    assert {t.dtype for t in tensors.values()} == {dtype}
    expert = tensors["model.layers.1.mlp.experts.2.down_proj.weight"]
    assert torch.equal(expert, state["model.layers.1.mlp.experts.down_proj"][2].to(dtype))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert json.loads((out / EXPORT_RECORD).read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_transformers_loads_the_export_with_the_same_logits(model, run, tmp_path):
    out = export_checkpoint(run, tmp_path / "out")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    got = transformers_logits(out, ids)
    with torch.no_grad():
        want = model(ids).logits.double()
    assert float((got - want).norm() / want.norm()) < 1e-5
    config, state = load_checkpoint(out)  # and deepmoe reads it back exactly
    assert config == model.config and all(torch.equal(state[n], t) for n, t in model.state_dict().items())


def test_export_of_an_ordinary_checkpoint_and_re_export(model, tmp_path):
    source = save_checkpoint(model, None, tmp_path / "hf")
    out = export_checkpoint(source, tmp_path / "out", torch.bfloat16)
    assert json.loads((out / EXPORT_RECORD).read_text())["distributed"] is False
    _, state = load_checkpoint(out)
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight.detach().to(torch.bfloat16))
    export_checkpoint(source, out)  # its own earlier export is replaced
    assert load_checkpoint(out)[1]["lm_head.weight"].dtype == torch.float32


def test_export_refuses_a_foreign_or_overlapping_out_and_a_broken_source(run, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError, match="is not empty and is not a exported checkpoint"):
        export_checkpoint(run, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(OutputDirectoryError, match="overlaps the source checkpoint"):
        export_checkpoint(run, run)
    shard = sorted((run / "step-3" / DISTRIBUTED_DIR).iterdir())[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable distributed checkpoint"):
        export_checkpoint(run, tmp_path / "out")
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"'model.model.embed_tokens.weight' has shape \[32, 32\]"):
        export_checkpoint(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
