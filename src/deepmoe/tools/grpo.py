"""Group Relative Policy Optimization (DeepSeekMath §4.1, as DeepSeek-R1 §2.2.1 uses it) with routing replay.

For each prompt, G completions o_1..o_G are sampled with the KV cache and scored by a reward r_i; the advantage
of every token of o_i is the group-normalised reward Â_i = (r_i − mean(r)) / std(r). The policy maximises

    1/G Σ_i 1/|o_i| Σ_t [ min(ρ_i,t Â_i, clip(ρ_i,t, 1 − ε, 1 + ε) Â_i) − β D_KL ],   ρ = π_θ / π_θold,

with the per-token KL to a frozen reference model by the unbiased k3 estimator
D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1 (DeepSeekMath eq. 4).

Routing replay: in an MoE model the experts chosen when a completion was sampled can differ from those chosen
when the same tokens are re-scored, so ρ compares two different networks. The sampler's expert ids are
recorded (`RoutingRecorder`) and re-used by every re-scoring forward (`Router.replay`), with gate weights from
the current router; π_θold is computed through them as well, so at the first update ρ = 1 exactly. The
aux-loss-free bias is not updated during RL.
"""

from __future__ import annotations

import importlib
import json
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.io.checkpoint import copy_tokenizer_files, read_last
from deepmoe.io.files import claim_directory, refuse_overlap, write_json
from deepmoe.model.generate import generate, left_padded
from deepmoe.moe import MoE
from deepmoe.moe.balance import max_violation
from deepmoe.moe.router import count_ids
from deepmoe.train.checkpoint import (
    append_jsonl,
    load_model_weights,
    load_optimizer_state,
    optimizer_state,
    read_training_state,
    rng_state,
    save_tokenizer,
    save_training_checkpoint,
    set_rng_state,
    truncate_log,
)

# ---- the objective -------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """rewards [P, G] (G completions of each of P prompts) → Â [P, G] = (r − mean) / (std + eps) per group,
    std the sample standard deviation (n − 1); a group of equal rewards gets 0."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate k3 = exp(ref − logp) − (ref − logp) − 1 (>= 0; Schulman's k3)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass
class LossParts:
    loss: Tensor
    """The scalar to minimise: −(the GRPO objective)."""
    ratio: Tensor
    """[N] ρ over the completion tokens (detached)."""
    kl: Tensor
    """Scalar, mean k3 over the completion tokens (detached)."""
    clipped: Tensor
    """Scalar, the share of tokens whose ρ·Â was clipped (detached)."""


def grpo_loss(
    logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float, beta: float
) -> LossParts:
    """logp, old_logp, ref_logp, mask [B, L] over the completion tokens (mask 0 after a completion's end),
    advantages [B] → the negated objective of the module docstring: per-token terms averaged over each
    completion's tokens, then over the completions."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    kl = k3_kl(logp, ref_logp)
    per_token = -(torch.minimum(unclipped, clipped) - beta * kl)
    mask = mask.to(per_token.dtype)
    per_completion = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    on = mask.bool()
    return LossParts(
        loss=per_completion.mean(),
        ratio=ratio.detach()[on],
        kl=kl.detach()[on].mean(),
        clipped=(clipped.detach() < unclipped.detach())[on].float().mean(),
    )


# ---- routing replay ------------------------------------------------------------------------------------------


class RoutingRecorder:
    """Records each MoE layer's chosen experts while `generate` runs (prefill, then one column per step)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[int, MoE] = model.moe_layers()
        self.chunks: dict[int, list[Tensor]] = {i: [] for i in self.layers}
        self._batch = 0

    @contextmanager
    def recording(self, batch: int) -> Iterator[RoutingRecorder]:
        self._batch = batch
        hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in self.layers.items()]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, index: int) -> Callable:
        def record(module: nn.Module, args, output) -> None:
            self.chunks[index].append(output.routing.topk_idx.view(self._batch, -1, output.routing.topk_idx.shape[-1]))

        return record

    def max_violation(self, token_mask: Tensor) -> float:
        """MaxVio of the recorded routing over the tokens where `token_mask` [B, fed or more] is true, averaged
        over the layers."""
        values = []
        for index, chunks in self.chunks.items():
            if not chunks:
                continue
            ids = torch.cat(chunks, dim=1)  # [B, fed, K]
            chosen = ids[token_mask[:, : ids.shape[1]].bool()]  # [tokens, K]
            values.append(max_violation(count_ids(chosen, self.layers[index].config.n_routed_experts)).item())
        return sum(values) / len(values) if values else 0.0

    def replay(self, length: int) -> dict[int, Tensor]:
        """Layer index → [B·length, K] for a re-scoring forward over `length` tokens per row: the recorded ids,
        and for the last token (sampled, never fed to the sampler; its output is not scored) the ids of the one
        before it."""
        replay = {}
        for index, chunks in self.chunks.items():
            if not chunks:  # a layer generate never ran (an MTP module)
                continue
            ids = torch.cat(chunks, dim=1)  # [B, fed, K]
            if ids.shape[1] < length:
                ids = torch.cat([ids, ids[:, -1:].expand(-1, length - ids.shape[1], -1)], dim=1)
            replay[index] = ids[:, :length].reshape(-1, ids.shape[-1]).contiguous()
        return replay


