"""`deepmoe merge-adapter`: base + adapter → an ordinary checkpoint whose logits, in deepmoe and in transformers,
equal the base model with the adapter (`from_pretrained(base, adapter=...)`); outputs it must not write."""

from __future__ import annotations

import json

import pytest
import torch

from configs import tiny_model_config
from deepmoe import DeepSeekForCausalLM
from deepmoe.cli import main
from deepmoe.model.lora import LoRAConfig, apply_lora, save_adapter
from deepmoe.tools.merge_adapter import MERGE_ADAPTER_RECORD
from reference import randomise_parameters, transformers_logits

# cpu_only: the CLI on checkpoints on disk
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base dir, adapter dir): a randomised tiny V3 model, and an adapter on its experts and attention."""
    root = tmp_path_factory.mktemp("merge_adapter")
    model = DeepSeekForCausalLM(tiny_model_config()).eval()
    randomise_parameters(model, seed=0)
    model.save_pretrained(root / "base")
    (root / "base" / "tokenizer.json").write_text('{"model": {}}')
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("experts", "attention")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    save_adapter(model, root / "adapter")
    return root / "base", root / "adapter"


def test_merged_checkpoint_equals_base_plus_adapter_in_deepmoe_and_transformers(saved, tmp_path, capsys):
    base, adapter = saved
    assert main(["merge-adapter", str(base), str(adapter), "--out", str(tmp_path / "out")]) == 0
    assert "merged 20 LoRA factors (rank 2, alpha 4" in capsys.readouterr().out
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = DeepSeekForCausalLM.from_pretrained(base, adapter=adapter)(ids).logits.double()
        plain = DeepSeekForCausalLM.from_pretrained(base)(ids).logits.double()
        merged = DeepSeekForCausalLM.from_pretrained(tmp_path / "out")(ids).logits.double()
    assert float((want - plain).norm() / want.norm()) > 1e-2  # the adapter changes the function
    assert float((merged - want).norm() / want.norm()) < 1e-5
    assert float((transformers_logits(tmp_path / "out", ids) - want).norm() / want.norm()) < 1e-5
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}'
    record = json.loads((tmp_path / "out" / MERGE_ADAPTER_RECORD).read_text())
    assert record["targets"] == ["experts", "attention"] and record["rank"] == 2
    # its own earlier output may be replaced
    assert main(["merge-adapter", str(base), str(adapter), "--out", str(tmp_path / "out")]) == 0


def test_refuses_outputs_it_did_not_create(saved, tmp_path, capsys):
    base, adapter = saved
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["merge-adapter", str(base), str(adapter), "--out", str(tmp_path / "mine")]) == 1
    assert "is not empty and is not a merged checkpoint" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["merge-adapter", str(base), str(adapter), "--out", str(base)]) == 1
    assert "is an input" in capsys.readouterr().err
    assert main(["merge-adapter", str(base), str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    assert "adapter directory not found" in capsys.readouterr().err
