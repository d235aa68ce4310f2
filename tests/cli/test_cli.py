"""The `deepmoe` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepmoe.cli import main

# cpu_only: the CLI, run in-process and in subprocesses, on checkpoints on disk
pytestmark = pytest.mark.cpu_only


def test_demo_prints_the_load_table(capsys):
    assert main(["balance-demo", "--steps", "200", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "MaxVio" in out and "bias b_i" in out
    before, after = (float(v) for v in out.split("MaxVio │")[1].split("│")[1:3])
    assert before > 1.0 and after < 0.2


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["balance-demo", "--tokens", "x"], ["nonsense"], []])
def test_bad_arguments_exit_2_with_one_line(argv):
    result = subprocess.run([sys.executable, "-m", "deepmoe", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("deepmoe")


def test_invalid_config_value_is_one_line_exit_1():
    result = subprocess.run(
        [sys.executable, "-m", "deepmoe", "balance-demo", "--gamma", "-1"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "deepmoe balance-demo: error: MoEConfig.bias_update_speed=-1.0 is invalid: must be a finite number >= 0"
    )


def test_generate_streams_tokens_from_a_checkpoint(tmp_path, capsys):
    import torch

    from configs import tiny_preset
    from deepmoe import DeepSeekForCausalLM

    config = tiny_preset(num_hidden_layers=2)
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    prompt = [5, 17, 42]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=6)[0, 3:].tolist()

    assert main(["generate", str(tmp_path), "--ids", *map(str, prompt), "--max-new-tokens", "6"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want
    assert main(["generate", str(tmp_path), "--ids", *map(str, prompt), "--max-new-tokens", "6", "--speculative"]) == 0
    out = capsys.readouterr().out
    assert [int(t) for t in out.split("[")[0].split()] == want and "MTP drafts accepted" in out


def test_generate_refuses_a_prompt_without_tokenizer(tmp_path, capsys):
    from deepmoe import DeepSeekForCausalLM, get_preset

    DeepSeekForCausalLM(get_preset("tiny-v3")).save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "hello"]) == 1
    assert "tokenizer.json not found" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_reports_and_samples(tmp_path, capsys):
    """The README's main job, cut to 2 steps: bundled corpus → run dir with report and plots → samples."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "sample from 'ROMEO:\\n'" in printed and "def fibonacci(n):" in printed
    assert {"report.json", "loss.png", "expert_load.png", "last", "step-2"} <= {p.name for p in out.iterdir()}
    # a second call continues the finished run: nothing to train, the report is shown again
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    assert "training report" in capsys.readouterr().out


def test_generate_with_a_steering_file_uses_the_masks(tmp_path, capsys):
    import json

    import torch

    from configs import tiny_preset
    from deepmoe import DeepSeekForCausalLM
    from deepmoe.tools.steering_file import apply_steering

    config = tiny_preset(num_hidden_layers=2)
    torch.manual_seed(0)
    DeepSeekForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    plan = {"format": "deepmoe-steering", "version": 1, "action": "disable", "layers": {"1": [0, 1, 2, 3, 4, 5]}}
    (tmp_path / "steer.json").write_text(json.dumps(plan))
    steered = DeepSeekForCausalLM.from_pretrained(tmp_path / "ckpt")
    apply_steering(steered, tmp_path / "steer.json")
    want = steered.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=6)[0, 3:].tolist()

    argv = ["generate", str(tmp_path / "ckpt"), "--ids", "5", "17", "42", "--max-new-tokens", "6"]
    assert main([*argv, "--steer", str(tmp_path / "steer.json")]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want