@contextmanager
def replaying(model: nn.Module, replay: dict[int, Tensor] | None) -> Iterator[None]:
    """Every MoE router of `model` takes its layer's replayed experts (None: the routers choose)."""
    layers = model.moe_layers()
    try:
        if replay is not None:
            for index, routing in replay.items():
                layers[index].gate.replay = routing
        yield
    finally:
        for layer in layers.values():
            layer.gate.replay = None


def completion_logprobs(
    model: nn.Module, ids: Tensor, attention_mask: Tensor, start: int, replay: dict[int, Tensor] | None = None
) -> Tensor:
    """log π(ids[:, t] | ids[:, :t]) for t >= start → [B, L − start], the model in eval mode (no token dropping);
    `replay` routes every token through the given experts."""
    with replaying(model, replay):
        logits = model(ids, attention_mask=attention_mask, output_mtp=False, output_routing_stats=False).logits
    logp = F.log_softmax(logits[:, start - 1 : -1].float(), dim=-1)
    return logp.gather(-1, ids[:, start:, None]).squeeze(-1)


def changed_routing(model: nn.Module, ids: Tensor, attention_mask: Tensor, replay: dict[int, Tensor]) -> float:
    """The share of (token, layer) pairs whose own choice of experts (as a set) differs from `replay`'s, over the
    tokens the sampler fed (not each row's last token, whose replayed experts are a filler)."""
    recorder = RoutingRecorder(model)
    with torch.no_grad(), recorder.recording(ids.shape[0]):
        model(ids, attention_mask=attention_mask, output_mtp=False, output_routing_stats=False)
    own = recorder.replay(ids.shape[1])
    rows = ids.shape[0]

    def fed(routing: Tensor) -> Tensor:
        return routing.view(rows, ids.shape[1], -1)[:, :-1].sort(-1).values

    changed = [(fed(own[i]) != fed(r)).any(-1).flatten() for i, r in replay.items()]
    return torch.cat(changed).float().mean().item() if changed else 0.0


# ---- tasks and rewards ---------------------------------------------------------------------------------------


class Task(Protocol):
    def prompt(self, rng: random.Random) -> str: ...

    def reward(self, prompt: str, completion: str) -> float: ...


def _first_line(completion: str) -> str:
    return completion.split("\n", 1)[0].strip()


class Arithmetic:
    """ "a+b=" with a, b in [0, high): reward 1 when the completion's first line is the sum, else 0."""

    def __init__(self, high: int = 50) -> None:
        self.high = high

    def prompt(self, rng: random.Random) -> str:
        return f"{rng.randrange(self.high)}+{rng.randrange(self.high)}="

    def reward(self, prompt: str, completion: str) -> float:
        a, b = prompt.rstrip("=").split("+")
        return float(_first_line(completion) == str(int(a) + int(b)))


