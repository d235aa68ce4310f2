"""The scale-out commands as a user types them: `deepmoe data prepare`, `torchrun -m deepmoe train` on the prepared
data with 2 gloo ranks and the experts split over both, `--resume` of that run in one process, and `deepmoe
export` of its distributed checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# cpu_only: torchrun subprocesses over gloo
pytestmark = pytest.mark.cpu_only

SMALL = ["--preset", "tiny-v3", "--layers", "2", "--hidden", "64", "--seq-len", "16", "--batch-size", "4",
         "--warmup-steps", "1", "--eval-every", "0", "--final-eval-batches", "1", "--no-progress", "--device",
         "cpu"]  # fmt: skip


def deepmoe(*argv: str, ranks: int = 1) -> subprocess.CompletedProcess:
    # --standalone: torchrun binds a free port itself (a port picked here could be taken before it binds it)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    launcher = launcher if ranks > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "deepmoe", *argv], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_train_resume_on_one_process_and_export(tmp_path: Path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the experts route token {i % 37} to expert {i % 8}.\n\n" for i in range(3000)))
    deepmoe("data", "prepare", str(text), "--vocab-size", "300", "--heldout-fraction", "0.1", "--out",
            str(tmp_path / "data"), "--no-progress")  # fmt: skip
    run = tmp_path / "run"
    deepmoe("train", *SMALL, "--data", str(tmp_path / "data"), "--steps", "2", "--expert-parallel", "2", "--out",
            str(run), ranks=2)  # fmt: skip
    assert (run / "step-2" / "distributed").is_dir()
    report = json.loads((run / "report.json").read_text())
    assert (report["ranks"], report["expert_parallel"], report["data_parallel"]) == (2, 2, "fsdp")
    assert report["tokens_per_source"] == {str(tmp_path / "data"): 2 * 4 * 16}  # both ranks' rows, counted once
    deepmoe("train", "--resume", str(run), "--steps", "3", "--no-progress")  # one process: all experts here
    assert (run / "last").read_text().strip() == "step-3"
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    deepmoe("export", str(run / "step-2"), "--out", str(tmp_path / "hf"), "--dtype", "bf16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["torch_dtype"] == "bfloat16"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
