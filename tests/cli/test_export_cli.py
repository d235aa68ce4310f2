"""`deepmoe export` on the command line."""

from __future__ import annotations

import json

import pytest
import torch

from configs import tiny_model_config
from dcp_steps import write_step
from deepmoe.cli import main
from deepmoe.io.checkpoint import load_checkpoint
from deepmoe.model.decoder import DeepSeekForCausalLM

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.cpu_only,  # cpu_only: the export CLI: files on disk
]


def test_export_writes_a_bf16_checkpoint_and_refuses_a_foreign_out(tmp_path, capsys):
    model = DeepSeekForCausalLM(tiny_model_config())
    write_step(tmp_path / "run" / "step-1", model.config, model.state_dict(), ranks=2)
    (tmp_path / "run" / "last").write_text("step-1\n")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "export.json").read_text())["dtype"] == "bfloat16"
    state = load_checkpoint(tmp_path / "out")[1]
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight.detach().to(torch.bfloat16))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("x")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "other")]) == 1
    assert "is not empty" in capsys.readouterr().err
