"""`deepmoe train --preset tiny-v4`: DeepSeek-V4 (mHC, hash routing, CSA and HCA layers) trains on the CPU, and a
run stopped at step 10 and resumed to 20 ends with the weights of an uninterrupted 20-step run, bit for bit."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from deepmoe.model import from_pretrained

pytestmark = [pytest.mark.cpu_only, pytest.mark.slow]

RUN = ["--preset", "tiny-v4", "--seq-len", "64", "--batch-size", "4", "--save-every", "10", "--eval-every", "0",
       "--no-progress"]  # fmt: skip


def _train(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "deepmoe", "train", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_tiny_v4_trains_and_resumes_exactly(tmp_path):
    _train(*RUN, "--steps", "10", "--out", str(tmp_path / "stopped"))
    _train("--resume", str(tmp_path / "stopped"), "--steps", "20", "--no-progress")
    _train(*RUN, "--steps", "20", "--out", str(tmp_path / "straight"))
    resumed = from_pretrained(tmp_path / "stopped" / "step-20")
    straight = from_pretrained(tmp_path / "straight" / "step-20")
    assert resumed.config.model_type == "deepseek_v4"
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    ids = torch.randint(0, resumed.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = resumed(ids, labels=ids).lm_loss.item()
    assert math.isfinite(loss) and loss < math.log(resumed.config.vocab_size) + 1
