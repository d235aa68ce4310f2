"""No host synchronisation in the forward pass: the MoE layer and the decoder trace under
`torch.compile(fullgraph=True)` (a value read on the host, `.item()` / `bool(t)` / a data-dependent shape, would
break the graph and fail the compile) and compute what eager mode does; `torch.func.grad` works through the
routed experts; the value checks live at the entry points and behind `deepmoe.runtime.set_debug_checks`.

Most compiles use the "aot_eager" backend (Dynamo and AOTAutograd, forward and backward traced with fake tensors,
no code generation: quick); one per model also goes through Inductor (slow).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor
from torch.func import functional_call, grad

from configs import tiny_moe, tiny_preset, tiny_v3_moe
from deepmoe.config import MoEConfig
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe import MoE
from deepmoe.moe.router import Router
from deepmoe.runtime import debug_checks, debug_checks_enabled, set_debug_checks

# cpu_only: torch.compile's CPU backends and timings on CPU
pytestmark = pytest.mark.cpu_only

if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
    pytest.skip("torch.compile is not available on this platform", allow_module_level=True)

DEFAULT = tiny_moe(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=2)
V3 = tiny_v3_moe(
    hidden_size=16, moe_intermediate_size=8, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    seq_aux_loss_alpha=1e-3,
)  # fmt: skip
CAPACITY = dataclasses.replace(DEFAULT, capacity_factor=0.5, aux_loss_alpha=0.01, z_loss_coef=1e-3)
CONFIGS = {"default": DEFAULT, "v3": V3, "capacity": CAPACITY}


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_no_debug_checks():
    torch._dynamo.reset()
    with debug_checks(False):  # whatever DEEPMOE_DEBUG_CHECKS says
        yield
    torch._dynamo.reset()


def _forward_backward(run, layer: MoE, x: Tensor):
    """`run` (the layer or its compiled form) on x: (its output, x's gradient, the layer's gradients)."""
    x = x.clone().requires_grad_()
    out = run(x)
    (out.hidden_states.square().sum() + out.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    return out, x.grad, grads


def _compare_moe(config: MoEConfig, backend: str, training: bool = True, **layer_kwargs) -> None:
    torch.manual_seed(0)
    layer = MoE(config).train(training)
    for name, value in layer_kwargs.items():
        setattr(layer.experts, name, value)
    x = torch.randn(2, 6, config.hidden_size)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got, got_dx, got_grads = _forward_backward(compiled, layer, x)
    want, want_dx, want_grads = _forward_backward(layer, layer, x)
    torch.testing.assert_close(got.hidden_states, want.hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.routing.topk_idx, want.routing.topk_idx)
    torch.testing.assert_close(got.stats.tokens_per_expert, want.stats.tokens_per_expert)
    torch.testing.assert_close(got.stats.kept_per_expert, want.stats.kept_per_expert)
    torch.testing.assert_close(got_dx, want_dx, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_compiles_fullgraph_and_equals_eager(name):
    _compare_moe(CONFIGS[name], "aot_eager")


def test_moe_compiles_with_the_loop_experts_and_an_expert_mask():
    torch.manual_seed(0)
    layer = MoE(V3).eval()
    layer.experts.implementation = "loop"
    layer.gate.set_expert_mask(disabled=[1, 5], forced=[2])
    x = torch.randn(10, V3.hidden_size)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), layer(x)
    torch.testing.assert_close(got.hidden_states, want.hidden_states, atol=1e-5, rtol=1e-5)
    idx = got.routing.topk_idx
    assert (idx == 2).any(-1).all() and not ((idx == 1) | (idx == 5)).any()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "v3"])
def test_moe_compiles_with_inductor(name):
    _compare_moe(CONFIGS[name], "inductor")


def test_moe_compiles_in_bfloat16_with_the_grouped_kernel():
    """bf16 is the dtype torch's compiler kernel of the grouped product takes: compiled code calls it directly."""
    torch.manual_seed(0)
    layer = MoE(DEFAULT).bfloat16()
    x = torch.randn(12, DEFAULT.hidden_size, dtype=torch.bfloat16)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x).hidden_states
    torch.testing.assert_close(got, layer(x).hidden_states, atol=2e-2, rtol=2e-2)


def _tiny_v3(**overrides: object) -> DeepSeekForCausalLM:
    """tiny-v3 (MLA, sigmoid / noaux_tc routing, MTP) cut to one MoE block and its MTP module."""
    torch.manual_seed(0)
    fields = {"num_hidden_layers": 1, "first_k_dense_replace": 0, "vocab_size": 97, **overrides}
    return DeepSeekForCausalLM(tiny_preset(**fields))


