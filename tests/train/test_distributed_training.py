"""D2 training on several ranks (gloo processes launched like torchrun): FSDP2 over 4 ranks with the routed
experts split over 2 (`expert_parallel=2`) follows the 1-process run with the same options and global batch —
per-step losses, gradient norms, MaxVio, held-out losses and the final weights; each rank holds about a quarter
of the parameters, gradients and optimizer state; its distributed checkpoints resume bitwise on the same layout,
continue on 2 ranks and on 1 process, export to an HF checkpoint with the model's logits, and survive a rank
killed in the middle of a save.

tiny-v3 (sigmoid, noaux_tc, selection bias, sequence-wise loss), cut to 2 layers of width 64 with its MTP
module: nothing in it depends on how the batch is split, so the runs compute the same thing. AdamW's ε is 1e-3:
with a tiny ε, g/(√v + ε) turns the float rounding of nearly cancelling gradient entries (summed in another
order over the ranks) into whole learning-rate steps, and the weights would differ by ~1e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from corpora import StandInCorpus

VOCAB = 64
# cpu_only: gloo process groups in subprocesses
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


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


def rewind(run: Path, step: int, to: Path) -> Path:
    """A copy of `run` as it was after its checkpoint of `step` (later checkpoints removed, `last` names it)."""
    shutil.copytree(run, to)
    for entry in to.glob("step-*"):
        if int(entry.name.split("-")[1]) > step:
            shutil.rmtree(entry)
    (to / "last").write_text(f"step-{step}\n")
    return to


def worker(mode: str, out: str) -> None:
    """One rank: "train4" a 4-rank run from scratch (E=2); "resume4" its copy rewound to step 2, on the same
    layout; "more" (2 ranks): the copy rewound to step 2 to 4 steps (E=2), then the 1-process run to 6 (E=1);
    "kill" (2 ranks): a run whose rank 1 dies while writing its second checkpoint."""
    import torch.distributed as dist

    from deepmoe.train.trainer import TrainConfig, TrainingError, resume, train
    from distributed import write_result

    torch.set_num_threads(1)
    root, rank = Path(out), int(os.environ["RANK"])
    if mode == "train4":
        result = train(TrainConfig(**options(root / "ep4", expert_parallel=2)), corpus())
    elif mode == "resume4":
        result = resume(root / "again", corpus())
    elif mode == "more":
        result = resume(root / "on2", corpus(), expert_parallel=2)
        resume(root / "single", corpus(), steps=6, expert_parallel=1)
    else:
        import deepmoe.train.distributed as distributed

        save_sharded = distributed.save_sharded

        def dies_at_step_2(path, model, optimizer):
            if rank == 1 and "step-2" in str(path):
                write_result(out, rank, {"killed": True})
                os._exit(0)  # a rank gone in the middle of a save (no cleanup, no goodbye to the others)
            return save_sharded(path, model, optimizer)

        distributed.save_sharded = dies_at_step_2
        try:
            train(TrainConfig(**options(root / "killed", steps=3, save_every=1)), corpus())
        except TrainingError as err:
            write_result(out, rank, {"error": str(err)})
            os._exit(0)  # the process group lost a rank: no collective may run any more
        raise AssertionError("the run went on without its rank 1")
    write_result(out, rank, {"step": result.step, "checkpoint": str(result.checkpoint)})
    dist.barrier()
    dist.destroy_process_group()


def read_log(run: Path, name: str = "log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root with `single` (1 process) and `ep4` (4 ranks, E=2): the same options, 4 steps, checkpoints at 2, 4."""
    from deepmoe.train.trainer import TrainConfig, train
    from distributed import launch

    root = tmp_path_factory.mktemp("distributed-train")
    train(TrainConfig(**options(root / "single")), corpus())
    ranks = launch(4, __file__, ["train4"], root, timeout=300)
    assert [r["step"] for r in ranks] == [4, 4, 4, 4]
    return root


