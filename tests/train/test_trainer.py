"""T1/T3 trainer: learning, schedules, exact resume, Ctrl-C, the NaN guard, crash-safe checkpoints,
pruning, the report and the command line.

The model is tiny-v3 cut to 2 layers of width 64 (one MoE layer with the V3 selection bias, plus the
MTP module), on a stand-in corpus of token ids (`StandInCorpus`); the data pipeline is the real
`deepmoe.data` (PackedBatches, heldout_batches, unigram_entropy).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from corpora import StandInCorpus
from deepmoe import data
from deepmoe.cli import main
from deepmoe.cli.train import add_arguments, options_from_args
from deepmoe.io import load_checkpoint
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.presets import get_preset
from deepmoe.train import TrainConfig, TrainingError, lr_at, resume, train
from deepmoe.train import checkpoint as ckpt

VOCAB = 64
PERIOD = 23


def pattern_corpus() -> StandInCorpus:
    """A learnable stream: one random sequence of PERIOD distinct tokens, repeated."""
    g = torch.Generator().manual_seed(0)
    stream = torch.randperm(VOCAB, generator=g)[:PERIOD].repeat(400)
    return StandInCorpus(stream[:8000].clone(), stream[8000:9000].clone(), corpus_id="pattern")


def random_corpus() -> StandInCorpus:
    g = torch.Generator().manual_seed(1)
    return StandInCorpus(torch.randint(0, VOCAB, (6000,), generator=g), torch.randint(0, VOCAB, (600,), generator=g))


def tiny(out: Path, **overrides) -> TrainConfig:
    options = dict(
        preset="tiny-v3", layers=2, hidden_size=64, seq_len=32, batch_size=4, steps=6, lr=1e-2, min_lr=1e-3,
        warmup_steps=2, eval_every=0, eval_batches=2, save_every=0, keep_last=0, seed=0, progress=False,
        out=str(out),
    )  # fmt: skip
    options.update(overrides)
    return TrainConfig(**options)


# cpu_only: the trainer: data pipelines with CPU generators, checkpoints on disk, subprocesses
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights (expert biases included), optimizer state, RNG and data position bitwise equal."""
    _, wa = load_checkpoint(a)
    _, wb = load_checkpoint(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa, ta = ckpt.read_training_state(a)
    sb, tb = ckpt.read_training_state(b)
    assert ta.keys() == tb.keys() and any(k.startswith("optimizer.") for k in ta)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    for key in ("step", "optimizer", "data", "rng", "scheduler"):
        assert sa[key] == sb[key], key


class ForwardHook:
    """Patch the model's forward; `action(call, out)` runs on the n-th training-mode call (1-based)."""

    def __init__(self, monkeypatch, action):
        self.calls = 0
        original = DeepSeekForCausalLM.forward

        def forward(model, *args, **kwargs):
            out = original(model, *args, **kwargs)
            if model.training:
                self.calls += 1
                action(self.calls, out)
            return out

        monkeypatch.setattr(DeepSeekForCausalLM, "forward", forward)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 uninterrupted steps with 2 micro-batches per step (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(tiny(out, grad_accum=2), random_corpus())
    assert result.step == 6 and not result.interrupted
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """20 steps on the learnable stream, with periodic evaluation and checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = tiny(out, steps=20, warmup_steps=3, eval_every=10, save_every=10, keep_last=1)
    return train(config, pattern_corpus())


# ---- learning, log, report ---------------------------------------------------------------------


def test_loss_falls_on_a_learnable_stream(finished_run):
    log = [json.loads(line) for line in (finished_run.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    first, last = log[0]["lm_loss"], sum(r["lm_loss"] for r in log[-3:]) / 3
    assert first > math.log(VOCAB) - 0.5 and last < first - 2.0
    report = finished_run.report
    assert report["heldout_loss"] < report["unigram_entropy"] - 1.0
    assert math.isclose(report["unigram_entropy"], math.log(PERIOD), rel_tol=1e-3)  # PERIOD equally frequent ids


def test_log_lines_have_the_fields_and_the_scheduled_lr(finished_run):
    config = TrainConfig.from_dict(json.loads((finished_run.out_dir / "train_config.json").read_text()))
    for line in (finished_run.out_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("step", "lr", "loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm", "tokens_per_s"):
            assert math.isfinite(record[key]), key
        assert record["lr"] == lr_at(record["step"] - 1, config)
        assert record["layers"] == [1] and len(record["maxvio"]) == 1 and record["dropped_fraction"] == 0.0
        assert record["mtp_loss"] > 0 and record["aux_loss"] > 0
    evals = [json.loads(line) for line in (finished_run.out_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20] and evals[-1]["final"]


def test_report_and_plots(finished_run):
    out = finished_run.out_dir
    report = json.loads((out / "report.json").read_text())
    for key in ("heldout_loss", "heldout_perplexity", "unigram_entropy", "maxvio", "dead_experts",
                "dropped_fraction", "tokens_per_second", "steps"):  # fmt: skip
        assert key in report, key
    assert report["steps"] == 20 and report["tokens_per_second"] > 0
    assert math.isclose(report["heldout_perplexity"], math.exp(report["heldout_loss"]), rel_tol=1e-9)
    assert report["moe_layers"] == [1] and len(report["maxvio"]) == 1 and report["maxvio"][0] >= 0
    assert len(report["expert_load"]) == 1 and math.isclose(sum(report["expert_load"][0]), 1.0, rel_tol=1e-6)
    # the held-out set is 1000 tokens = 31 windows of 32: 31·31 next-token predictions
    assert report["heldout_tokens"] == 31 * 31
    for name in ("loss.png", "expert_load.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # keep_last=1: the final checkpoint only, loadable with the HF-format loader, with the V3 bias trained
    assert [p.name for _, p in ckpt.checkpoint_steps(out)] == ["step-20"]
    assert (out / "last").read_text().strip() == "step-20"
    model = from_pretrained(out / "step-20")
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0


# ---- schedules ---------------------------------------------------------------------------------


def test_warmup_cosine_schedule():
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110, schedule="cosine")
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(4, config) == pytest.approx(0.5)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    for step in (30, 59, 60, 100):
        p = (step - 10) / 99
        assert lr_at(step, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lr_at(109, config) == pytest.approx(0.1)
    longer = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=50, schedule_steps=110)
    assert lr_at(40, longer) == lr_at(40, config)


def test_wsd_schedule():
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert [lr_at(s, config) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    for step in (80, 89, 99):
        assert lr_at(step, config) == pytest.approx(1.0 - 0.9 * (step - 79) / 20)
    assert lr_at(99, config) == pytest.approx(0.1)
    flat = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, steps=100, schedule="wsd", decay_fraction=0.0)
    assert {lr_at(s, flat) for s in range(100)} == {1.0}


# ---- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", -1.0), ("min_lr", 5.0), ("steps", 0), ("grad_accum", 0), ("schedule", "linear"), ("preset", "nope"),
     ("decay_fraction", 1.5), ("keep_last", -1), ("bf16", "yes"), ("seq_len", 1), ("beta2", 1.0)],
)  # fmt: skip
def test_train_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}="):
        TrainConfig(**{field: value})


def test_config_file_then_flags(tmp_path):
    file = tmp_path / "opts.json"
    file.write_text(json.dumps({"steps": 7, "lr": 0.5, "schedule": "wsd"}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(["--config", str(file), "--lr", "0.1", "--bf16"]))
    config = TrainConfig.from_dict(options)
    assert (config.steps, config.lr, config.schedule, config.bf16, config.batch_size) == (7, 0.1, "wsd", True, 16)
    file.write_text(json.dumps({"step": 7}))
    with pytest.raises(ValueError, match="unknown training option.*'step'"):
        TrainConfig.from_dict(options_from_args(parser.parse_args(["--config", str(file)])))


def test_seq_len_beyond_the_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig\.seq_len=2048"):
        train(tiny(tmp_path / "run", seq_len=2048), StandInCorpus(torch.zeros(5000, dtype=torch.long),
                                                                  torch.zeros(3000, dtype=torch.long)))  # fmt: skip


# ---- resume ------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    return main(["train", *argv])


def test_cli_resume_continues_bitwise(tmp_path, monkeypatch, straight_run, capsys):
    """3 steps, stop, `--resume DIR --steps 6`: weights, expert biases and optimizer state equal 6 straight steps."""
    monkeypatch.setattr(data, "prepare_corpus", lambda *args, **kwargs: random_corpus())
    out = tmp_path / "run"
    common = (
        "--preset tiny-v3 --layers 2 --hidden 64 --seq-len 32 --batch-size 4 --grad-accum 2 --lr 1e-2 --min-lr 1e-3 "
        "--warmup-steps 2 --eval-every 0 --eval-batches 2 --save-every 0 --keep-last 0 --seed 0 --no-progress"
    ).split()
    assert cli([*common, "--steps", "3", "--schedule-steps", "6", "--out", str(out)]) == 0
    assert (out / "last").read_text().strip() == "step-3" and (out / "report.json").exists()
    assert cli([*common, "--steps", "3", "--out", str(out)]) == 1  # a run is there already
    assert "--resume" in capsys.readouterr().err
    assert cli(["--resume", str(out), "--steps", "6", "--seed", "5"]) == 1
    assert "cannot change seed" in capsys.readouterr().err
    assert cli(["--resume", str(out), "--steps", "6"]) == 0
    assert (out / "last").read_text().strip() == "step-6"
    assert json.loads((out / "report.json").read_text())["steps"] == 6
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert_same_checkpoint(out / "step-6", straight_run / "step-6")
    bias = load_checkpoint(out / "step-6")[1]["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().sum() > 0  # the bias update ran


@pytest.mark.parametrize("how", ["exception", "signal"])
def test_ctrl_c_saves_and_the_resumed_run_is_bitwise_equal(tmp_path, monkeypatch, straight_run, how):
    """KeyboardInterrupt mid-step (2nd micro-batch of step 4) saves step 3 (data position of step 3);
    a SIGINT finishes step 4, then saves it. Resuming either gives the uninterrupted run."""

    def interrupt(call, out):
        if call == 8:
            if how == "exception":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with monkeypatch.context() as patch:
        ForwardHook(patch, interrupt)
        result = train(tiny(out, grad_accum=2), random_corpus())
    saved = 3 if how == "exception" else 4
    assert result.interrupted and result.step == saved
    assert (out / "last").read_text().strip() == f"step-{saved}" and not (out / "report.json").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    result = resume(out, random_corpus())
    assert result.step == 6 and not result.interrupted
    assert_same_checkpoint(out / "step-6", straight_run / "step-6")


def test_resume_refuses_another_corpus(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, steps=1), random_corpus())
    with pytest.raises(ValueError, match="corpus differs"):
        resume(out, pattern_corpus(), steps=2)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resume(tmp_path / "elsewhere")


# ---- safety ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, bad):
    out = tmp_path / "run"
    before: dict[str, bytes] = {}

    def poison(call, result):
        if call == 5:  # step 5; checkpoints were written at steps 2 and 4
            before.update(snapshot(out))
            result.loss = result.loss * bad

    ForwardHook(monkeypatch, poison)
    with pytest.raises(TrainingError, match=rf"step 5: the loss is {bad}.*step-4 is kept") as info:
        train(tiny(out, steps=8, save_every=2, keep_last=2), random_corpus())
    assert "nothing was saved after step 4" in str(info.value)
    assert "step-4/model.safetensors" in before and snapshot(out) == before
    assert (out / "last").read_text().strip() == "step-4"


@pytest.mark.parametrize("where", ["weights", "state", "last"])
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    saves = {"n": 0}
    target = {
        "weights": (ckpt, "save_checkpoint"),
        "state": (ckpt, "write_training_state"),
        "last": (ckpt, "write_last"),
    }[where]
    original = getattr(*target)

    def crash(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(*target, crash)
        with pytest.raises((TrainingError, OSError), match="No space left"):
            train(tiny(out, steps=4, save_every=2), random_corpus())
    assert (out / "last").read_text().strip() == "step-2"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert (out / "step-4").exists() == (where == "last")  # complete, but `last` was not moved to it
    from_pretrained(out / "step-2")
    assert ckpt.read_training_state(out / "step-2")[0]["step"] == 2
    assert resume(out, random_corpus()).step == 4
    assert (out / "last").read_text().strip() == "step-4"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, steps=5, save_every=1, keep_last=2), random_corpus())
    assert sorted(p.name for p in out.glob("step-*")) == ["step-4", "step-5"]
    assert (out / "last").read_text().strip() == "step-5"


def test_no_pickle_in_a_checkpoint(finished_run):
    for path in (finished_run.out_dir / "step-20").iterdir():
        assert path.suffix in (".json", ".safetensors"), path.name


def test_bf16_autocast_trains(tmp_path):
    result = train(tiny(tmp_path / "run", steps=2, bf16=True), random_corpus())
    assert result.report["bf16"] and math.isfinite(result.report["heldout_loss"])
    _, weights = load_checkpoint(tmp_path / "run" / "step-2")
    assert all(t.dtype == torch.float32 for t in weights.values())


def write_texts(texts: Path, seed: int = 0, shift: int = 0) -> Path:
    """Six small documents of random sentences over a few words (`shift` changes the word order)."""
    texts.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxers".split()
    words = words[shift:] + words[:shift]
    g = torch.Generator().manual_seed(seed)
    for i in range(6):
        lines = [" ".join(words[j] for j in torch.randint(0, len(words) - shift, (12,), generator=g))
                 for _ in range(120)]  # fmt: skip
        (texts / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return texts


def test_real_corpus_end_to_end(tmp_path, monkeypatch):
    """prepare_corpus on a small text folder: the model gets the tokenizer's vocabulary, the checkpoint its
    tokenizer.json."""
    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    out = tmp_path / "run"
    assert cli(["--data", str(texts), "--vocab-size", "300", "--preset", "tiny-v3", "--layers", "2", "--hidden",
                "64", "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--eval-batches", "2", "--no-progress",
                "--out", str(out)]) == 0  # fmt: skip
    corpus = data.prepare_corpus(texts, vocab_size=300)
    model = from_pretrained(out / "step-2")
    assert model.config.vocab_size == corpus.vocab_size and model.config.eos_token_id == corpus.eot_id
    assert (out / "step-2" / "tokenizer.json").is_file()
    assert json.loads((out / "report.json").read_text())["unigram_entropy"] == pytest.approx(
        data.unigram_entropy(corpus.train, corpus.vocab_size)
    )


def test_bias_update_uses_the_load_summed_over_micro_batches(tmp_path, monkeypatch):
    loads: list[dict[int, torch.Tensor]] = []
    ForwardHook(
        monkeypatch, lambda call, out: loads.append({i: s.tokens_per_expert for i, s in out.routing_stats.items()})
    )
    train(tiny(tmp_path / "run", steps=1, grad_accum=2), random_corpus())
    _, weights = load_checkpoint(tmp_path / "run" / "step-1")
    differs_from_last_micro_batch = False
    for layer, name in ((1, "model.layers.1.mlp.gate"), (2, "model.mtp.0.block.mlp.gate")):  # 2: the MTP block
        total = (loads[0][layer] + loads[1][layer]).float()
        bias = weights[f"{name}.e_score_correction_bias"]
        assert torch.equal(bias, 0.001 * torch.sign(total.mean() - total))
        last = loads[1][layer].float()
        differs_from_last_micro_batch |= not torch.equal(bias, 0.001 * torch.sign(last.mean() - last))
    assert differs_from_last_micro_batch


def test_model_overrides_build_the_run_model(tmp_path):
    dense = train(
        tiny(tmp_path / "dense", steps=1, model_overrides={"moe": None, "intermediate_size": 48}), random_corpus()
    )
    config = from_pretrained(dense.checkpoint).config
    assert config.moe is None and config.intermediate_size == 48
    moe = train(tiny(tmp_path / "moe", steps=1, model_overrides={"moe": {"num_experts_per_tok": 1}}), random_corpus())
    config = from_pretrained(moe.checkpoint).config
    assert (
        config.moe.num_experts_per_tok == 1
        and config.moe.n_routed_experts == get_preset("tiny-v3").moe.n_routed_experts
    )


def from_checkpoint(out: Path, init_from: Path, **overrides) -> TrainConfig:
    """`tiny` without the options that shape a model: with init_from the checkpoint is the model."""
    options = {**tiny(out).to_dict(), "preset": None, "vocab_size": None, "layers": None, "hidden_size": None}
    return TrainConfig(**{**options, "init_from": str(init_from), **overrides})


def test_init_from_starts_with_the_saved_weights(tmp_path):
    first = train(tiny(tmp_path / "first", steps=2), random_corpus())
    start = from_pretrained(first.checkpoint)
    second = from_checkpoint(tmp_path / "second", first.checkpoint, steps=1, lr=1e-9, min_lr=0)
    after = from_pretrained(train(second, random_corpus()).checkpoint)
    for (name, a), (_, b) in zip(start.state_dict().items(), after.state_dict().items(), strict=True):
        step = 0.001 if name.endswith("e_score_correction_bias") else 1e-6  # one bias update of γ=0.001
        assert torch.allclose(a, b, atol=step * 1.01), name
    big_vocab = StandInCorpus(random_corpus().train * 2, random_corpus().heldout * 2, vocab_size=128)
    with pytest.raises(ValueError, match="vocab_size=64, but its tokenizer has 128"):
        train(from_checkpoint(tmp_path / "third", first.checkpoint), big_vocab)


@pytest.mark.parametrize(
    "option, value", [("preset", "tiny-v2"), ("layers", 1), ("hidden_size", 32), ("vocab_size", 64),
                      ("model_overrides", {"num_hidden_layers": 1})],
)  # fmt: skip
def test_init_from_refuses_options_that_shape_another_model(tmp_path, option, value):
    """They used to be recorded in report.json while the checkpoint's own model was trained."""
    with pytest.raises(ValueError, match=rf"TrainConfig\.{option}=.*cannot be set with init_from"):
        from_checkpoint(tmp_path / "run", tmp_path / "ckpt", **{option: value})


def test_init_from_applies_the_moe_training_options(tmp_path):
    first = train(tiny(tmp_path / "first", steps=1), random_corpus())
    second = train(from_checkpoint(tmp_path / "second", first.checkpoint, steps=1, bias_update_speed=0.5),
                   random_corpus())  # fmt: skip
    assert load_checkpoint(second.checkpoint)[0].moe.bias_update_speed == 0.5
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    moved = load_checkpoint(second.checkpoint)[1][bias] - load_checkpoint(first.checkpoint)[1][bias]
    assert torch.allclose(moved.abs()[moved != 0], torch.tensor(0.5))  # one update of γ = 0.5


def test_init_from_uses_the_checkpoints_tokenizer(tmp_path, monkeypatch):
    """Not one retrained on --data: equal sizes once hid 62 of 330 ids mapped differently."""
    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "cache"))
    first_texts, second_texts = write_texts(tmp_path / "a", seed=0), write_texts(tmp_path / "b", seed=1, shift=3)
    assert cli(["--data", str(first_texts), "--vocab-size", "300", "--preset", "tiny-v3", "--layers", "2",
                "--hidden", "64", "--seq-len", "32", "--batch-size", "4", "--steps", "1", "--eval-batches", "2",
                "--no-progress", "--out", str(tmp_path / "first")]) == 0  # fmt: skip
    own = (tmp_path / "first" / "step-1" / "tokenizer.json").read_text()
    retrained = data.prepare_corpus(second_texts, vocab_size=300).tokenizer
    assert retrained.to_str() != own  # what --data alone would have given
    assert cli(["--data", str(second_texts), "--init-from", str(tmp_path / "first" / "step-1"), "--seq-len", "32",
                "--batch-size", "4", "--steps", "1", "--eval-batches", "2", "--no-progress",
                "--out", str(tmp_path / "second")]) == 0  # fmt: skip
    assert (tmp_path / "second" / "step-1" / "tokenizer.json").read_text() == own
    assert cli(["--init-from", str(tmp_path / "first" / "step-1"), "--layers", "4", "--steps", "1",
                "--out", str(tmp_path / "third")]) == 1  # fmt: skip
    assert not (tmp_path / "third").exists()