class Reverse:
    """ "reverse abcd:" (3 to 5 letters): reward 1 when the completion's first line is the letters reversed."""

    def prompt(self, rng: random.Random) -> str:
        return f"reverse {''.join(rng.choice('abcdefgh') for _ in range(rng.randint(3, 5)))}:"

    def reward(self, prompt: str, completion: str) -> float:
        return float(_first_line(completion) == prompt[len("reverse ") : -1][::-1])


TASKS: dict[str, Callable[[], Task]] = {"arithmetic": Arithmetic, "reverse": Reverse}


class UserReward:
    """A task's prompts with a user's reward `module:function(prompt, completion) -> number`."""

    def __init__(self, task: Task, spec: str) -> None:
        module_name, _, name = spec.partition(":")
        if not module_name or not name:
            raise ValueError(f"--reward must be MODULE:FUNCTION, got {spec!r}")
        try:
            self.function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--reward {spec!r}: {error}") from None
        if not callable(self.function):
            raise ValueError(f"--reward {spec!r} is not callable")
        self.task = task

    def prompt(self, rng: random.Random) -> str:
        return self.task.prompt(rng)

    def reward(self, prompt: str, completion: str) -> float:
        return self.function(prompt, completion)


def task_from_spec(spec: dict) -> Task:
    """The task a `GRPOConfig.task` record describes: a built-in task (arithmetic with its operand limit), with a
    user's reward function on its prompts when `reward` is given."""
    name = spec.get("task", "arithmetic")
    if name not in TASKS:
        raise ValueError(f"unknown GRPO task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    task = Arithmetic(spec.get("operands_below", 50)) if name == "arithmetic" else TASKS[name]()
    return UserReward(task, spec["reward"]) if spec.get("reward") else task


class RewardError(ValueError):
    """A reward function raised or returned something that is not a finite number."""


def score(task: Task, prompt: str, completion: str) -> float:
    """task.reward as a float, or RewardError naming the prompt."""
    try:
        value = task.reward(prompt, completion)
    except Exception as error:  # a user's function: anything it raises is reported with the prompt
        raise RewardError(f"the reward raised {type(error).__name__}: {error} (prompt {prompt!r})") from error
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(f"the reward returned {value!r}, not a finite number (prompt {prompt!r})")
    return float(value)


# ---- the loop ------------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    steps: int = 200
    prompts_per_step: int = 4
    group: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    lr: float = 1e-5
    updates_per_batch: int = 2
    """μ: optimiser steps on each batch of rollouts (the first has ρ = 1; the later ones are where replay matters)."""
    grad_clip: float = 1.0
    routing_replay: bool = True
    skip_bad_rewards: bool = True
    """A reward that raises or is not a number: skip that completion (reported) or stop the run (False)."""
    seed: int = 0
    task: dict = field(default_factory=dict)
    """How the command line built the task ({"task": name, "operands_below": n, "reward": "module:function"}),
    recorded so that a resumed run rebuilds it (`task_from_spec`); the library itself does not read it."""
    save_every: int = 0
    """Write a resumable checkpoint (`step-N/`: policy, optimizer, RNG states) every this many steps and after the
    last; 0: only the final model."""

    def check(self) -> None:
        for name in ("steps", "prompts_per_step", "group", "max_new_tokens", "updates_per_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GRPOConfig.{name} must be an integer >= 1, got {value!r}")
        if self.group < 2:
            raise ValueError(f"GRPOConfig.group must be >= 2 (advantages compare completions), got {self.group}")
        for name in ("temperature", "clip_eps", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GRPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.kl_beta < 0 or self.grad_clip < 0:
            raise ValueError("GRPOConfig.kl_beta and grad_clip must be >= 0")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            raise ValueError(f"GRPOConfig.save_every must be an integer >= 0, got {self.save_every!r}")


@dataclass
class StepLog:
    step: int
    reward: float
    loss: float
    kl: float
    ratio_variance: float
    clipped: float
    max_vio: float
    """MaxVio of the sampler's routing over the step's real tokens, (max load − mean) / mean, averaged over the
    MoE layers (0 for a dense model)."""
    changed_routing: float
    """The share of (token, layer) pairs whose experts the router, after this step's updates, would choose
    differently from the sampler: what routing replay holds fixed."""
    skipped: int


def grpo(
    model: nn.Module,
    tokenizer,
    task: Task,
    config: GRPOConfig,
    out: str | Path,
    source: str | Path | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    resume: bool = False,
) -> list[StepLog]:
    """Run GRPO on `model` (updated in place) for `task` in the run directory `out`, held against other processes
    while it runs: `grpo_config.json`, `reference/` (the starting model, the KL's π_ref), `log.jsonl` (one line per
    step), resumable `step-N/` checkpoints (`config.save_every`) and the trained model in `final/` (with `source`'s
    tokenizer files when the checkpoint directory it came from is given). `out` must be new or empty, unless
    `resume`: then it is an earlier run's directory, `model` is loaded from its newest checkpoint with the
    optimizer and the RNG states, and the run continues to `config.steps` as if it had never stopped. Returns the
    logs of the steps run now. `tokenizer`: a `tokenizers.Tokenizer`; completions end at the model's EOS id
    (config.eos_token_id) or after max_new_tokens."""
    config.check()
    if source is not None:
        refuse_overlap(out, [source], "the checkpoint GRPO starts from")
    replaceable = (lambda path: (path / CONFIG_FILE).is_file()) if resume else None
    with claim_directory(out, "GRPO run directory (deepmoe grpo)" if resume else "new or empty directory",
                         replaceable) as target:  # fmt: skip
        logs = _run(model, tokenizer, task, config, target, on_step, on_warning, resume)
        model.save_pretrained(target / "final")
        if source is not None:
            copy_tokenizer_files(Path(source), target / "final")
        else:
            save_tokenizer(tokenizer, target / "final")
    return logs


CONFIG_FILE = "grpo_config.json"


def read_run_config(out: str | Path) -> GRPOConfig:
    """The GRPOConfig an earlier run in `out` was started with (to resume it, maybe with more steps)."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{out}: not a deepmoe grpo run directory (no {CONFIG_FILE})")
    return GRPOConfig(**json.loads(path.read_text()))


def _run(model, tokenizer, task, config, out: Path, on_step, on_warning, resume: bool) -> list[StepLog]:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    generator = torch.Generator(model.model.embed_tokens.weight.device).manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    first = 0
    if resume:
        first = _restore(model, optimizer, rng, generator, out)
        truncate_log(out / "log.jsonl", first - 1)
    else:
        write_json(out / CONFIG_FILE, asdict(config))
        model.save_pretrained(out / "reference")
    reference = _frozen_copy(model, out / "reference")
    eos = model.config.eos_token_id
    logs: list[StepLog] = []
    for step in range(first, config.steps):
        entry = _step(model, reference, tokenizer, task, config, optimizer, params, rng, generator, eos, on_warning)
        entry.step = step
        logs.append(entry)
        append_jsonl(out / "log.jsonl", asdict(entry))
        if config.save_every and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
            info = {"python_random": _random_to_json(rng), "generator": bytes(generator.get_state().numpy()).hex()}
            save_training_checkpoint(out, step + 1, model.state_dict(), model.config,
                                     optimizer_state(optimizer, model), info, rng_state(), tokenizer)  # fmt: skip
        if on_step is not None:
            on_step(entry)
    return logs


def _random_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _restore(model, optimizer, rng: random.Random, generator: torch.Generator, out: Path) -> int:
    """Load the newest checkpoint of the run in `out` into `model`, `optimizer`, `rng` and `generator`; returns
    the number of steps it had completed."""
    step_dir = read_last(out)
    if step_dir is None:
        raise ValueError(f"{out}: this GRPO run has no checkpoint to resume (it ran without --save-every)")
    info, tensors = read_training_state(step_dir)
    load_model_weights(model, step_dir)
    load_optimizer_state(optimizer, model, info["optimizer"], tensors)
    set_rng_state(info["rng"], tensors)
    version, internal, gauss = info["python_random"]
    rng.setstate((version, tuple(internal), gauss))
    generator.set_state(torch.frombuffer(bytearray.fromhex(info["generator"]), dtype=torch.uint8))
    return int(info["step"])


def _frozen_copy(model: nn.Module, path: Path) -> nn.Module:
    """π_ref: the starting model saved in `path`, frozen, on `model`'s device."""
    reference = type(model).from_pretrained(path, device=model.model.embed_tokens.weight.device)
    reference.eval().requires_grad_(False)
    return reference


def _step(model, reference, tokenizer, task, config, optimizer, params, rng, generator, eos, on_warning) -> StepLog:
    device = model.model.embed_tokens.weight.device
    prompts = [task.prompt(rng) for _ in range(config.prompts_per_step)]
    rows = [tokenizer.encode(p).ids for p in prompts for _ in range(config.group)]
    prompt_ids, prompt_mask = left_padded(rows, device=device)
    start = prompt_ids.shape[1]
    model.eval()
    recorder = RoutingRecorder(model)
    with torch.no_grad(), recorder.recording(len(rows)):
        ids = generate(model, prompt_ids, config.max_new_tokens, do_sample=True, temperature=config.temperature,
                       attention_mask=prompt_mask, generator=generator, eos_token_id=eos)  # fmt: skip
    completions = ids[:, start:]
    ended = torch.zeros_like(completions, dtype=torch.bool)  # the tokens after a completion's EOS
    if eos is not None:
        is_eos = torch.isin(completions, torch.tensor(eos if isinstance(eos, list) else [eos], device=device))
        ended = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    token_mask = ~ended
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completions)], dim=1)

    rewards, skipped = [], 0
    for i, row in enumerate(completions.tolist()):
        text = tokenizer.decode([t for t, keep in zip(row, token_mask[i].tolist(), strict=True) if keep])
        try:
            rewards.append(score(task, prompts[i // config.group], text))
        except RewardError as error:
            if not config.skip_bad_rewards:
                raise
            skipped += 1
            rewards.append(float("nan"))
            if on_warning is not None:
                on_warning(f"skipped a completion: {error}")
    reward_tensor = torch.tensor(rewards, device=device).view(config.prompts_per_step, config.group)
    valid = torch.isfinite(reward_tensor)
    advantages = group_advantages(torch.where(valid, reward_tensor, reward_tensor.nanmean(-1, keepdim=True)))
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages)).flatten()
    token_mask = token_mask & valid.flatten()[:, None]

    recorded = recorder.replay(ids.shape[1])
    replay = recorded if config.routing_replay else None
    with torch.no_grad():
        old_logp = completion_logprobs(model, ids, attention_mask, start, recorded)  # under the sampler's routing
        ref_logp = completion_logprobs(reference, ids, attention_mask, start)
    parts = None
    for _ in range(config.updates_per_batch):
        logp = completion_logprobs(model, ids, attention_mask, start, replay)
        parts = grpo_loss(logp, old_logp, ref_logp, advantages, token_mask, config.clip_eps, config.kl_beta)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
    changed = changed_routing(model, ids, attention_mask, recorded)  # the router after this step's updates
    return StepLog(
        max_vio=recorder.max_violation(attention_mask),
        step=0,
        reward=float(reward_tensor[valid].mean()) if valid.any() else float("nan"),
        loss=parts.loss.item(),
        kl=float(parts.kl),
        ratio_variance=float(parts.ratio.var()) if parts.ratio.numel() > 1 else 0.0,
        clipped=float(parts.clipped),
        changed_routing=changed,
        skipped=skipped,
    )
