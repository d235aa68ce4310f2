"""The shared training step (`deepmoe.train.step.optimizer_step`) against a plain reference: one step of a
tiny model written out by hand (forward, backward of the mean loss, global-norm clipping, AdamW by its
formula) gives the same parameters (to the fused kernel's rounding); the parameter filter (what the optimizer
holds) and a gradient hook leave everything else bit-identical; non-finite losses and norms stop before the update."""

from __future__ import annotations

import math
from operator import attrgetter

import pytest
import torch

from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, get_preset
from deepmoe.train.config import TrainConfig, build_optimizer, lr_at
from deepmoe.train.step import NonFiniteError, optimizer_step

VOCAB = 64
ADAMW = {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> DeepSeekForCausalLM:
    config = DeepSeekConfig.from_dict({**get_preset("tiny-v3").to_dict(), "num_hidden_layers": 2, "vocab_size": VOCAB})
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(config).train()


def _micro_batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@torch.no_grad()
def _adamw_by_hand(params, lr, weight_decay, betas, eps) -> None:
    """The first AdamW step (zero moments, step 1) by its formula, as torch's single-tensor AdamW orders it."""
    beta1, beta2 = betas
    for p in params:
        decay = weight_decay if p.dim() >= 2 else 0.0  # matrices only
        p.mul_(1 - lr * decay)
        exp_avg = torch.zeros_like(p).lerp_(p.grad, 1 - beta1)
        exp_avg_sq = torch.zeros_like(p).mul_(beta2).addcmul_(p.grad, p.grad.conj(), value=1 - beta2)
        bias1, bias2 = 1 - beta1, 1 - beta2
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias1)


@pytest.mark.cpu_only  # exact loss and gradient-norm equality of two runs: CUDA's atomic adds are not reproducible
@pytest.mark.parametrize("max_norm", [0.05, None])
def test_one_step_equals_the_step_written_out_by_hand(max_norm):
    batches = _micro_batches()
    model = _model()
    optimizer = build_optimizer(model, **ADAMW)
    result = optimizer_step(model, optimizer, batches, max_norm=max_norm, collect=attrgetter("lm_loss"))

    reference = _model()
    params = [p for p in reference.parameters() if p.requires_grad]
    losses = []
    for batch in batches:
        loss = reference(batch, labels=batch).loss.float()
        losses.append(loss.item())
        (loss / len(batches)).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    _adamw_by_hand(params, **ADAMW)

    assert result.losses == losses and result.grad_norm == float(norm)
    assert max_norm is None or result.grad_norm > max_norm  # the clipping did something
    assert len(result.collected) == 2 and all(t.dim() == 0 for t in result.collected)
    # the optimizer is torch's fused AdamW, which rounds the formula's steps in its own order
    state, want = _state(model), _state(reference)
    assert state.keys() == want.keys()
    for name in state:
        torch.testing.assert_close(state[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_loss_selector_and_the_forward_context():
    batches = _micro_batches(1)
    model, reference = _model(), _model()
    entered = []

    class Context:
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    optimizer = build_optimizer(model, **ADAMW)
    result = optimizer_step(model, optimizer, batches, loss=attrgetter("lm_loss"), context=Context,
                            forward=lambda b: model(b, labels=b, output_mtp=False))  # fmt: skip
    out = reference(batches[0], labels=batches[0], output_mtp=False)
    out.lm_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], math.inf)
    build_optimizer(reference, **ADAMW).step()
    assert entered == [True] and result.losses == [out.lm_loss.item()] and result.grad_norm == float(norm)
    _assert_equal(_state(model), _state(reference))


def test_the_parameter_filter_and_a_gradient_mask_leave_the_rest_bit_identical():
    model = _model()
    before = _state(model)
    experts = model.moe_layers()[1].experts
    frozen = experts.down_proj  # has a stale gradient: neither the norm nor the update may see it
    frozen.grad = torch.full_like(frozen, 1e6)
    selected = [experts.gate_up_proj, model.lm_head.weight]
    calls = []

    def norm() -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in selected])))

    def mask() -> None:  # between the backward and the clipping: expert 0's slice gets no gradient
        calls.append(norm())
        experts.gate_up_proj.grad[0] = 0
        calls.append(norm())

    optimizer = build_optimizer(selected, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    result = optimizer_step(model, optimizer, _micro_batches(), max_norm=1.0, grad_hook=mask)
    after = model.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {names[id(p)] for p in selected}
    assert torch.equal(after[names[id(experts.gate_up_proj)]][0], before[names[id(experts.gate_up_proj)]][0])
    unmasked, masked = calls  # the norm is the masked gradients', clipped to max_norm, without the stale one
    assert unmasked > masked > 1.0 and math.isclose(result.grad_norm, masked, rel_tol=1e-6)
    assert math.isclose(norm(), 1.0, rel_tol=1e-5)
    assert torch.equal(frozen.grad, torch.full_like(frozen, 1e6))


def test_hooks_run_in_order_and_reduce_sees_each_loss():
    model = _model()
    order = []
    optimizer = build_optimizer(model, **ADAMW)
    original_step = optimizer.step
    optimizer.step = lambda: (order.append("step"), original_step())[1]
    result = optimizer_step(
        model, optimizer, _micro_batches(3), reduce=lambda v: (order.append("reduce"), 2 * v)[1],
        grad_hook=lambda: order.append("grad_hook"), clip=lambda m: (order.append(f"clip {m}"), 1.5)[1],
        before_update=lambda: order.append("before_update"), max_norm=0,
    )  # fmt: skip
    assert order == ["reduce"] * 3 + ["grad_hook", "clip inf", "before_update", "step"]
    assert result.grad_norm == 1.5 and len(result.losses) == 3 and result.collected == []


@pytest.mark.parametrize("where", ["loss", "gradient norm"])
def test_non_finite_values_stop_before_the_update(where):
    model = _model()
    before = _state(model)
    optimizer = build_optimizer(model, **ADAMW)
    if where == "loss":
        seen = []
        reduce = lambda v: (seen.append(v), v if len(seen) < 2 else math.nan)[1]  # noqa: E731
        with pytest.raises(NonFiniteError, match=r"the loss is nan \(micro-batch 2 of 3\)") as info:
            optimizer_step(model, optimizer, _micro_batches(3), reduce=reduce)
        assert (info.value.what, info.value.micro, info.value.count) == ("loss", 2, 3)
    else:
        with pytest.raises(NonFiniteError, match="the gradient norm is inf") as info:
            optimizer_step(model, optimizer, _micro_batches(), clip=lambda m: math.inf)
        assert info.value.micro is None and math.isinf(info.value.value)
    assert not optimizer.state
    _assert_equal(_state(model), before)


def test_build_optimizer_takes_a_config_or_all_four_settings():
    model = _model()
    config = TrainConfig(preset="tiny-v3", lr=1e-2, warmup_steps=2, weight_decay=0.05, beta2=0.9, eps=1e-6)
    optimizer = build_optimizer(model, config)
    decay, rest = optimizer.param_groups
    assert decay["lr"] == lr_at(0, config) and decay["betas"] == (config.beta1, 0.9) and decay["eps"] == 1e-6
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.05, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in rest["params"])
    assert build_optimizer(model, config, lr=0.5).param_groups[0]["lr"] == 0.5
    (only,) = build_optimizer([model.lm_head.weight], **ADAMW).param_groups
    assert only["params"] == [model.lm_head.weight] and only["weight_decay"] == 0.1
    with pytest.raises(TypeError, match="all of lr, weight_decay, betas and eps"):
        build_optimizer(model, lr=1e-3)
