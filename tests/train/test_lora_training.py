"""`deepmoe train --lora-rank`: only the adapters train; the checkpoints hold the base bit for bit (routers'
selection bias included) and the adapter in PEFT's format; a resumed LoRA run equals an uninterrupted one."""

from __future__ import annotations

import argparse

import pytest
import torch

from corpora import StandInCorpus
from deepmoe.cli.train import add_arguments, options_from_args
from deepmoe.io import load_checkpoint
from deepmoe.io.adapter import read_adapter
from deepmoe.model import from_pretrained
from deepmoe.train import TrainConfig, resume, train
from deepmoe.train.trainer import ADAPTER_DIR

# cpu_only: the trainer: checkpoints on disk
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


def corpus() -> StandInCorpus:
    g = torch.Generator().manual_seed(1)
    return StandInCorpus(torch.randint(0, 64, (4000,), generator=g), torch.randint(0, 64, (400,), generator=g))


def options(out, **overrides):
    base = dict(seq_len=16, batch_size=4, steps=3, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=0, eval_batches=1,
                final_eval_batches=1, save_every=0, keep_last=0, seed=0, progress=False, out=str(out))  # fmt: skip
    return {**base, **overrides}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer tiny-v3 checkpoint trained for one step (its selection bias moved away from 0)."""
    out = tmp_path_factory.mktemp("lora_base")
    run = options(out / "run", preset="tiny-v3", layers=2, hidden_size=64, steps=1)
    return train(TrainConfig(**run), corpus()).checkpoint


def test_lora_run_trains_only_the_adapter_and_saves_it_beside_the_unchanged_base(base, tmp_path):
    config = TrainConfig(**options(tmp_path / "run", init_from=str(base), lora_rank=2, lora_alpha=4.0,
                                   lora_targets="experts,attention"))  # fmt: skip
    result = train(config, corpus())
    _, start = load_checkpoint(base)
    _, after = load_checkpoint(result.checkpoint)
    assert start.keys() == after.keys()
    for name in start:
        assert torch.equal(start[name], after[name]), name  # bit-identical, the routers' bias included
    adapter = read_adapter(result.checkpoint / ADAPTER_DIR)
    assert (adapter.rank, adapter.alpha, adapter.targets) == (2, 4.0, ("experts", "attention"))
    factors_b = [t for name, t in adapter.tensors.items() if name.endswith("lora_B")]
    assert factors_b and all(t.abs().sum() > 0 for t in factors_b)  # every B left its zero start
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = from_pretrained(base)(ids).logits
        tuned = from_pretrained(result.checkpoint, adapter=result.checkpoint / ADAPTER_DIR)(ids).logits
    assert not torch.allclose(plain, tuned)


def test_resumed_lora_run_equals_an_uninterrupted_one(base, tmp_path):
    lora = dict(init_from=str(base), lora_rank=2)
    straight = train(TrainConfig(**options(tmp_path / "straight", **lora)), corpus())
    train(TrainConfig(**options(tmp_path / "split", steps=2, save_every=1, **lora)), corpus())
    resumed = resume(tmp_path / "split", corpus(), steps=3)
    a = read_adapter(straight.checkpoint / ADAPTER_DIR).tensors
    b = read_adapter(resumed.checkpoint / ADAPTER_DIR).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_lora_flags_and_their_errors():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "experts,attention"])
    assert options_from_args(args) == {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "experts,attention"}
    with pytest.raises(ValueError, match=r"TrainConfig.lora_targets='experts,mlp' is invalid: .*experts, attention"):
        TrainConfig(lora_rank=2, lora_targets="experts,mlp")
    with pytest.raises(ValueError, match=r"TrainConfig.lora_rank=0 is invalid"):
        TrainConfig(lora_rank=0)
    with pytest.raises(ValueError, match=r"TrainConfig.lora_alpha=8 is invalid: needs lora_rank"):
        TrainConfig(lora_alpha=8)
