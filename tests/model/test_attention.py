"""MLA and MHA against transformers' own modules on the same weights, and the KV cache against full forwards.

transformers is given what its decoder layer would give its attention: position embeddings from its own rotary
class (V3 and Llama: (cos, sin) of shape [B, S, d]; V2: complex freqs_cis [B, S, d/2]) and an additive causal mask
[B, 1, S, S] (its eager attention does no masking of its own). deepmoe's configs keep config.json's rope_theta and
rope_scaling; transformers 5 wants them merged into rope_parameters (`_hf_rope_parameters`).
"""

from __future__ import annotations

import math

import pytest
import torch

from deepmoe.config import DeepSeekConfig
from deepmoe.model.attention import KVCache, MultiHeadAttention, MultiHeadLatentAttention, build_attention
from deepmoe.model.rope import apply_rotary, softmax_scale

YARN = {  # DeepSeek-V2's rope_scaling (mscale == mscale_all_dim), with a 4x extension of a 4096 context
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
# mscale != mscale_all_dim: transformers then scales cos/sin by mscale(s, 1) / mscale(s, 0.5) != 1
YARN_UNEQUAL = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}
ROPES = {"default": None, "yarn": YARN, "yarn-unequal-mscale": YARN_UNEQUAL}
START = 4090  # positions start here: across the pretraining length, where YaRN's blend matters


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _mla_config(**overrides) -> DeepSeekConfig:
    fields = dict(
        hidden_size=64,
        num_attention_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=12,
        max_position_embeddings=16384,
        rope_scaling=YARN,
    )
    return DeepSeekConfig(**{**fields, **overrides})


def _mha_config(**overrides) -> DeepSeekConfig:
    fields = dict(
        model_type="deepseek",
        attention_type="mha",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_interleave=False,
        max_position_embeddings=16384,
    )
    return DeepSeekConfig(**{**fields, **overrides})


def _build(config: DeepSeekConfig, layer_idx: int = 0, seed: int = 0) -> torch.nn.Module:
    """An attention module with random norm gains and biases (nn.Linear's init gives the weights)."""
    torch.manual_seed(seed + layer_idx)
    module = build_attention(config, layer_idx)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return module


def _hf_rope_parameters(config: DeepSeekConfig) -> dict:
    """config.json's rope_theta + rope_scaling as transformers 5's rope_parameters."""
    scaling = {k: v for k, v in (config.rope_scaling or {}).items() if k != "type"}
    return {"rope_type": "yarn" if config.rope_scaling else "default", "rope_theta": config.rope_theta, **scaling}


def _hf_causal_mask(seq: int) -> torch.Tensor:
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]  # [1, 1, S, S]


