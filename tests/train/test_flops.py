"""Model FLOPs per trained token and MFU: the formula against PyTorch's own FLOP counter on real forward and
backward passes (every matmul, the attention products and the experts' grouped products counted), and the
trainer's log and report."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from configs import tiny_model_config
from corpora import StandInCorpus
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.parameters import training_flops_per_token
from deepmoe.train.flops import model_flops_utilisation

# cpu_only: counts CPU attention kernels; the trainer on files
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


def _grouped(x_shape, w_shape, *_, **__) -> int:  # x [S, in] @ weight [G, in, out], row by row
    return 2 * x_shape[0] * w_shape[-2] * w_shape[-1]


def _weight_grad(x_shape, grad_shape, *_, **__) -> int:  # x[rows]ᵀ @ grad[rows] per group
    return 2 * x_shape[0] * x_shape[1] * grad_shape[1]


def counted_flops_per_token(config, seq_len: int, batch: int = 2) -> float:
    """PyTorch's FLOP counter on one forward and backward pass, per token: every matrix product (the experts'
    grouped ones included) as counted, and the attention as 3× its forward product count (the model's backward
    has twice the forward's products; the counter's formula for the CPU kernel's backward also counts the
    score recomputation of flash attention, which is not model FLOPs)."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    mapping = {
        torch.ops.deepmoe.grouped_mm: _grouped,
        torch.ops.deepmoe.grouped_mm_weight_grad: _weight_grad,
        attention: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),  # PyTorch's formula, unmapped on CPU
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matrices = sum(n for op, n in counts.items() if "attention" not in str(op))
    return (matrices + 3 * counts.get(attention, 0)) / (batch * seq_len)


EQUAL_HEADS = dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
"""v as wide as q·k: the kernel pads v to the query's width otherwise, work the model's FLOPs do not count."""


@pytest.mark.parametrize(
    "overrides",
    [dict(moe=None, **EQUAL_HEADS), dict(moe=None, attention_type="mha", num_key_value_heads=2), dict(**EQUAL_HEADS),
     dict(tie_word_embeddings=True, **EQUAL_HEADS)],
    ids=["dense-mla", "dense-mha", "moe", "moe-tied"],
)  # fmt: skip
def test_formula_equals_the_counted_flops(overrides):
    """Without MTP each token is counted whole: the formula is the counter's total within 1% (routing picks
    exactly top-k experts per token; the counter also sees the router's scores, a [T, N_r] product)."""
    config = tiny_model_config(vocab_size=96, **overrides)
    counted, formula = counted_flops_per_token(config, 32), training_flops_per_token(config, 32)
    assert formula == pytest.approx(counted, rel=0.01)


def test_mtp_modules_are_counted_with_their_head():
    """An MTP module of depth 1 trains on T−1 of the T positions: the counter sees (T−1)/T of its matrices'
    share (its attention runs over T−1 keys: (T−1)²/T² of that share)."""
    base = tiny_model_config(vocab_size=96, **EQUAL_HEADS)
    mtp = tiny_model_config(vocab_size=96, num_nextn_predict_layers=1, **EQUAL_HEADS)
    t = 32
    extra_counted = counted_flops_per_token(mtp, t) - counted_flops_per_token(base, t)
    extra_formula = training_flops_per_token(mtp, t) - training_flops_per_token(base, t)
    assert extra_formula * (t - 1) / t == pytest.approx(extra_counted, rel=0.03)


def test_trainer_logs_flops_and_mfu(tmp_path):
    from deepmoe.train.trainer import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(1, 64, (3000,), generator=g)
    options = dict(preset="tiny-v3", layers=2, hidden_size=32, seq_len=16, batch_size=4, steps=2, warmup_steps=1,
                   eval_every=0, save_every=0, final_eval_batches=1, progress=False, out=str(tmp_path / "run"),
                   peak_tflops=0.5)  # fmt: skip
    train(TrainConfig(**options), StandInCorpus(stream[:2500].clone(), stream[2500:].clone()))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["flops_per_token"] == log[0]["flops_per_token"] > 0 and report["peak_tflops"] == 0.5
    for record in log:
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * record["flops_per_token"] / 0.5e12)
    assert report["mfu"] == pytest.approx(model_flops_utilisation(report["tokens_per_second"],
                                                                  report["flops_per_token"], 0.5, 1))  # fmt: skip
    with pytest.raises(ValueError, match="peak_tflops"):
        TrainConfig(**{**options, "peak_tflops": 0})
