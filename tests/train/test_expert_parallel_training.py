"""D1 training: a 2-rank expert-parallel run (gloo, `expert_parallel=2`) follows the 1-process run with the
same options and global batch — per-step losses, gradient norms and the final weights — and its checkpoints
are ordinary full ones, which a run with another number of ranks resumes.

tiny-v3 (sigmoid, noaux_tc, selection bias, sequence-wise loss), cut to 2 layers of width 64 with its MTP
module: nothing in it depends on how the batch is split, so the two runs compute the same thing. AdamW's ε
is 1e-3: with a tiny ε, g/(√v + ε) turns the float rounding of nearly cancelling gradient entries (summed
in another order over two ranks) into whole learning-rate steps, and the weights would differ by ~1e-3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from corpora import StandInCorpus

VOCAB = 64


def corpus() -> StandInCorpus:
    g = torch.Generator().manual_seed(0)
    stream = torch.randperm(VOCAB, generator=g)[:23].repeat(200)
    return StandInCorpus(stream[:4000].clone(), stream[4000:4600].clone())


def options(out: Path, **overrides) -> dict:
    base = dict(
        preset="tiny-v3", layers=2, hidden_size=64, seq_len=16, batch_size=4, steps=4, lr=1e-2, min_lr=1e-3,
        warmup_steps=1, eps=1e-3, eval_every=2, eval_batches=2, save_every=2, keep_last=0, seed=0, progress=False,
        out=str(out),
    )  # fmt: skip
    return {**base, **overrides}


def worker(mode: str, out: str) -> None:
    """One rank of a 2-rank run: "train" a run from scratch, or "resume" one to 6 steps."""
    import torch.distributed as dist

    from deepmoe.train.trainer import TrainConfig, resume, train
    from distributed import write_result

    torch.set_num_threads(1)
    run = Path(out) / "ep"
    if mode == "train":
        result = train(TrainConfig(**options(run, expert_parallel=2)), corpus())
    else:
        result = resume(Path(out) / "single", corpus(), steps=6, expert_parallel=2)
    write_result(out, dist.get_rank(), {"step": result.step, "checkpoint": str(result.checkpoint)})
    dist.barrier()
    dist.destroy_process_group()


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process run, 2-rank run) of the same options, both 4 steps with checkpoints at 2 and 4."""
    from deepmoe.train.trainer import TrainConfig, train
    from distributed import launch

    root = tmp_path_factory.mktemp("ep-train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**options(root / "single")), corpus())
    finally:
        torch.set_num_threads(threads)
    ranks = launch(2, __file__, ["train"], root, timeout=240)
    assert [r["step"] for r in ranks] == [4, 4]
    return root / "single", root / "ep"


@pytest.mark.slow
def test_two_ranks_follow_one_process(runs):
    """Same losses, gradient norms and bias updates every step, same weights at the end (float32, < 1e-5)."""
    single, ep = runs
    one, two = read_log(single), read_log(ep)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        assert b["maxvio"] == pytest.approx(a["maxvio"], rel=1e-6)
        assert b["tokens"] == a["tokens"]
        assert b["comm_bytes_per_rank"] > 0
    from deepmoe.io import load_checkpoint

    _, w1 = load_checkpoint(single / "step-4")
    _, w2 = load_checkpoint(ep / "step-4")
    assert w1.keys() == w2.keys()
    errors = {name: relative_error(w2[name], w1[name]) for name in w1}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    e1 = [json.loads(line) for line in (single / "eval.jsonl").read_text().splitlines()]
    e2 = [json.loads(line) for line in (ep / "eval.jsonl").read_text().splitlines()]
    assert [r["heldout_loss"] for r in e2] == pytest.approx([r["heldout_loss"] for r in e1], rel=1e-5)
    report = json.loads((ep / "report.json").read_text())
    assert report["expert_parallel"] == 2 and report["comm_bytes_per_step_per_rank"] > 0


@pytest.mark.slow
def test_resume_with_another_number_of_ranks(runs, tmp_path):
    """The 1-process run's checkpoint (full weights and optimizer state) continues on 2 ranks."""
    import shutil

    from distributed import launch

    single, _ = runs
    shutil.copytree(single, tmp_path / "single")
    ranks = launch(2, __file__, ["resume"], tmp_path, timeout=240)
    assert [r["step"] for r in ranks] == [6, 6]
    log = read_log(tmp_path / "single")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_expert_parallel_needs_torchrun(tmp_path):
    """expert_parallel=2 in a plain process: one clear error naming the option and the launch command."""
    from deepmoe.train.trainer import TrainConfig, train

    with pytest.raises(ValueError, match=r"expert_parallel=2 is invalid.*torchrun --nproc-per-node 2"):
        train(TrainConfig(**options(tmp_path / "run", expert_parallel=2)), corpus())
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(**options(tmp_path / "run", expert_parallel=3))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
