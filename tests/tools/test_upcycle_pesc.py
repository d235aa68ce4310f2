"""PESC upcycling (docs/design.md#pesc-adapter-experts): a dense checkpoint becomes adapter experts on its shared,
frozen FFNs; the model computes the dense function at step 0 for any top-k, training changes only the adapters
and routers, and save → load keeps the logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.model import from_pretrained
from deepmoe.tools.upcycle import UPCYCLE_RECORD, trained_parameters, upcycle_pesc
from deepmoe.train.trainer import TrainConfig, train
from tools.test_upcycle import VOCAB, dense_config, relative_error, save_dense

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only

DEEPMOE_ONLY = "its experts are PESC adapters"


@pytest.mark.parametrize("model_type", ["deepseek", "deepseek_v3"])
def test_pesc_model_computes_the_dense_function_and_round_trips(tmp_path, model_type):
    dense = save_dense(
        tmp_path / "dense", dense_config(model_type, num_nextn_predict_layers=int(model_type == "deepseek_v3"))
    )
    with pytest.warns(UserWarning, match=DEEPMOE_ONLY):  # written as an HF model_type that cannot hold adapters
        result = upcycle_pesc(tmp_path / "dense", tmp_path / "pesc", experts=4, top_k=2, adapter_rank=3)
    assert result.function_preserved and result.relative_error < 1e-5
    record = json.loads((tmp_path / "pesc" / UPCYCLE_RECORD).read_text())
    assert record["pesc"] and record["experts"] == 4 and record["adapter_rank"] == 3
    pesc = from_pretrained(tmp_path / "pesc")
    moe = pesc.config.moe
    assert (moe.expert_adapter_rank, moe.n_routed_experts, moe.num_experts_per_tok) == (3, 4, 2)
    assert moe.n_shared_experts == 1 and moe.moe_intermediate_size == 64 and moe.norm_topk_prob
    assert set(pesc.moe_layers()) == set(range(pesc.config.num_hidden_layers + pesc.config.num_nextn_predict_layers))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert relative_error(pesc(ids).logits, dense(ids).logits) < 1e-5
    dense_state = dense.state_dict()
    for name, tensor in pesc.state_dict().items():  # each dense FFN is the shared expert, bit for bit
        if ".shared_experts." in name:
            assert torch.equal(tensor, dense_state[name.replace("shared_experts.", "")])

    with torch.no_grad():  # trained adapters: the model no longer computes the dense function
        for layer in pesc.moe_layers().values():
            layer.experts.adapter_up.normal_(0.0, 0.1)
        before = pesc(ids).logits
        assert relative_error(before, dense(ids).logits) > 1e-3
    with pytest.warns(UserWarning, match=DEEPMOE_ONLY):
        pesc.save_pretrained(tmp_path / "saved")
    stored = load_file(tmp_path / "saved" / "model.safetensors")
    assert stored["model.layers.0.mlp.experts.adapter_up"].shape == (4, 32, 3)  # stacked, deepmoe's names
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "saved")(ids).logits, before)


def test_training_changes_only_adapters_and_routers(tmp_path):
    """A few optimizer steps from the PESC checkpoint: adapters and routers move, every other tensor (dense FFNs,
    attention, embeddings, norms, head) is bit-identical."""
    torch.set_num_threads(1)
    save_dense(tmp_path / "dense", dense_config("deepseek"))
    with pytest.warns(UserWarning, match=DEEPMOE_ONLY):
        upcycle_pesc(tmp_path / "dense", tmp_path / "pesc", experts=4, top_k=2, adapter_rank=3)
    stream = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:23].repeat(40)
    corpus = StandInCorpus(stream[:800].clone(), stream[800:].clone())
    config = TrainConfig(seq_len=16, batch_size=2, steps=3, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1,
                         save_every=0, progress=False, init_from=str(tmp_path / "pesc"),
                         out=str(tmp_path / "run"))  # fmt: skip
    with pytest.warns(UserWarning, match=DEEPMOE_ONLY):
        run = train(config, corpus)
    start, end = from_pretrained(tmp_path / "pesc").state_dict(), from_pretrained(run.checkpoint).state_dict()
    assert start.keys() == end.keys()
    trained = {n for n in start if ".experts.adapter_" in n or n.endswith(".gate.weight")}
    assert len(trained) == 3 * 2  # adapter_down, adapter_up and the router of both layers
    for name in start:
        if name in trained:
            assert not torch.equal(start[name], end[name]), name
        else:
            assert torch.equal(start[name], end[name]), name
    assert trained_parameters(from_pretrained(tmp_path / "pesc").config) == sum(start[n].numel() for n in trained)


def test_cli_builds_a_pesc_model(tmp_path, capsys):
    save_dense(tmp_path / "dense", dense_config("deepseek"))
    args = ["upcycle", str(tmp_path / "dense"), "--pesc", "--experts", "4", "--top-k", "1", "--adapter-rank", "2"]
    assert main([*args, "--out", str(tmp_path / "pesc")]) == 0
    out = capsys.readouterr().out
    assert "4 adapter experts of rank 2 (top-1) on each shared FFN of width 64" in out
    assert "at step 0 the MoE model equals the dense model" in out
    # per layer: the router 4×32, the adapters 2·(4·2·32)
    assert f"training updates the adapters and routers only ({2 * (4 * 32 + 2 * 4 * 2 * 32):,} parameters)" in out
    assert from_pretrained(tmp_path / "pesc").config.moe.expert_adapter_rank == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pesc", "--experts", "4", "--top-k", "2"], "--adapter-rank is required with --pesc"),
        (["--pesc", "--adapter-rank", "2", "--top-k", "2"], "--experts is required with --pesc"),
        (["--pesc", "--experts", "4", "--adapter-rank", "2"], "--top-k is required with --pesc"),
        (
            ["--pesc", "--experts", "4", "--top-k", "2", "--adapter-rank", "2", "--shared", "1"],
            "--shared is invalid with --pesc",
        ),  # fmt: skip
        (["--experts-per-ffn", "4", "--adapter-rank", "2"], "--adapter-rank is invalid without --pesc"),
        (["--top-k", "2"], "--experts-per-ffn is required"),
        (
            ["--pesc", "--experts", "4", "--top-k", "5", "--adapter-rank", "2"],
            "--top-k 5 is invalid: must be in [1, experts=4]",
        ),  # fmt: skip
        (["--pesc", "--experts", "4", "--top-k", "2", "--adapter-rank", "0"], "--adapter-rank 0 is invalid"),
        (["--pesc", "--experts", "0", "--top-k", "1", "--adapter-rank", "2"], "--experts 0 is invalid"),
    ],
)
def test_bad_pesc_options_exit_with_one_message(tmp_path, capsys, args, message):
    save_dense(tmp_path / "dense", dense_config("deepseek"))
    assert main(["upcycle", str(tmp_path / "dense"), *args, "--out", str(tmp_path / "moe")]) == 1
    assert f"deepmoe upcycle: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_deepseek_layout_refuses_the_adapters(tmp_path, capsys):
    """DeepSeek's inference layout has no name for an adapter: converting to it fails, naming the tensor."""
    save_dense(tmp_path / "dense", dense_config("deepseek_v3"))
    with pytest.warns(UserWarning, match=DEEPMOE_ONLY):
        upcycle_pesc(tmp_path / "dense", tmp_path / "pesc", experts=4, top_k=2, adapter_rank=3)
    assert main(["convert", str(tmp_path / "pesc"), "--to", "deepseek", "--out", str(tmp_path / "ds")]) == 1
    assert "'model.layers.0.mlp.experts.adapter_down' has no name in DeepSeek's inference layout" in (
        capsys.readouterr().err
    )
