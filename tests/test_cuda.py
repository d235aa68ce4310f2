"""The same model on CUDA and on the CPU: logits, a bf16 MoE layer, cached greedy decoding, a training step and
the grouped-product kernel. Skipped without CUDA; the CPU is the default device inside these tests and every
CUDA tensor is placed there by name, so they run the same with or without `pytest --device cuda`."""

from __future__ import annotations

import copy

import pytest
import torch

from configs import tiny_preset
from deepmoe import MoE, MoEConfig
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.generate import generate
from deepmoe.moe.experts import grouped_mm_available
from deepmoe.train.step import optimizer_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
VOCAB = 97


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max(max|b|, 0.1), on the CPU in float32."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(0.1)).item()


def _tiny_v3() -> DeepSeekForCausalLM:
    """A random 2-layer float32 tiny-v3 on the CPU; a larger init spreads the logits so greedy has no near-ties."""
    torch.manual_seed(0)
    config = tiny_preset("tiny-v3", num_hidden_layers=2, vocab_size=VOCAB, initializer_range=0.2)
    with torch.device(CPU):
        return DeepSeekForCausalLM(config)


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator(CPU).manual_seed(seed), device=CPU)


@pytest.fixture(autouse=True)
def _cpu_default_and_float32_matmuls():
    """The CPU as the default device, as users have it (also under `pytest --device cuda`), and full float32
    products on both sides (TF32 would round the CUDA side to 10 mantissa bits)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with torch.device(CPU):
        yield
    torch.set_float32_matmul_precision(previous)


def test_logits_match_the_cpu():
    cpu = _tiny_v3().eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids = _ids(2, 24)
    with torch.no_grad():
        want = cpu(ids).logits
        got = gpu(ids.to(CUDA)).logits
    assert got.device.type == "cuda"
    assert _rel_err(got, want) < 1e-4


def test_cached_greedy_generation_matches_the_cpu():
    cpu = _tiny_v3().eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids = _ids(2, 6)
    want = generate(cpu, ids, max_new_tokens=12, use_cache=True)
    got = generate(gpu, ids.to(CUDA), max_new_tokens=12, use_cache=True)
    assert got.device.type == "cuda"
    assert got.tolist() == want.tolist()


def test_one_training_step_matches_the_cpu():
    cpu = _tiny_v3().train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    batches = [_ids(2, 16, seed) for seed in (1, 2)]
    results = {}
    for name, model, device in (("cpu", cpu, CPU), ("cuda", gpu, CUDA)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        results[name] = optimizer_step(model, optimizer, [b.to(device) for b in batches], max_norm=1.0)
    assert results["cuda"].losses == pytest.approx(results["cpu"].losses, rel=1e-4)
    assert results["cuda"].grad_norm == pytest.approx(results["cpu"].grad_norm, rel=1e-3)
    for (name, p_gpu), p_cpu in zip(gpu.named_parameters(), cpu.parameters(), strict=True):
        if p_cpu.grad is None:
            assert p_gpu.grad is None or p_gpu.grad.abs().max() == 0, name
            continue
        assert _rel_err(p_gpu.grad, p_cpu.grad) < 1e-3, name
        assert _rel_err(p_gpu, p_cpu) < 1e-4, name


def _moe_config(**overrides) -> MoEConfig:
    fields = dict(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        scoring_func="sigmoid", norm_topk_prob=True, topk_method="noaux_tc", n_group=4, topk_group=2,
        use_expert_bias=True,
    )  # fmt: skip
    return MoEConfig(**{**fields, **overrides})


def test_bfloat16_moe_layer_forward_and_backward_match_float32():
    """bf16 weights and input on CUDA against float32 on the same (bf16-representable) values: bf16 rounding."""
    torch.manual_seed(0)
    with torch.device(CPU):
        reference = MoE(_moe_config()).bfloat16().float()
        x = torch.randn(2, 16, 64).bfloat16().float()
    reference.to(CUDA)
    x = x.to(CUDA)
    want = reference(x.clone().requires_grad_()).hidden_states
    want.sum().backward()
    layer = copy.deepcopy(reference).bfloat16()
    layer.zero_grad()
    xin = x.bfloat16().requires_grad_()
    got = layer(xin).hidden_states
    assert got.dtype == torch.bfloat16 and got.device.type == "cuda"
    got.float().sum().backward()
    assert _rel_err(got, want) < 3e-2
    assert xin.grad is not None and torch.isfinite(xin.grad).all()
    for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert _rel_err(p.grad, p_ref.grad) < 5e-2, name


@pytest.mark.skipif(
    not torch.cuda.is_available() or not grouped_mm_available("cuda", torch.bfloat16),
    reason="no CUDA grouped product for bfloat16 in this torch build or on this GPU",
)
def test_grouped_kernel_matches_the_per_expert_loop():
    torch.manual_seed(0)
    with torch.device(CUDA):
        grouped = MoE(_moe_config(experts_implementation="grouped_mm")).bfloat16()
        loop = MoE(_moe_config(experts_implementation="loop")).bfloat16()
        loop.load_state_dict(grouped.state_dict())
        x = torch.randn(4, 64, 64, dtype=torch.bfloat16)
    outs, grads = [], []
    for layer in (grouped, loop):
        xin = x.clone().requires_grad_()
        out = layer(xin).hidden_states
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([xin.grad] + [p.grad for p in layer.parameters()])
    assert _rel_err(outs[0], outs[1]) < 2e-2
    for got, want in zip(grads[0], grads[1], strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert _rel_err(got, want) < 2e-2