def _load_into(hf: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Same parameter names and shapes, so one state_dict loads into either module without remapping."""
    ours_state, hf_state = ours.state_dict(), hf.state_dict()
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in hf_state.items()}
    hf.load_state_dict(ours_state, strict=True)


# (model_type, rope_interleave): transformers' V2 always rotates interleaved pairs, V3 follows rope_interleave
VERSIONS = [("deepseek_v3", True), ("deepseek_v3", False), ("deepseek_v2", True)]


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("q_lora", ["q_proj", "q_lora+bias"])
@pytest.mark.parametrize(("model_type", "interleave"), VERSIONS)
def test_mla_matches_transformers(model_type: str, interleave: bool, q_lora: str, rope: str):
    transformers = pytest.importorskip("transformers")
    if model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3Attention as HFAttention,
        )
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3RotaryEmbedding as HFRotary,
        )

        hf_config_cls = transformers.DeepseekV3Config
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
            DeepseekV2Attention as HFAttention,
        )
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
            DeepseekV2RotaryEmbedding as HFRotary,
        )

        hf_config_cls = transformers.DeepseekV2Config

    with_lora = q_lora == "q_lora+bias"
    config = _mla_config(
        model_type=model_type,
        q_lora_rank=24 if with_lora else None,
        attention_bias=with_lora,
        rope_scaling=ROPES[rope],
        rope_interleave=interleave,
    )
    ours = _build(config)
    fields = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim")
    fields += ("qk_rope_head_dim", "v_head_dim", "attention_bias", "max_position_embeddings")
    hf_config = hf_config_cls(
        **{f: getattr(config, f) for f in fields},
        num_key_value_heads=config.num_attention_heads,
        rope_parameters=_hf_rope_parameters(config),
        **({"rope_interleave": interleave} if model_type == "deepseek_v3" else {}),
    )
    hf_config._attn_implementation = "eager"
    hf = HFAttention(hf_config, layer_idx=0)
    _load_into(hf, ours)
    hf_rotary = HFRotary(hf_config)
    assert torch.equal(ours.rotary.inv_freq, hf_rotary.inv_freq)
    assert ours.rotary.attention_factor == pytest.approx(hf_rotary.attention_scaling, rel=1e-12)
    assert ours.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)

    torch.manual_seed(1)
    x = torch.randn(2, 9, config.hidden_size)
    positions = torch.arange(START, START + 9)
    position_embeddings = hf_rotary(x, positions[None])
    with torch.no_grad():
        want = hf(hidden_states=x, position_embeddings=position_embeddings, attention_mask=_hf_causal_mask(9))[0]
        for absorb in (False, True):
            ours.absorb = absorb
            assert _rel_err(ours(x, positions), want) < 1e-5, f"absorb={absorb}"


@pytest.mark.parametrize("rope", ["default", "yarn-no-mscale"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_mha_matches_llama(kv_heads: int, bias: bool, rope: str):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    # without mscale_all_dim the softmax scale stays 1/sqrt(d) and YaRN only scales cos/sin, as Llama's yarn does
    scaling = None if rope == "default" else {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    config = _mha_config(num_key_value_heads=kv_heads, attention_bias=bias, rope_scaling=scaling)
    ours = _build(config)
    hf_config = transformers.LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=kv_heads,
        attention_bias=bias,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=_hf_rope_parameters(config),
    )
    hf_config._attn_implementation = "eager"
    hf = LlamaAttention(hf_config, layer_idx=0)
    _load_into(hf, ours)
    hf_rotary = LlamaRotaryEmbedding(hf_config)

    torch.manual_seed(1)
    x = torch.randn(2, 9, config.hidden_size)
    positions = torch.arange(START, START + 9)
    with torch.no_grad():
        want = hf(hidden_states=x, position_embeddings=hf_rotary(x, positions[None]), attention_mask=_hf_causal_mask(9))
        assert _rel_err(ours(x, positions), want[0]) < 1e-5


CACHED = {  # name -> (config, absorb)
    "mla": (_mla_config(), False),
    "mla-absorbed": (_mla_config(), True),
    "mla-no-q-lora": (_mla_config(q_lora_rank=None, rope_scaling=None), False),
    "mla-no-q-lora-absorbed": (_mla_config(q_lora_rank=None, rope_scaling=None), True),
    "mha": (_mha_config(), False),
    "mha-one-kv-head": (_mha_config(num_key_value_heads=1), False),
}


def _decode(module: torch.nn.Module, x: torch.Tensor, chunks: list[int]) -> tuple[torch.Tensor, KVCache]:
    """Prefill the first chunk, then feed the others (single tokens or several) through one cache."""
    cache, outs, start = KVCache(), [], 0
    for size in chunks:
        outs.append(module(x[:, start : start + size], torch.arange(start, start + size), cache))
        start += size
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", CACHED)
def test_cached_decoding_matches_full_forward(name: str):
    config, absorb = CACHED[name]
    module = _build(config)
    if absorb:
        module.absorb = True
    x = torch.randn(2, 10, module.o_proj.out_features)
    with torch.no_grad():
        full = module(x, torch.arange(10))
        decoded, cache = _decode(module, x, [4, 1, 1, 3, 1])
    assert cache.get_seq_length() == 10
    assert _rel_err(decoded, full) < 1e-5

    with torch.no_grad():  # a rejected speculative token: crop it and decode the true one
        cache.crop(8)
        redone = module(x[:, 8:], torch.arange(8, 10), cache)
    assert cache.get_seq_length() == 10
    assert _rel_err(redone, full[:, 8:]) < 1e-5



@pytest.mark.parametrize("name", ["mla-absorbed", "mha"])
def test_cache_written_in_place_grows_and_keeps_gradients(name: str):
    """A cache sized for 3 tokens grows while decoding 7 more one by one; under autograd it concatenates, and the
    gradients through the cached steps are those of the full forward."""
    config, absorb = CACHED[name]
    module = _build(config)
    module.absorb = absorb
    x = torch.randn(2, 10, module.o_proj.out_features)
    with torch.no_grad():
        full = module(x, torch.arange(10))
        cache = KVCache(max_length=3)
        steps = [module(x[:, :3], torch.arange(3), cache)]
        steps += [module(x[:, i : i + 1], torch.arange(i, i + 1), cache) for i in range(3, 10)]
    assert cache.get_seq_length() == 10 and _rel_err(torch.cat(steps, dim=1), full) < 1e-5

    leaf = x.clone().requires_grad_(True)
    cache = KVCache(max_length=16)
    first = module(leaf[:, :4], torch.arange(4), cache)
    cached = torch.cat([first, module(leaf[:, 4:], torch.arange(4, 10), cache)], dim=1)
    (grad_cached,) = torch.autograd.grad(cached.square().sum(), leaf)
    leaf_full = x.clone().requires_grad_(True)
    (grad_full,) = torch.autograd.grad(module(leaf_full, torch.arange(10)).square().sum(), leaf_full)
    assert _rel_err(grad_cached, grad_full) < 1e-5

@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_equals_naive(q_lora_rank: int | None):
    module = _build(_mla_config(q_lora_rank=q_lora_rank))
    x = torch.randn(2, 10, 64)
    outputs = {}
    with torch.no_grad():
        for absorb in (False, True):
            module.absorb = absorb
            outputs[absorb] = _decode(module, x, [1, 9])[0], _decode(module, x, [3, 1, 5, 1])[0]
    assert _rel_err(outputs[True][0], outputs[False][0]) < 1e-5  # 9 tokens at once after a cached one
    assert _rel_err(outputs[True][1], outputs[False][1]) < 1e-5  # through the cache


def test_mla_cache_holds_only_the_latent_and_the_rope_key():
    config = _mla_config(num_hidden_layers=2)
    layers = [_build(config, i) for i in range(2)]
    x = torch.randn(3, 5, config.hidden_size)
    cache = KVCache()
    with torch.no_grad():
        for layer in layers:
            layer(x, torch.arange(5), cache)
    for i, layer in enumerate(layers):
        (latent,) = cache.layers[i]
        c_kv, k_rope = latent.split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        assert c_kv.shape == (3, 5, config.kv_lora_rank) and k_rope.shape == (3, 5, config.qk_rope_head_dim)
        with torch.no_grad():  # c_KV after kv_a_layernorm
            want = layer.kv_a_layernorm(layer.kv_a_proj_with_mqa(x)[..., : config.kv_lora_rank])
        torch.testing.assert_close(c_kv, want)
    per_token = config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.nbytes_per_token() == 2 * per_token * 4  # two layers, float32

    mha = _mha_config(num_key_value_heads=2)
    cache = KVCache()
    with torch.no_grad():
        _build(mha)(x, torch.arange(5), cache)
    assert cache.nbytes_per_token() == 2 * 2 * mha.head_dim * 4  # k and v of two heads


def test_apply_rotary_layouts():
    """Interleaved = DeepSeek's complex product; halves = Llama's rotate_half."""
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(5, 4)
    cos, sin = angles.cos(), angles.sin()
    as_complex = torch.view_as_complex(x.view(2, 5, 3, 4, 2)) * torch.polar(torch.ones_like(angles), angles)[:, None]
    torch.testing.assert_close(apply_rotary(x, cos, sin, interleaved=True), torch.view_as_real(as_complex).flatten(-2))
    rotate_half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    want = x * torch.cat((cos, cos), -1)[:, None] + rotate_half * torch.cat((sin, sin), -1)[:, None]
    torch.testing.assert_close(apply_rotary(x, cos, sin, interleaved=False), want)


def test_softmax_scale_of_deepseek_v3():
    """1/sqrt(192) · (0.1 ln 40 + 1)², the value of DeepSeek-V3's released config."""
    v3_yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32}
    v3_yarn |= {"beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    config = _mla_config(
        qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=163840, rope_scaling=v3_yarn
    )
    assert softmax_scale(config) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert softmax_scale(_mla_config(rope_scaling=None)) == 32**-0.5


def test_bfloat16_keeps_rope_frequencies_in_float32():
    module = _build(_mla_config())
    x = torch.randn(2, 6, 64)
    positions = torch.arange(START, START + 6)
    with torch.no_grad():
        want = module(x, positions)
        module.to(torch.bfloat16)
        assert module.rotary.inv_freq.dtype == torch.float32
        got = module(x.bfloat16(), positions)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), want) < 3e-2


def test_build_attention_by_type():
    assert isinstance(build_attention(_mla_config(), 0), MultiHeadLatentAttention)
    assert isinstance(build_attention(_mha_config(), 0), MultiHeadAttention)
