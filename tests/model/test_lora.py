"""LoRA (deepmoe.moe.lora, deepmoe.model.lora) against plain references written here: per expert,
y = x (W_j + (α/r)·B_j A_j)ᵀ computed in a loop; the model at step 0 equals its base; merging equals the adapted
forward; training moves only the factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from configs import tiny_model_config
from deepmoe import DeepSeekForCausalLM
from deepmoe.model.lora import LoRAConfig, LoRALinear, apply_lora, base_state_dict, lora_state_dict, merge_lora
from deepmoe.moe.experts import RoutedExperts
from deepmoe.moe.lora import LoRAExperts


def _per_expert_reference(experts: LoRAExperts, x, tokens_per_expert, row_weight):
    """The adapted experts one at a time, with W'_j = W_j + (α/r)·B_j A_j formed explicitly."""
    s = experts.alpha / experts.rank
    out, start = [], 0
    for j, count in enumerate(tokens_per_expert.tolist()):
        rows = x[start : start + count]
        w_gu = experts.gate_up_proj[j] + s * experts.gate_up_proj_lora_B[j] @ experts.gate_up_proj_lora_A[j]
        w_d = experts.down_proj[j] + s * experts.down_proj_lora_B[j] @ experts.down_proj_lora_A[j]
        gate, up = (rows @ w_gu.T).chunk(2, dim=-1)
        hidden = F.silu(gate) * up * row_weight[start : start + count, None]
        out.append(hidden @ w_d.T)
        start += count
    return torch.cat(out)


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_grouped_lora_experts_equal_a_per_expert_loop(implementation):
    torch.manual_seed(0)
    n, hidden, inter, rank = 4, 16, 8, 4
    base = RoutedExperts(n, hidden, inter, implementation).double()
    experts = LoRAExperts(base, rank=rank, alpha=8.0)
    with torch.no_grad():  # B = 0 at init: give it values, so the low-rank path counts
        for p in (experts.gate_up_proj_lora_B, experts.down_proj_lora_B):
            p.normal_(0, 0.3)
    tokens_per_expert = torch.tensor([5, 0, 7, 4])  # an expert without rows too
    x = torch.randn(16, hidden, dtype=torch.float64)
    row_weight = torch.rand(16, dtype=torch.float64)
    got = experts(x, tokens_per_expert, row_weight)
    torch.testing.assert_close(got, _per_expert_reference(experts, x, tokens_per_expert, row_weight))
    # and the merged weights compute the same
    for proj in ("gate_up_proj", "down_proj"):
        a, b = experts.lora_factors(proj)
        torch.testing.assert_close(experts.delta_weight(proj)[2], 2.0 * b[2] @ a[2])


def test_lora_experts_gradients_reach_only_the_factors():
    torch.manual_seed(0)
    experts = LoRAExperts(RoutedExperts(4, 8, 4), rank=2, alpha=2.0)
    experts.gate_up_proj.requires_grad_(False)
    experts.down_proj.requires_grad_(False)
    x = torch.randn(8, 8)
    experts(x, torch.tensor([2, 2, 2, 2])).square().sum().backward()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    assert experts.down_proj_lora_B.grad.abs().sum() > 0  # B = 0: A's gradient is 0 at step 0, B's is not


def test_esft_selection_keeps_unchosen_experts_exactly_at_zero():
    torch.manual_seed(0)
    experts = LoRAExperts(RoutedExperts(4, 8, 4), rank=2, alpha=2.0, experts_trained=[1, 3])
    for p in (experts.gate_up_proj, experts.down_proj):
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in experts.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        experts(torch.randn(8, 8), torch.tensor([2, 2, 2, 2])).square().sum().backward()
        opt.step()
    for proj in ("gate_up_proj", "down_proj"):
        a, b = experts.lora_factors(proj)
        assert a[[0, 2]].abs().sum() == 0 and b[[0, 2]].abs().sum() == 0
        assert b[[1, 3]].abs().sum() > 0


def test_lora_linear_equals_its_merged_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=True).double()
    lora = LoRALinear(linear, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    w = linear.weight + 2.0 * lora.lora_B @ lora.lora_A
    torch.testing.assert_close(lora(x), x @ w.T + linear.bias)


def _model(**overrides):
    torch.manual_seed(0)
    return DeepSeekForCausalLM(tiny_model_config(**overrides)).eval()


@pytest.mark.parametrize("targets", [("experts",), ("experts", "attention")])
def test_step_zero_equals_base_and_merge_equals_adapted(targets):
    model = _model()
    ids = torch.randint(0, 64, (2, 7))
    base_logits = model(ids).logits
    base = {n: t.clone() for n, t in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)  # B = 0: exactly the base
    assert base_state_dict(model).keys() == base.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    assert any("self_attn" in n for n in trainable) == ("attention" in targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits)
    merge_lora(model)
    assert model.state_dict().keys() == base.keys()
    torch.testing.assert_close(model(ids).logits, adapted)


def test_cached_decoding_with_adapters_equals_uncached_and_the_merged_model():
    """MLA's absorbed decoding reads kv_b_proj's weight directly: with it left out of the targets, the cached
    path sees every adapter, as the uncached one and the merged weights do."""
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("experts", "attention")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    model.set_absorbed_attention(True)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6)
        uncached = model.generate(ids, max_new_tokens=6, use_cache=False)
        merged = merge_lora(model).generate(ids, max_new_tokens=6)
    assert torch.equal(cached, uncached) and torch.equal(cached, merged)


def test_bad_lora_config_is_one_clear_error():
    with pytest.raises(ValueError, match=r"LoRAConfig.rank=0 is invalid"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"LoRAConfig.targets=.*mlp.* is invalid"):
        LoRAConfig(rank=2, targets="experts,mlp")
    with pytest.raises(ValueError, match="finds nothing to adapt"):
        apply_lora(_model(moe=None), LoRAConfig(rank=2))
    model = apply_lora(_model(), LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