def _compare_decoder(backend: str, without_labels: bool = True) -> None:
    model = _tiny_v3()
    assert sorted(model.moe_layers()) == [0, 1]  # the block and the MTP module's block
    ids = torch.randint(0, 97, (2, 7))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    if without_labels:
        got, want = compiled(ids), model(ids)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-5, rtol=1e-5)

    got, want = compiled(ids, labels=ids), model(ids, labels=ids)
    assert got.mtp_logits and got.mtp_loss is not None
    for key in ("logits", "loss", "lm_loss", "aux_loss", "mtp_loss"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), atol=1e-5, rtol=1e-5, msg=key)
    for idx, stats in want.routing_stats.items():
        torch.testing.assert_close(got.routing_stats[idx].tokens_per_expert, stats.tokens_per_expert)
    got.loss.backward()
    got_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got_grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_decoder_compiles_fullgraph_and_equals_eager():
    _compare_decoder("aot_eager")


@pytest.mark.slow
def test_decoder_compiles_with_inductor():
    _compare_decoder("inductor", without_labels=False)  # logits and losses (a compile takes minutes on 2 cores)


def test_compiled_decoder_takes_an_attention_mask():
    model = _tiny_v3(num_nextn_predict_layers=0).eval()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for attention_mask in (mask, torch.ones_like(ids)):  # all ones: eager skips the mask, compiled code applies it
        got, want = compiled(ids, attention_mask=attention_mask), model(ids, attention_mask=attention_mask)
        torch.testing.assert_close(got.logits[1], want.logits[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.logits[0, 2:], want.logits[0, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["default", "v3"])
@pytest.mark.parametrize("implementation", ["auto", "loop"])
def test_func_grad_of_the_layer_equals_autograd(name, implementation):
    torch.manual_seed(0)
    layer = MoE(CONFIGS[name])
    layer.experts.implementation = implementation
    x = torch.randn(2, 5, layer.config.hidden_size)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p):
        out = functional_call(layer, p, (x,))
        return out.hidden_states.square().sum() + out.aux_loss

    got = grad(loss)(params)
    layer.zero_grad()
    loss(dict(layer.named_parameters())).backward()
    for k, p in layer.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-5, rtol=1e-5, msg=k)


def test_grouped_product_gradients_match_a_dense_reference():
    """The experts' operator (kernel or loop) and its backward, on uneven groups with an empty one."""
    from deepmoe.moe.experts import grouped_matmul

    torch.manual_seed(0)
    sizes = [3, 0, 5, 4]
    x = torch.randn(sum(sizes), 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(sizes), 8, 4, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    for use_kernel in (True, False):
        assert torch.autograd.gradcheck(lambda a, b, k=use_kernel: grouped_matmul(a, b, offsets, k), (x, w))
        assert torch.autograd.gradgradcheck(lambda a, b, k=use_kernel: grouped_matmul(a, b, offsets, k), (x, w))


# ---- the value checks: entry points in eager mode, debug switch for the layers ---------------------------------


def test_entry_points_still_refuse_bad_values_in_eager_mode():
    with pytest.raises(ValueError, match="NaN or inf"):
        MoE(DEFAULT)(torch.full((3, 16), float("nan")))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _tiny_v3()(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="only 0"):
        _tiny_v3()(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 2]]))


def test_layers_inside_a_model_skip_the_value_check_unless_debugging():
    layer = MoE(DEFAULT)
    x = torch.full((3, 16), float("nan"))
    assert torch.isnan(layer(x, check_finite=False).hidden_states).all()  # no sync: NaN in, NaN out
    with debug_checks():
        assert debug_checks_enabled()
        with pytest.raises(ValueError, match="NaN or inf"):
            layer(x, check_finite=False)
    assert not debug_checks_enabled()


def test_router_checks_logits_and_its_mask_only_under_the_debug_switch():
    config = dataclasses.replace(DEFAULT, n_routed_experts=4, num_experts_per_tok=2)
    router = Router(config)
    x = torch.randn(5, 16)
    x[0, 0] = float("inf")
    router(x)  # no check: no sync
    with debug_checks(), pytest.raises(ValueError, match="NaN or inf"):
        router(x)
    # a mask installed behind set_expert_mask's back, leaving a token 1 expert for K = 2
    router.disabled_experts.copy_(torch.tensor([True, True, True, False]))
    router.has_expert_mask = True
    router(torch.randn(5, 16))
    with debug_checks(), pytest.raises(RuntimeError, match="disabled or out-of-group"):
        router(torch.randn(5, 16))


def test_debug_switch_is_process_wide_and_off_while_compiling():
    calls = []

    def probe(x):
        calls.append(debug_checks_enabled())
        return x + 1

    set_debug_checks(True)
    try:
        torch.compile(probe, fullgraph=True, backend="eager")(torch.ones(2))
        assert calls == [False]  # traced once, with the checks off
        assert debug_checks_enabled()
    finally:
        set_debug_checks(False)
