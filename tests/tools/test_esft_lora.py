"""ESFT with LoRA (`esft_lora_finetune`, `deepmoe esft --lora R`): adapters train on the selected experts only;
the base stays bit-identical, the other experts' factors exactly 0; the adapter directory loads on the base."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from corpora import byte_level_bpe
from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, get_preset, save_pretrained
from deepmoe.cli.esft import add_arguments, run
from deepmoe.io.adapter import read_adapter
from deepmoe.tools.esft import esft_lora_finetune

# cpu_only: the ESFT command on checkpoints on disk
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]

VOCAB = 64


def _config(vocab_size: int = VOCAB) -> DeepSeekConfig:
    return DeepSeekConfig.from_dict(
        {**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 3, "vocab_size": vocab_size}
    )


def test_only_the_selected_experts_get_trained_factors():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(_config()).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(3)]
    selection = {1: [0, 5, 11], 2: [7]}
    esft_lora_finetune(model, selection, batches, steps=3, rank=2, lr=1e-2, weight_decay=0.1)
    for name, t in model.state_dict().items():
        if "lora" not in name:
            assert torch.equal(t, base[name]), name
    experts = {layer: model.model.layers[layer].mlp.experts for layer in (1, 2)}
    for layer, chosen in selection.items():
        others = [e for e in range(experts[layer].n_experts) if e not in chosen]
        for proj in ("gate_up_proj", "down_proj"):
            a, b = experts[layer].lora_factors(proj)
            assert a[others].abs().sum() == 0 and b[others].abs().sum() == 0
            assert all(b[e].abs().sum() > 0 for e in chosen)
    assert not hasattr(model.model.layers[0].mlp, "experts")  # tiny-v3's first layer is dense: no adapter


def test_esft_lora_command_writes_an_adapter_that_loads_on_the_base(tmp_path, capsys):
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))
    (tmp_path / "task.py").write_text(text)
    tokenizer = byte_level_bpe(text)
    torch.manual_seed(0)
    checkpoint = save_pretrained(DeepSeekForCausalLM(_config(tokenizer.get_vocab_size())), tmp_path / "base")
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [str(checkpoint), "--data", str(tmp_path / "task.py"), "--out", str(tmp_path / "adapter"), "--steps", "2",
            "--lr", "1e-2", "--seq-len", "32", "--batch-size", "2", "--score-tokens", "256", "--p", "0.3",
            "--device", "cpu", "--json", "--no-progress", "--lora", "2", "--lora-alpha", "4"]  # fmt: skip
    assert run(parser.parse_args(argv)) == 0
    summary = json.loads(capsys.readouterr().out)
    adapter = read_adapter(tmp_path / "adapter")
    assert (adapter.rank, adapter.alpha, adapter.targets) == (2, 4.0, ("experts",))
    layers = sorted(int(k) for k, v in summary["selection"].items() if v)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == layers
    config = _config()
    hidden, inter = config.hidden_size, config.moe.moe_intermediate_size
    chosen = sum(len(v) for v in summary["selection"].values())
    assert summary["trainable_parameters"] == chosen * 2 * (hidden + 2 * inter + inter + hidden)
    assert summary["lora_rank"] == 2 and summary["delta_bytes"] < summary["checkpoint_bytes"] / 4
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = DeepSeekForCausalLM.from_pretrained(checkpoint)(ids).logits
        tuned = DeepSeekForCausalLM.from_pretrained(checkpoint, adapter=tmp_path / "adapter")(ids).logits
    assert not torch.allclose(plain, tuned)
    assert run(parser.parse_args([*argv[:4], str(checkpoint), *argv[5:]])) == 1  # --out the base: refused
    assert "is not a LoRA adapter" in capsys.readouterr().err
