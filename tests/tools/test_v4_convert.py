"""`deepmoe convert` on DeepSeek-V4: HF -> DeepSeek's layout with FP4 experts -> HF gives the model whose experts
went through FP4 (its dequantised twin, computed here in memory); without --fp4-experts the round trip gives the
same bytes (V4, and V3.2 with its indexer); FP4 stays FP4 between DeepSeek directories."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from configs import v4_config, v32_config
from deepmoe.cli import main
from deepmoe.io.fp4 import dequantize_fp4, quantize_fp4
from deepmoe.model import from_pretrained, save_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.tools.convert import convert_checkpoint
from reference import randomise_parameters

pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]  # checkpoints on disk, the CLI


@pytest.fixture(scope="module")
def v4_checkpoint(tmp_path_factory):
    config = v4_config(intermediate_size=32, moe={"moe_intermediate_size": 32})  # FP4 rows of whole 32-blocks
    model = DeepSeekForCausalLM(config).eval()
    randomise_parameters(model, seed=5)
    path = tmp_path_factory.mktemp("v4") / "hf"
    save_pretrained(model, path)
    return path, model


def test_fp4_round_trip_through_deepseeks_layout_gives_the_dequantised_twin(v4_checkpoint, tmp_path):
    path, model = v4_checkpoint
    code = main(["convert", str(path), "--out", str(tmp_path / "ds"), "--to", "deepseek", "--model-parallel", "2",
                 "--fp4-experts"])  # fmt: skip
    assert code == 0
    with safe_open(tmp_path / "ds" / "model0-mp2.safetensors", "pt") as f:
        assert f.get_slice("layers.2.ffn.experts.0.w1.weight").get_dtype() == "I8"
    convert_checkpoint(tmp_path / "ds", tmp_path / "ds2", "deepseek")  # FP4 copied as it is
    with safe_open(tmp_path / "ds2" / "model0-mp1.safetensors", "pt") as f:
        assert f.get_slice("layers.2.ffn.experts.3.w2.scale").get_dtype() == "F8_E8M0"
    convert_checkpoint(tmp_path / "ds2", tmp_path / "back", "hf", dtype=torch.float32)
    stored = load_file(tmp_path / "back" / "model.safetensors")
    assert not any(n.endswith("_scale_inv") for n in stored)

    twin = DeepSeekForCausalLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(dequantize_fp4(*quantize_fp4(p), dtype=torch.float32))
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(6))
        assert torch.equal(from_pretrained(tmp_path / "back")(ids).logits, twin(ids).logits)


def test_round_trip_without_fp4_gives_the_same_bytes(v4_checkpoint, tmp_path):
    path, _ = v4_checkpoint
    convert_checkpoint(path, tmp_path / "ds", "deepseek", model_parallel=2)
    convert_checkpoint(tmp_path / "ds", tmp_path / "back", "hf")
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(before[n].dtype == after[n].dtype and torch.equal(before[n], after[n]) for n in before)


def test_fp4_experts_only_to_deepseeks_layout(v4_checkpoint, tmp_path):
    path, _ = v4_checkpoint
    with pytest.raises(ValueError, match="--fp4-experts: only --to deepseek"):
        convert_checkpoint(path, tmp_path / "hf", "hf", fp4_experts=True)


def test_v32_indexer_round_trips_through_deepseeks_layout(tmp_path):
    model = DeepSeekForCausalLM(v32_config()).eval()
    randomise_parameters(model, seed=7)
    save_pretrained(model, tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "ds", "deepseek", model_parallel=2)
    with safe_open(tmp_path / "ds" / "model1-mp2.safetensors", "pt") as f:  # whole on every rank
        assert f.get_slice("layers.0.attn.indexer.wq_b.weight").get_shape() == [8 * 16, 24]
        assert "layers.0.attn.indexer.k_norm.bias" in f.keys()
    convert_checkpoint(tmp_path / "ds", tmp_path / "back", "hf")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(before[n].dtype == after[n].dtype and torch.equal(before[n], after[n]) for n in before)