@pytest.mark.slow
def test_four_ranks_follow_one_process(runs):
    """Same losses, gradient norms and MaxVio every step, same held-out losses and final weights (< 1e-5)."""
    from deepmoe.io import load_checkpoint

    single, ep = runs / "single", runs / "ep4"
    one, four = read_log(single), read_log(ep)
    assert [r["step"] for r in four] == [1, 2, 3, 4]
    for a, b in zip(one, four, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        assert b["maxvio"] == pytest.approx(a["maxvio"], rel=1e-6)
        assert b["tokens"] == a["tokens"]
        assert b["comm_bytes_per_rank"] > 0
    evals = [r["heldout_loss"] for r in read_log(ep, "eval.jsonl")]
    assert evals == pytest.approx([r["heldout_loss"] for r in read_log(single, "eval.jsonl")], rel=1e-5)
    assert (ep / "step-4" / "distributed").is_dir() and not (ep / "step-4" / "model.safetensors").exists()
    _, w1 = load_checkpoint(single / "step-4")
    _, w4 = load_checkpoint(ep / "step-4")  # read from every rank's shards
    assert w1.keys() == w4.keys()
    errors = {name: relative_error(w4[name], w1[name]) for name in w1}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
def test_each_rank_holds_a_quarter(runs):
    """Parameters, gradients and AdamW moments per rank: about 1/4 of one process's (FSDP2 pads each tensor's
    first dimension to a multiple of 4); report.json says the layout and the bytes."""
    one, four = read_log(runs / "single")[0], read_log(runs / "ep4")[0]
    for key in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
        assert 0.24 * one[key] <= four[key] <= 0.30 * one[key], (key, one[key], four[key])
    report = json.loads((runs / "ep4" / "report.json").read_text())
    assert (report["ranks"], report["expert_parallel"], report["data_parallel"]) == (4, 2, "fsdp")
    assert report["bytes_per_rank"]["parameter_bytes"] == four["parameter_bytes"]
    assert report["comm_bytes_per_step_per_rank"] > 0


@pytest.mark.slow
def test_resume_on_the_same_layout_is_bitwise(runs, tmp_path):
    """Rewound to step 2 and resumed on 4 ranks (E=2): steps 3 and 4 and the final shards equal the
    uninterrupted run's exactly."""
    from deepmoe.io import load_checkpoint
    from distributed import launch

    rewind(runs / "ep4", 2, tmp_path / "again")
    ranks = launch(4, __file__, ["resume4"], tmp_path, timeout=300)
    assert [r["step"] for r in ranks] == [4, 4, 4, 4]
    timing = {"tokens_per_s", "parameter_bytes", "gradient_bytes", "optimizer_bytes"}  # not the run's math
    first, again = read_log(runs / "ep4"), read_log(tmp_path / "again")
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == [
        {k: v for k, v in r.items() if k not in timing} for r in first
    ]
    assert again[2]["parameter_bytes"] == first[0]["parameter_bytes"]  # measured again by the new session
    _, uninterrupted = load_checkpoint(runs / "ep4" / "step-4")
    _, resumed = load_checkpoint(tmp_path / "again" / "step-4")
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


@pytest.mark.slow
def test_resume_on_fewer_ranks_and_on_one_process(runs, tmp_path):
    """4 ranks → 2 ranks (E=2) → 1 process: the losses continue the 4-rank run's (float tolerance); and a
    1-process run's ordinary checkpoint continues on 2 ranks."""
    from deepmoe.train.trainer import resume
    from distributed import launch

    rewind(runs / "ep4", 2, tmp_path / "on2")
    shutil.copytree(runs / "single", tmp_path / "single")
    ranks = launch(2, __file__, ["more"], tmp_path, timeout=300)
    assert [r["step"] for r in ranks] == [4, 4]
    four, two = read_log(runs / "ep4"), read_log(tmp_path / "on2")
    for a, b in zip(four, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    assert (tmp_path / "on2" / "step-4" / "distributed").is_dir()
    resume(tmp_path / "on2", corpus(), steps=5)  # one process, from the 2-rank checkpoint: E is set to 1
    log = read_log(tmp_path / "on2")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert abs(log[4]["loss"] - log[3]["loss"]) < 0.5 * log[3]["loss"]
    assert (tmp_path / "on2" / "step-5" / "model.safetensors").is_file()  # one process writes the HF format
    single = read_log(tmp_path / "single")
    assert [r["step"] for r in single] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in single)


@pytest.mark.slow
def test_export_gives_the_model_at_that_step(runs, tmp_path):
    """`deepmoe export` of the 4-rank step: an HF checkpoint whose logits (deepmoe and transformers) are the
    1-process model's at the same step."""
    from transformers import DeepseekV3ForCausalLM

    from deepmoe.model.decoder import DeepSeekForCausalLM
    from deepmoe.tools.export import export_checkpoint

    export_checkpoint(runs / "ep4", tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported = DeepSeekForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits
        reference = DeepSeekForCausalLM.from_pretrained(runs / "single" / "step-4")(ids).logits
        theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    assert relative_error(exported, reference) < 1e-4
    assert relative_error(theirs, exported) < 1e-5


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 dies while the step-2 checkpoint is written: rank 0 stops with a TrainingError naming the intact
    step-1 checkpoint, `last` still names it, no step-2 (nor its staging directory) is left, and it resumes."""
    from deepmoe.train.trainer import resume
    from distributed import launch

    ranks = launch(2, __file__, ["kill"], tmp_path, timeout=300)
    assert ranks[1] == {"killed": True}
    assert "step-1" in ranks[0]["error"] and "intact" in ranks[0]["error"]
    run = tmp_path / "killed"
    assert (run / "last").read_text().strip() == "step-1"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".step", "step"))) == ["step-1"]
    assert resume(run, corpus(), expert_parallel=1).step == 3


def test_expert_parallel_needs_torchrun(tmp_path):
    """expert_parallel=2 in a plain process: one clear error naming the option and the launch command."""
    from deepmoe.train.trainer import TrainConfig, train

    with pytest.raises(ValueError, match=r"expert_parallel=2 needs several processes.*torchrun --nproc-per-node"):
        train(TrainConfig(**options(tmp_path / "run", expert_parallel=2)), corpus())
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(**options(tmp_path / "run", expert_parallel=3))
    with pytest.raises(ValueError, match="data_parallel"):
        TrainConfig(**options(tmp_path / "run", data_parallel="zero3"))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
