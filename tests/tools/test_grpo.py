"""GRPO (`deepmoe.tools.grpo`): the advantages, the clipped objective and the k3 KL against hand computations;
routing replay re-scores the sampled tokens through the sampler's experts; bad rewards are reported with the
prompt, skipped or stopping the run."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import tiny_preset
from deepmoe import DeepSeekForCausalLM
from deepmoe.model.generate import generate
from deepmoe.tools.grpo import (
    Arithmetic,
    GRPOConfig,
    Reverse,
    RewardError,
    RoutingRecorder,
    changed_routing,
    completion_logprobs,
    group_advantages,
    grpo,
    grpo_loss,
    k3_kl,
    score,
)

pytestmark = pytest.mark.cpu_only  # CPU generators and bitwise float32 comparisons


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(4 * 0.25 / 3)  # the sample standard deviation of 1, 0, 0, 1
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) / torch.tensor([[std + 1e-4], [1.0]])
    torch.testing.assert_close(group_advantages(rewards), want)


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    want = torch.tensor([0.5 - math.log(0.5) - 1, 0.0])
    torch.testing.assert_close(k3_kl(logp, ref), want)


def test_clipped_objective_by_hand():
    """Two completions, the second one token long: ρ = 1.5 with Â > 0 is clipped to 1.2; ρ = 0.5 with Â < 0
    is clipped to 0.8 (min takes the clipped, larger loss)."""
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 7.0]]))
    ref = logp.clone()  # KL 0
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    parts = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    first = -(min(1.5 * 2, 1.2 * 2) + min(1.0 * 2, 1.0 * 2)) / 2
    second = -min(0.5 * -1, 0.8 * -1)
    assert parts.loss.item() == pytest.approx((first + second) / 2)
    assert parts.clipped.item() == pytest.approx(2 / 3) and parts.kl.item() == 0
    kl_ref = logp + torch.tensor([[0.1, 0.0], [0.0, 0.0]])  # the KL term adds β·k3 on the first token
    with_kl = grpo_loss(logp, old, kl_ref, adv, mask, clip_eps=0.2, beta=0.1)
    extra = 0.1 * (math.exp(0.1) - 0.1 - 1) / 2 / 2
    assert with_kl.loss.item() == pytest.approx(parts.loss.item() + extra)


def _model() -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    config = tiny_preset("tiny-v3", num_hidden_layers=2, vocab_size=97, initializer_range=0.2,
                         num_nextn_predict_layers=0)  # fmt: skip
    return DeepSeekForCausalLM(config).eval()


def _sample(model, rows=4):
    prompt = torch.randint(0, 97, (rows, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    recorder = RoutingRecorder(model)
    with torch.no_grad(), recorder.recording(rows):
        ids = generate(model, prompt, 6, do_sample=True, attention_mask=mask, eos_token_id=[],
                       generator=torch.Generator().manual_seed(2))  # fmt: skip
    return ids, torch.cat([mask, torch.ones(rows, 6, dtype=torch.long)], 1), recorder.replay(ids.shape[1])


def test_replay_aligns_with_the_tokens_and_gives_the_samplers_logprobs():
    """The recorded experts are the ones a full forward chooses for the same tokens (this model has no near-ties),
    and at step 0 the policy's log-probabilities with replay equal the rollout's bit for bit."""
    model = _model()
    ids, mask, replay = _sample(model)
    assert changed_routing(model, ids, mask, replay) == 0.0
    with torch.no_grad():
        old = completion_logprobs(model, ids, mask, 5, replay)
    logp = completion_logprobs(model, ids, mask, 5, replay)
    assert torch.equal(logp.detach(), old)
    assert all(layer.gate.replay is None for layer in model.moe_layers().values())  # cleared afterwards


def test_replay_routes_through_the_recorded_experts_after_the_router_changed():
    model = _model()
    ids, mask, replay = _sample(model)
    with torch.no_grad():
        before = completion_logprobs(model, ids, mask, 5, replay)
        for layer in model.moe_layers().values():
            layer.gate.weight.add_(torch.randn_like(layer.gate.weight))  # the router now chooses differently
        assert changed_routing(model, ids, mask, replay) > 0.1
        replayed = completion_logprobs(model, ids, mask, 5, replay)
        own = completion_logprobs(model, ids, mask, 5)
        for layer in model.moe_layers().values():
            layer.gate.replay = None
    # the replayed forward differs from before only through the gate weights, far less than with new experts
    assert (replayed - before).abs().mean() < (own - before).abs().mean()


def test_tasks_and_bad_rewards():
    rng = random.Random(0)
    arithmetic, reverse = Arithmetic(), Reverse()
    prompt = arithmetic.prompt(rng)
    a, b = map(int, prompt.rstrip("=").split("+"))
    assert score(arithmetic, prompt, f" {a + b}\nmore") == 1.0 and score(arithmetic, prompt, "x") == 0.0
    prompt = reverse.prompt(rng)
    assert score(reverse, prompt, prompt[8:-1][::-1]) == 1.0

    class Broken:
        def __init__(self, value):
            self.value = value

        def reward(self, prompt, completion):
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    for value in (KeyError("k"), "1", float("nan"), None):
        with pytest.raises(RewardError, match="prompt '2\\+2='"):
            score(Broken(value), "2+2=", "4")


def _tokenizer() -> Tokenizer:
    vocab = {ch: i for i, ch in enumerate("0123456789+=abcdefgh :\nreviso")}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tokenizer


def test_a_short_run_logs_and_reports_bad_rewards(tmp_path):
    model = _model()

    class Flaky(Arithmetic):
        def reward(self, prompt, completion):
            if prompt.startswith("1"):
                raise ValueError("boom")
            return super().reward(prompt, completion)

    warnings = []
    config = GRPOConfig(steps=2, prompts_per_step=3, group=2, max_new_tokens=3, lr=1e-3)
    logs = grpo(model, _tokenizer(), Flaky(high=20), config, tmp_path, on_warning=warnings.append)
    assert len(logs) == 2 and (tmp_path / "log.jsonl").read_text().count("\n") == 2
    assert all(math.isfinite(entry.loss) and entry.max_vio >= 0 for entry in logs)
    assert sum(entry.skipped for entry in logs) == len(warnings) and all("boom" in w for w in warnings)
    with pytest.raises(RewardError, match="boom"):
        grpo(model, _tokenizer(), Flaky(high=20), GRPOConfig(steps=3, prompts_per_step=4, group=2, max_new_tokens=2,
                                                            skip_bad_rewards=False), tmp_path / "stop")  # fmt: skip


def test_a_resumed_run_continues_as_if_it_had_not_stopped(tmp_path):
    """4 steps in one go against 2 steps, a stop, and a resume to 4 (checkpoints every 2 steps): the same log
    lines and the same final weights."""
    config = GRPOConfig(steps=4, prompts_per_step=2, group=2, max_new_tokens=3, lr=1e-3, save_every=2)
    straight = _model()
    grpo(straight, _tokenizer(), Arithmetic(high=20), config, tmp_path / "straight")

    stopped = GRPOConfig(**{**config.__dict__, "steps": 2})
    grpo(_model(), _tokenizer(), Arithmetic(high=20), stopped, tmp_path / "resumed")
    resumed = _model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.zero_()  # the resume must load the checkpoint's weights, not keep these
    grpo(resumed, _tokenizer(), Arithmetic(high=20), config, tmp_path / "resumed", resume=True)

    lines = [(tmp_path / run / "log.jsonl").read_text().splitlines() for run in ("straight", "resumed")]
    assert len(lines[0]) == 4 and lines[0] == lines[1]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="is not empty"):  # a finished run is not started over
        grpo(_model(), _tokenizer(), Arithmetic(high=20), config, tmp_path / "straight")
    unsaved = GRPOConfig(steps=1, prompts_per_step=1, group=2, max_new_tokens=1)
    grpo(_model(), _tokenizer(), Arithmetic(high=20), unsaved, tmp_path / "unsaved")
    with pytest.raises(ValueError, match="no checkpoint"):
        grpo(_model(), _tokenizer(), Arithmetic(high=20), unsaved, tmp_path / "unsaved", resume=True)
