"""`from_pretrained(..., mmap=True)`: weights memory-mapped from the safetensors files (views, no copy), the
per-expert, FP8 and cast ones built layer by layer; the same logits as a normal load; inference only."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from deepmoe.config import DeepSeekConfig, MoEConfig
from deepmoe.io import checkpoint as ckpt_module
from deepmoe.io import config_to_hf, expected_shapes, save_checkpoint
from deepmoe.io.fp8_blocks import quantize_fp8
from deepmoe.model import from_pretrained

# cpu_only: memory-mapped loading and RSS measurements
pytestmark = pytest.mark.cpu_only


def tiny_config(**overrides) -> DeepSeekConfig:
    """2 layers (the first dense), V3 routing, one MTP module."""
    moe = MoEConfig(hidden_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    topk_method="noaux_tc", n_group=4, topk_group=2, use_expert_bias=True)  # fmt: skip
    fields = dict(model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, moe=moe, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1)  # fmt: skip
    fields.update(overrides)
    return DeepSeekConfig(**fields)


def random_state(config: DeepSeekConfig, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        state[name] = t.to(torch.float32 if name.endswith("e_score_correction_bias") else dtype)
    return state


PROMPT = torch.tensor([[5, 17, 99, 3, 64, 8, 120, 42, 7, 1]])


def _outputs(model) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(PROMPT, output_mtp=True)
    return [out.logits, *out.mtp_logits]


def _assert_same(a, b) -> None:
    got, want = _outputs(a), _outputs(b)
    assert len(got) == len(want) == 2  # the logits and the MTP module's
    for x, y in zip(got, want, strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


def _in_maps(model, t: torch.Tensor) -> bool:
    return any(a <= t.data_ptr() and t.data_ptr() + t.nbytes <= b for a, b in model.mapped_files.ranges())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mapped_model_gives_the_same_logits_and_shares_the_files_memory(tmp_path, dtype):
    config = tiny_config()
    save_checkpoint(random_state(config, dtype), config, tmp_path, max_shard_size="60KB")  # shards
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded, mapped = from_pretrained(tmp_path), from_pretrained(tmp_path, mmap=True)
    _assert_same(mapped, loaded)
    params = dict(mapped.named_parameters())
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.mtp.0.block.self_attn.q_a_proj.weight",
    ):
        if name in params:  # fmt: skip
            assert params[name].dtype == dtype and _in_maps(mapped, params[name]), name
    views = [n for n, p in params.items() if not p.is_meta]
    assert all(_in_maps(mapped, params[n]) for n in views)  # nothing stored as is was copied
    # the stacked experts exist only while their layer runs
    experts = [n for n, p in params.items() if p.is_meta]
    assert experts and all(n.endswith(("gate_up_proj", "down_proj")) for n in experts)
    assert not any(p.requires_grad for p in mapped.parameters())


def test_cast_on_load_is_built_per_layer(tmp_path):
    config = tiny_config()
    save_checkpoint(random_state(config, torch.bfloat16), config, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    mapped = from_pretrained(tmp_path, dtype=torch.float32, mmap=True)
    _assert_same(mapped, loaded)
    assert mapped.model.layers[0].self_attn.kv_b_proj.weight.is_meta  # built when its layer runs
    assert mapped.lm_head.weight.dtype == torch.float32 and not mapped.lm_head.weight.is_meta  # built at load


def test_fp8_checkpoint_with_partial_edge_blocks(tmp_path):
    config = tiny_config()
    block = (16, 24)  # 64 = 4 × 16 rows... and 64 = 2 × 24 + 16 columns: partial edge blocks
    save_checkpoint(random_state(config, torch.bfloat16), config, tmp_path)
    with ckpt_module.SafetensorsCheckpoint(tmp_path) as checkpoint:
        files = {n: checkpoint.get(n).clone() for n in checkpoint.names()}
    quantized = [n for n, t in files.items() if t.dim() == 2 and "proj" in n and "embed" not in n]
    assert any(".experts.3." in n for n in quantized) and any("self_attn" in n for n in quantized)
    for name in quantized:
        files[name], files[name + "_scale_inv"] = quantize_fp8(files[name].float(), block)
    (tmp_path / "model.safetensors").unlink()
    save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    raw = dict(config_to_hf(config), torch_dtype="bfloat16", quantization_config=quantization)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded, mapped = from_pretrained(tmp_path), from_pretrained(tmp_path, mmap=True)
    _assert_same(mapped, loaded)
    attention = mapped.model.layers[0].self_attn.q_a_proj.weight
    assert attention.is_meta and attention.dtype == torch.bfloat16  # dequantised when layer 0 runs


def test_generate_on_a_mapped_model(tmp_path):
    config = tiny_config(num_nextn_predict_layers=0)
    save_checkpoint(random_state(config, torch.bfloat16), config, tmp_path)
    loaded, mapped = from_pretrained(tmp_path), from_pretrained(tmp_path, mmap=True)
    want = loaded.generate(PROMPT, max_new_tokens=6)
    assert torch.equal(mapped.generate(PROMPT, max_new_tokens=6), want)
    assert mapped.model.layers[1].mlp.experts.gate_up_proj.is_meta  # dropped again after each step


def test_mapped_model_is_for_inference_only(tmp_path):
    config = tiny_config(num_nextn_predict_layers=0)
    save_checkpoint(random_state(config, torch.bfloat16), config, tmp_path)
    mapped = from_pretrained(tmp_path, mmap=True)
    with pytest.raises(RuntimeError, match="mmap=True.*without mmap to train"):
        mapped.train()
    assert mapped.eval() is mapped and not mapped.training
    with pytest.raises(ValueError, match="delta"):
        from_pretrained(tmp_path, mmap=True, delta=tmp_path)
    with pytest.raises(ValueError, match="not the CPU"):
        from_pretrained(tmp_path, mmap=True, device="cuda")
    with pytest.raises((RuntimeError, NotImplementedError)):  # the fused experts have no data outside a forward
        mapped.model.layers[1].mlp.experts.gate_up_proj.sum().item()
    # the file is never written: a write to a view changes this process's copy only
    embed = mapped.model.embed_tokens.weight
    before = (tmp_path / "model.safetensors").read_bytes()
    embed.data[0].fill_(1.0)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not torch.equal(from_pretrained(tmp_path, mmap=True).model.embed_tokens.weight[0], embed[0])


def test_analyze_on_a_mapped_model(tmp_path):
    from deepmoe.tools.analyze import analyze

    config = tiny_config(num_nextn_predict_layers=0)
    save_checkpoint(random_state(config, torch.bfloat16), config, tmp_path)
    g = torch.Generator().manual_seed(1)
    batches = {s: [torch.randint(0, 128, (2, 12), generator=g)] for s in ("a", "b")}
    want = analyze(from_pretrained(tmp_path), batches)
    assert analyze(from_pretrained(tmp_path, mmap=True), batches) == want