def test_init_from_without_a_tokenizer_is_refused(tmp_path):
    model = DeepSeekForCausalLM(get_preset("tiny-v3"))
    model.save_pretrained(tmp_path / "hf")  # weights and config only, as transformers saves a model
    with pytest.raises(ValueError, match=r"hf/tokenizer\.json not found: init_from"):
        train(from_checkpoint(tmp_path / "run", tmp_path / "hf"))


# ---- extending a run: the schedule ------------------------------------------------------------


def test_resume_with_more_steps_keeps_the_learning_rate_schedule(tmp_path):
    """--resume --steps 8 after a 4-step run: the LR continues at min_lr (no jump back up), and the run
    equals a straight one with --steps 8 --schedule-steps 4; an explicit --schedule-steps is obeyed."""
    corpus = random_corpus()
    train(tiny(tmp_path / "run", steps=4), corpus)
    resume(tmp_path / "run", corpus, steps=8)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    straight = tiny(tmp_path / "straight", steps=8, schedule_steps=4)
    assert lrs == [lr_at(s, straight) for s in range(8)] and lrs[4:] == [straight.min_lr] * 4
    train(straight, corpus)
    assert_same_checkpoint(tmp_path / "run" / "step-8", tmp_path / "straight" / "step-8")
    resume(tmp_path / "run", corpus, steps=10, schedule_steps=10)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lrs[8:] == [lr_at(s, tiny(tmp_path, steps=10)) for s in (8, 9)]


def test_layers_cut_a_pyramid_and_refuse_to_extend_it(tmp_path):
    run = train(tiny(tmp_path / "cut", preset="tiny-pyramid-moe", steps=1, layers=3), random_corpus())
    assert from_pretrained(run.checkpoint).config.moe_experts_per_layer == [0, 8, 16]
    with pytest.raises(ValueError, match="layers=5 is invalid: moe_experts_per_layer gives 4"):
        train(tiny(tmp_path / "long", preset="tiny-pyramid-moe", layers=5), random_corpus())
