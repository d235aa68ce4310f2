"""Upcycling (S5): a dense deepmoe or Llama checkpoint becomes a fine-grained MoE with the same
function at step 0, and training from it beats training the same MoE from scratch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

from configs import tiny_preset
from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.io import load_config
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe import MoE, SwiGLU
from deepmoe.presets import get_preset
from deepmoe.tools.upcycle import upcycle, upcycle_state, upcycled_config
from deepmoe.train.trainer import TrainConfig, train

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only

VOCAB = 64


def dense_config(model_type: str = "deepseek_v3", **overrides) -> DeepSeekConfig:
    preset = {"deepseek": "tiny-deepseek-moe", "deepseek_v2": "tiny-v2", "deepseek_v3": "tiny-v3"}[model_type]
    fields = {"moe": None, "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    return tiny_preset(preset, **{**fields, **overrides})


def save_dense(path: Path, config: DeepSeekConfig, seed: int = 0) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("model_type", ["deepseek", "deepseek_v2", "deepseek_v3"])
def test_upcycled_model_computes_the_dense_function(tmp_path, model_type):
    dense = save_dense(
        tmp_path / "dense", dense_config(model_type, num_nextn_predict_layers=int(model_type == "deepseek_v3"))
    )
    result = upcycle(tmp_path / "dense", tmp_path / "moe", experts_per_ffn=4, shared=1)
    assert result.function_preserved and result.relative_error < 1e-5
    moe = from_pretrained(tmp_path / "moe")
    assert moe.config.moe.n_routed_experts == 3 and moe.config.moe.moe_intermediate_size == 16
    assert set(moe.moe_layers()) == set(range(moe.config.num_hidden_layers + moe.config.num_nextn_predict_layers))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert relative_error(moe(ids).logits, dense(ids).logits) < 1e-5
        if model_type == "deepseek_v3":  # the MTP block was upcycled too
            labels = ids
            assert relative_error(moe(ids, labels=labels).mtp_logits[0], dense(ids, labels=labels).mtp_logits[0]) < 1e-5


@pytest.mark.parametrize("replicas", [1, 3])
def test_one_upcycled_layer_equals_the_dense_ffn(replicas):
    config = dense_config("deepseek", num_hidden_layers=1)
    torch.manual_seed(0)
    ffn = SwiGLU(32, 64)
    state = {f"model.layers.0.mlp.{n}": t for n, t in ffn.state_dict().items()}
    moe_config = upcycled_config(config, experts_per_ffn=8, shared=2, replicas=replicas)
    upcycled = upcycle_state(config, state, moe_config)
    layer = MoE(moe_config.moe)
    layer.load_state_dict({k.removeprefix("model.layers.0.mlp."): v for k, v in upcycled.items()})
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert relative_error(layer(x).hidden_states, ffn(x)) < 1e-6
    assert moe_config.moe.n_routed_experts == 6 * replicas and layer.shared_experts.up_proj.weight.shape == (16, 32)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_checkpoint_upcycles_with_the_same_logits(tmp_path, tied):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, rope_theta=500.0)  # fmt: skip
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path / "llama")
    result = upcycle(tmp_path / "llama", tmp_path / "moe", experts_per_ffn=3, shared=1, keep_dense=1)
    assert result.relative_error < 1e-5
    moe = from_pretrained(tmp_path / "moe")
    assert moe.config.model_type == "deepseek" and set(moe.moe_layers()) == {1}
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert relative_error(moe(ids).logits, llama(ids).logits) < 1e-5


def test_sparse_top_k_and_noise_do_not_preserve_the_function(tmp_path, capsys):
    save_dense(tmp_path / "dense", dense_config())
    code = main(["upcycle", str(tmp_path / "dense"), "--experts-per-ffn", "8", "--shared", "2", "--top-k", "2",
                 "--out", str(tmp_path / "sparse")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "does NOT compute the dense function" in out
    router = from_pretrained(tmp_path / "sparse").moe_layers()[0].gate.weight
    assert router.abs().sum() > 0  # random, so that tokens spread over the experts
    noisy = upcycle(tmp_path / "dense", None, experts_per_ffn=4, replicas=2, noise=0.01)
    assert not noisy.function_preserved and 1e-5 < noisy.relative_error < 0.1
    assert main(["upcycle", str(tmp_path / "dense"), "--experts-per-ffn", "4", "--out", str(tmp_path / "full")]) == 0
    assert "equals the dense model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experts-per-ffn", "5"], "--experts-per-ffn 5 is invalid: must divide the FFN width intermediate_size=64"),
        (["--experts-per-ffn", "4", "--shared", "4"], "--shared 4 is invalid"),
        (["--experts-per-ffn", "4", "--top-k", "5"], r"--top-k 5 is invalid: must be in [1, routed experts=4]"),
        (["--experts-per-ffn", "4", "--keep-dense", "2"], "--keep-dense 2 is invalid"),
        (["--experts-per-ffn", "4", "--noise", "-1"], "--noise -1.0 is invalid"),
    ],
)
def test_bad_options_exit_with_one_message(tmp_path, capsys, args, message):
    save_dense(tmp_path / "dense", dense_config())
    assert main(["upcycle", str(tmp_path / "dense"), *args, "--out", str(tmp_path / "moe")]) == 1
    assert f"deepmoe upcycle: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_moe_checkpoint_is_refused(tmp_path, capsys):
    config = dataclasses.replace(get_preset("tiny-v3"), num_hidden_layers=2, vocab_size=VOCAB)
    DeepSeekForCausalLM(config).save_pretrained(tmp_path / "moe_in")
    assert main(["upcycle", str(tmp_path / "moe_in"), "--experts-per-ffn", "4", "--out", str(tmp_path / "x")]) == 1
    assert "is already an MoE model" in capsys.readouterr().err


def test_training_from_the_upcycled_model_beats_training_from_scratch(tmp_path):
    """Dense 40 steps, upcycle to top-2 of 6 routed + 2 shared, then 15 steps vs 15 from random init."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    stream = torch.randperm(VOCAB, generator=g)[:23].repeat(400)  # a learnable stream
    corpus = StandInCorpus(stream[:8000].clone(), stream[8000:9000].clone())
    common = dict(seq_len=32, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=2,
                  save_every=0, progress=False)  # fmt: skip
    shape = dict(preset="tiny-deepseek-moe", layers=2, hidden_size=32)  # init_from takes the shape from the model
    dense = train(TrainConfig(**common, **shape, steps=40, model_overrides={"moe": None}, out=str(tmp_path / "dense")),
                  corpus)  # fmt: skip
    upcycle(dense.checkpoint, tmp_path / "upcycled", experts_per_ffn=8, shared=2, top_k=2)
    config = load_config(tmp_path / "upcycled")
    overrides = {k: v for k, v in config.to_dict().items() if k not in ("vocab_size", "eos_token_id")}
    after = train(
        TrainConfig(**common, steps=15, init_from=str(tmp_path / "upcycled"), out=str(tmp_path / "a")), corpus
    )
    scratch = train(
        TrainConfig(**common, **shape, steps=15, model_overrides=overrides, out=str(tmp_path / "s")), corpus
    )
    assert load_config(scratch.checkpoint) == load_config(after.checkpoint) == config  # the same MoE model
    assert after.report["heldout_loss"] < scratch.report["heldout_loss"] - 0.5
