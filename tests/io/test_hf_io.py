"""Hugging Face format I/O (docs/design.md#m5-hugging-face-checkpoints): config.json mapping for deepseek /
deepseek_v2 / deepseek_v3,
safetensors loading (transformers' and DeepSeek's layouts, shards, FP8), bad files, atomic sharded
saving, and logits parity with transformers in both directions."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepmoe.config import DeepSeekConfig, MoEConfig
from deepmoe.io import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    dequantize_fp8,
    expected_shapes,
    load_checkpoint,
    load_config,
    parse_size,
    save_checkpoint,
)
from deepmoe.io import checkpoint as ckpt_module
from deepmoe.io import files as files_module
from deepmoe.model import from_pretrained, save_pretrained
from deepmoe.presets import PRESETS
from reference import dequantize_fp8_blocks, quantize_fp8_blocks, randomise_parameters, transformers_model

# cpu_only: checkpoint files read to CPU tensors
pytestmark = pytest.mark.cpu_only

transformers = pytest.importorskip("transformers")

_YARN_V2 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096, "type": "yarn"}  # fmt: skip
_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
             "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}  # fmt: skip

# The config.json files of deepseek-ai's Hugging Face repositories (as published; V2-Lite also as
# transformers 5 re-saves it, and a V2 config spelling DeepSeek's "gready").
PUBLISHED = {
    "deepseek-moe-16b-base": {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"}, "aux_loss_alpha": 0.001,
        "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 4096,
        "model_type": "deepseek", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
        "vocab_size": 102400,
    },
    "DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": dict(_YARN_V2),
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
    },
    "DeepSeek-V2": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": _AUTO_MAP, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
        "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 5120,
        "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512, "max_position_embeddings": 163840,
        "model_type": "deepseek_v2", "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 128,
        "num_experts_per_tok": 6, "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": dict(_YARN_V2), "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax",
        "seq_aux": True, "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy",
        "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128,
        "vocab_size": 102400,
    },
    "DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
        "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}, "rope_theta": 10000,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
        "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    },
}  # fmt: skip
_v2_lite_t5 = copy.deepcopy(PUBLISHED["DeepSeek-V2-Lite"])
_v2_lite_t5.update(dtype="bfloat16", head_dim=64, mlp_bias=False, pad_token_id=None, transformers_version="5.7.0")
del _v2_lite_t5["torch_dtype"], _v2_lite_t5["rope_scaling"], _v2_lite_t5["rope_theta"]
_v2_lite_t5["rope_parameters"] = {**_YARN_V2, "rope_theta": 10000, "rope_type": "yarn"}
PUBLISHED["DeepSeek-V2-Lite (transformers 5)"] = _v2_lite_t5
_gready = copy.deepcopy(PUBLISHED["DeepSeek-V2-Lite"])
_gready.update(topk_method="gready", n_group=None, topk_group=None)
del _gready["aux_loss_alpha"]
PUBLISHED["V2 'gready', null groups, no aux_loss_alpha"] = _gready


def tiny_config(model_type: str = "deepseek_v3", **overrides) -> DeepSeekConfig:
    """A 2-layer config of each family (first layer dense)."""
    h = 64
    if model_type == "deepseek":
        moe = MoEConfig(hidden_size=h, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2)  # fmt: skip
        base = dict(model_type="deepseek", attention_type="mha", num_key_value_heads=2, rope_interleave=False)
    elif model_type == "deepseek_v2":
        moe = MoEConfig(hidden_size=h, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=1.5)  # fmt: skip
        base = dict(model_type="deepseek_v2", q_lora_rank=None)
    else:
        moe = MoEConfig(hidden_size=h, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                        topk_method="noaux_tc", n_group=4, topk_group=2, use_expert_bias=True)  # fmt: skip
        base = dict(model_type="deepseek_v3", q_lora_rank=24, num_nextn_predict_layers=1)
    if model_type != "deepseek":
        base.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    fields = dict(vocab_size=128, hidden_size=h, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  moe=moe, first_k_dense_replace=1, **base)  # fmt: skip
    fields.update(overrides)
    return DeepSeekConfig(**fields)


def random_state(config: DeepSeekConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A stand-in for a model's state dict: every expected tensor, random."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        keep32 = name.endswith("e_score_correction_bias")
        state[name] = t.to(torch.float32 if keep32 else dtype)
    return state


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_reads_and_round_trips(name):
    raw = PUBLISHED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = config_from_hf(raw)
    c, moe = config, config.moe
    assert (c.model_type, c.vocab_size, c.hidden_size, c.num_hidden_layers) == (
        raw["model_type"], raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"]
    )  # fmt: skip
    assert c.intermediate_size == raw["intermediate_size"] and c.first_k_dense_replace == raw["first_k_dense_replace"]
    assert (moe.n_routed_experts, moe.num_experts_per_tok) == (raw["n_routed_experts"], raw["num_experts_per_tok"])
    assert moe.moe_intermediate_size == raw["moe_intermediate_size"]
    assert moe.n_shared_experts == raw["n_shared_experts"] and moe.norm_topk_prob == raw["norm_topk_prob"]
    # DeepSeek's "seq_aux": true means the balance loss of aux_loss_alpha is the sequence-wise one
    assert moe.seq_aux_loss_alpha == raw.get("aux_loss_alpha", 0.0) and moe.aux_loss_alpha == 0.0
    if c.model_type == "deepseek":
        assert c.attention_type == "mha" and not c.rope_interleave and c.num_key_value_heads == 16
        assert moe.topk_method == "greedy" and moe.routed_scaling_factor == 1.0 and c.rope_scaling is None
    else:
        assert c.attention_type == "mla" and c.rope_interleave
        assert (c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim) == (raw["q_lora_rank"], 512, 64)
        assert c.rope_scaling["type"] == "yarn" and c.rope_scaling["factor"] == 40 and c.rope_theta == 10000
        assert c.rope_scaling["mscale_all_dim"] == (1.0 if c.model_type == "deepseek_v3" else 0.707)
        assert moe.routed_scaling_factor == raw["routed_scaling_factor"]
    if name == "DeepSeek-V2":
        assert (moe.topk_method, moe.n_group, moe.topk_group) == ("group_limited_greedy", 8, 3)
    if "gready" in name or name.startswith("DeepSeek-V2-Lite"):
        assert (moe.topk_method, moe.n_group, moe.topk_group) == ("greedy", 1, 1)
    if c.model_type == "deepseek_v3":
        assert (moe.scoring_func, moe.topk_method, moe.use_expert_bias) == ("sigmoid", "noaux_tc", True)
        assert (moe.n_group, moe.topk_group, c.num_nextn_predict_layers) == (8, 4, 1)
    else:
        assert moe.scoring_func == "softmax" and not moe.use_expert_bias and c.num_nextn_predict_layers == 0

    written = config_to_hf(config)
    assert config_from_hf(written) == config
    for key, value in raw.items():  # every published field we write keeps its value
        if key in written and key not in ("rope_scaling", "topk_method", "n_group", "topk_group"):
            assert written[key] == value, key
    rope = raw.get("rope_scaling") or {k: v for k, v in raw.get("rope_parameters", {}).items() if k != "rope_theta"}
    if rope:
        assert {k: v for k, v in written["rope_scaling"].items() if k != "type"} == {
            k: v for k, v in rope.items() if k not in ("type", "rope_type")
        }


@pytest.mark.parametrize("name", [n for n in PUBLISHED if PUBLISHED[n]["model_type"] != "deepseek"])
def test_transformers_reads_what_we_write(name):
    config = config_from_hf(PUBLISHED[name])
    written = config_to_hf(config)
    hf = transformers.AutoConfig.for_model(**written)
    assert type(hf).__name__ == written["architectures"][0].replace("ForCausalLM", "Config")
    for key in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "q_lora_rank",
                "kv_lora_rank", "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group"):  # fmt: skip
        assert getattr(hf, key) == written[key], key
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert hf.rope_parameters["rope_theta"] == config.rope_theta


@pytest.mark.parametrize("name", list(PRESETS))
def test_deepmoe_config_round_trips_exactly(name):
    config = PRESETS[name]()
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


@pytest.mark.parametrize(
    "overrides",
    [
        dict(moe=None),
        dict(tie_word_embeddings=True, attention_bias=True, pad_token_id=0, eos_token_id=[1, 2]),
        dict(num_nextn_predict_layers=2, mtp_loss_weight=0.1, rope_scaling=None),
    ],
)
@pytest.mark.parametrize("model_type", ["deepseek", "deepseek_v2", "deepseek_v3"])
def test_edge_configs_round_trip(model_type, overrides):
    if model_type != "deepseek_v3":
        overrides = {k: v for k, v in overrides.items() if k not in ("num_nextn_predict_layers",)}
    config = tiny_config(model_type, **overrides)
    written = config_to_hf(config)
    if config.moe is None and model_type != "deepseek":
        assert written["first_k_dense_replace"] == config.num_hidden_layers  # how HF's classes spell "all dense"
        transformers.AutoConfig.for_model(**written)
        config = dataclasses.replace(config, first_k_dense_replace=config.num_hidden_layers)
    assert config_from_hf(written) == config


def test_rope_parameters_and_rope_scaling_read_the_same():
    old = PUBLISHED["DeepSeek-V2-Lite"]
    new = PUBLISHED["DeepSeek-V2-Lite (transformers 5)"]
    assert config_from_hf(old) == config_from_hf(new)
    plain = dict(old, rope_scaling=None, rope_theta=None, rope_parameters={"rope_theta": 5e4, "rope_type": "default"})
    assert config_from_hf(plain).rope_theta == 5e4 and config_from_hf(plain).rope_scaling is None


def test_v2_norm_topk_prob_with_scaling_warns_and_follows_deepseek():
    raw = dict(PUBLISHED["DeepSeek-V2"], norm_topk_prob=True)
    with pytest.warns(UserWarning, match="normalises the top-k weights and then does not scale"):
        config = config_from_hf(raw)
    assert config.moe.norm_topk_prob and config.moe.routed_scaling_factor == 1.0
    with pytest.warns(UserWarning, match="ignores norm_topk_prob"):
        config_from_hf(dict(PUBLISHED["DeepSeek-V2-Lite"], norm_topk_prob=True))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), "model_type='llama' is not supported"),
        (dict(model_type=None), "model_type=None is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(num_experts_per_tok=None), "num_experts_per_tok is missing"),
        (dict(num_experts_per_tok=100), "num_experts_per_tok=100"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(dict(PUBLISHED["DeepSeek-V2-Lite"], **change))


def test_writing_what_transformers_cannot_compute_warns_or_raises():
    config = tiny_config("deepseek_v3")
    softmax = dict(config.moe.to_dict(), scoring_func="softmax", topk_method="group_limited_greedy")
    with pytest.warns(UserWarning, match="sigmoid scores and noaux_tc"):
        config_to_hf(DeepSeekConfig.from_dict(dict(config.to_dict(), moe=softmax)))
    with pytest.raises(ValueError, match="attention_type='mla' cannot be written as model_type='deepseek'"):
        config_to_hf(DeepSeekConfig.from_dict(dict(config.to_dict(), model_type="deepseek")))


# ---- loading transformers' checkpoints ---------------------------------------------------------


def _hf_model(config: DeepSeekConfig, seed: int = 0):
    """transformers' model for `config`, with weights random enough to route unevenly."""
    written = config_to_hf(config)
    written.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(**written)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    randomise_parameters(model, seed)
    return model


HF_CASES = {
    "v3-q_lora-yarn-groups": tiny_config(
        "deepseek_v3", num_nextn_predict_layers=0, max_position_embeddings=256,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707},
    ),
    "v3-no_q_lora-no_yarn": tiny_config("deepseek_v3", num_nextn_predict_layers=0, q_lora_rank=None),
    "v2-group_limited-yarn-q_lora": tiny_config(
        "deepseek_v2", q_lora_rank=24, max_position_embeddings=256,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    "v2-greedy-no_q_lora": tiny_config(
        "deepseek_v2", moe=MoEConfig(hidden_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                     n_shared_experts=2, num_experts_per_tok=2)
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_checkpoint_loads_every_tensor(case, tmp_path):
    model = _hf_model(HF_CASES[case])
    model.save_pretrained(tmp_path)
    names = list(ckpt_module.SafetensorsCheckpoint(tmp_path).names())
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)  # transformers 5 writes DeepSeek's layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers writes num_nextn_predict_layers=1 without MTP weights
        config, state = load_checkpoint(tmp_path)
    assert config == HF_CASES[case]
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert state[name].shape == tensor.shape and torch.equal(state[name], tensor), name


def test_fused_expert_tensors_load_too(tmp_path):
    config = tiny_config("deepseek_v2")
    state = random_state(config)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config)))
    _, loaded = load_checkpoint(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and loaded.keys() == state.keys()


def test_v3_mtp_layout_on_disk(tmp_path):
    config = tiny_config("deepseek_v3", tie_word_embeddings=True)
    state = random_state(config)
    save_checkpoint(state, config, tmp_path)
    with ckpt_module.SafetensorsCheckpoint(tmp_path) as files:
        names = set(files.names())
        assert not any(n.startswith("model.mtp") for n in names)
        for rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "input_layernorm.weight", "self_attn.q_a_proj.weight", "mlp.experts.7.down_proj.weight",
                     "mlp.gate.e_score_correction_bias"):  # fmt: skip
            assert f"model.layers.2.{rest}" in names, rest
        # the copies of the shared embedding and head that DeepSeek's checkpoints carry
        assert torch.equal(files.get("model.layers.2.embed_tokens.weight"), state["model.embed_tokens.weight"])
        assert torch.equal(files.get("model.layers.2.shared_head.head.weight"), state["model.embed_tokens.weight"])
        assert torch.equal(files.get("model.layers.2.shared_head.norm.weight"), state["model.mtp.0.norm.weight"])
    loaded_config, loaded = load_checkpoint(tmp_path)
    assert loaded_config == config and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---- FP8 ---------------------------------------------------------------------------------------


def test_fp8_dequantisation_equals_the_per_block_reference():
    w = torch.randn(300, 200)
    q, scale = quantize_fp8_blocks(w, (128, 128))  # partial edge blocks in both directions
    got = dequantize_fp8(q, scale, (128, 128), torch.float32)
    assert torch.equal(got, dequantize_fp8_blocks(q, scale, (128, 128)))
    assert (got - w).abs().max() < 0.07 * w.abs().max()  # it is a quantisation of w
    stacked = dequantize_fp8(torch.stack([q, q]), torch.stack([scale, 2 * scale]), (128, 128), torch.float32)
    assert torch.equal(stacked[0], got) and torch.equal(stacked[1], 2 * got)
    with pytest.raises(ValueError, match="scale_inv has shape"):
        dequantize_fp8(q, scale[:1], (128, 128))


def test_fp8_checkpoint_is_dequantised_on_load(tmp_path):
    config = tiny_config("deepseek_v3")
    block = (8, 16)
    save_checkpoint(random_state(config), config, tmp_path)  # DeepSeek's per-expert layout
    with ckpt_module.SafetensorsCheckpoint(tmp_path) as checkpoint:
        files = {n: checkpoint.get(n) for n in checkpoint.names()}
    quantized = [n for n, t in files.items() if t.dim() == 2 and ("proj" in n) and "embed" not in n]
    expected = {}
    for name in quantized:
        files[name], files[name + "_scale_inv"] = quantize_fp8_blocks(files[name], block)
        expected[name] = dequantize_fp8_blocks(files[name], files[name + "_scale_inv"], block).to(torch.bfloat16)
    save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    raw = dict(config_to_hf(config), torch_dtype="bfloat16", quantization_config=quantization)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _, loaded = load_checkpoint(tmp_path)
    assert loaded["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(
        loaded["model.layers.0.self_attn.q_a_proj.weight"], expected["model.layers.0.self_attn.q_a_proj.weight"]
    )
    assert torch.equal(loaded["model.layers.1.mlp.experts.gate_up_proj"][3, 16:],
                       expected["model.layers.1.mlp.experts.3.up_proj.weight"])  # fmt: skip
    assert loaded["model.norm.weight"].dtype == torch.float32  # not quantised: as stored
    _, as_f32 = load_checkpoint(tmp_path, dtype=torch.float32)
    assert as_f32["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float32


# ---- bad files ---------------------------------------------------------------------------------


def _good_checkpoint(path: Path, shards: bool = False) -> DeepSeekConfig:
    config = tiny_config("deepseek_v3", num_nextn_predict_layers=0)
    save_checkpoint(random_state(config), config, path, max_shard_size="40KB" if shards else "5GB")
    return config


def _rewrite(path: Path, change) -> None:
    file = path / "model.safetensors"
    with ckpt_module.SafetensorsCheckpoint(path) as files:
        tensors = {n: files.get(n) for n in files.names()}
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


BAD_FILES = {
    "no config.json": (lambda p: (p / "config.json").unlink(), r"config\.json: config\.json not found"),
    "bad JSON": (lambda p: (p / "config.json").write_text("{oops"), r"config\.json: not valid JSON"),
    "other model type": (
        lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llama"})),
        r"config\.json: config model_type='llama' is not supported",
    ),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "has neither model.safetensors nor"),
    "truncated safetensors": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "garbage safetensors": (
        lambda p: (p / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not a header!!!!"),
        r"model\.safetensors: not a readable safetensors file",
    ),
    "missing expert": (
        lambda p: _rewrite(p, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight")),
        r"missing 1 tensor\(s\) 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'",
    ),
    "missing head": (lambda p: _rewrite(p, lambda t: t.pop("lm_head.weight")), r"missing 1 tensor\(s\) 'lm_head"),
    "unexpected tensor": (
        lambda p: _rewrite(p, _set("model.layers.0.mlp.extra.weight", torch.zeros(2))),
        r"unexpected 1 tensor\(s\) 'model\.layers\.0\.mlp\.extra\.weight' \(in model\.safetensors\)",
    ),
    "wrong shape": (
        lambda p: _rewrite(p, _set("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 31))),
        r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has shape \[64, 31\], "
        r"config\.json implies \[64, 32\]",
    ),
    "NaN": (
        lambda p: _rewrite(p, _set("model.norm.weight", torch.full((64,), math.nan))),
        r"model\.safetensors: tensor 'model\.norm\.weight' contains NaN",
    ),
    "inf": (
        lambda p: _rewrite(p, _set("model.layers.1.mlp.experts.5.down_proj.weight", torch.full((64, 16), math.inf))),
        r"tensor 'model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight' contains inf",
    ),
    "FP8 without scale": (
        lambda p: _rewrite(p, _set("model.norm.weight", torch.ones(64).to(torch.float8_e4m3fn))),
        r"FP8 tensor 'model\.norm\.weight' has no 'model\.norm\.weight_scale_inv'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_one_clear_error(case, tmp_path):
    _good_checkpoint(tmp_path)
    damage, message = BAD_FILES[case]
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_bad_shards_give_one_clear_error(tmp_path):
    _good_checkpoint(tmp_path, shards=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first, second, *_ = shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (tmp_path / second).rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=rf"names shard '{re.escape(second)}' .* does not exist"):
        load_checkpoint(tmp_path)
    (tmp_path / "elsewhere").rename(tmp_path / second)
    index["weight_map"]["model.norm.weight"] = first
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"says tensor 'model\.norm\.weight' is in {re.escape(first)}"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_checkpoint(tmp_path)


def test_missing_directory_and_config_only_loading(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found|config.json not found"):
        load_checkpoint(tmp_path / "nowhere")
    config = _good_checkpoint(tmp_path)
    assert load_config(tmp_path) == config and load_config(tmp_path / "config.json") == config


# ---- saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["deepseek", "deepseek_v2", "deepseek_v3"])
def test_sharded_save_load_is_bit_exact(model_type, tmp_path):
    config = tiny_config(model_type)
    state = random_state(config, dtype=torch.bfloat16)
    save_checkpoint(state, config, tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert all((tmp_path / s).stat().st_size < 30_000 + 20_000 for s in shards)  # one tensor may exceed the limit
    copies = ("model.embed_tokens.weight", "lm_head.weight")  # V3 writes them again for each MTP layer
    nbytes = {n: t.numel() * t.element_size() for n, t in state.items()}  # the expert bias stays float32
    total = sum(nbytes.values()) + config.num_nextn_predict_layers * sum(nbytes[n] for n in copies)
    assert index["metadata"]["total_size"] == total
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16" and raw["model_type"] == model_type
    loaded_config, loaded = load_checkpoint(tmp_path)
    assert loaded_config == config and loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    # re-saving into one file replaces the shards (no stale files left)
    save_checkpoint(loaded, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    config = _good_checkpoint(target, shards=True)
    (target / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_save = ckpt_module.write_file
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "write_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(random_state(config, seed=1), config, target, max_shard_size="40KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        save_checkpoint(random_state(config), config, tmp_path / "fresh", max_shard_size="40KB")
    assert not (tmp_path / "fresh").exists()

    monkeypatch.setattr(ckpt_module, "write_file", real_save)
    new_state = random_state(config, seed=2)
    save_checkpoint(new_state, config, target)
    assert (target / "tokenizer.json").read_text() == "{}"  # other files of the directory are kept
    assert torch.equal(load_checkpoint(target)[1]["lm_head.weight"], new_state["lm_head.weight"])


def test_atomic_save_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(files_module, "_exchange", lambda a, b: False)  # e.g. not Linux: two renames
    config = _good_checkpoint(tmp_path / "ckpt")
    state = random_state(config, seed=5)
    save_checkpoint(state, config, tmp_path / "ckpt")
    assert torch.equal(load_checkpoint(tmp_path / "ckpt")[1]["lm_head.weight"], state["lm_head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_bad_states(tmp_path):
    config = tiny_config("deepseek_v2")
    state = random_state(config)
    with pytest.raises(ValueError, match="missing 'lm_head.weight'"):
        save_checkpoint({k: v for k, v in state.items() if k != "lm_head.weight"}, config, tmp_path / "a")
    with pytest.raises(ValueError, match="has shape"):
        save_checkpoint(dict(state, **{"model.norm.weight": torch.ones(3)}), config, tmp_path / "b")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        save_checkpoint(dict(state, **{"model.norm.weight": torch.full((64,), math.nan)}), config, tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("10KiB") == 10240 and parse_size(123) == 123
    assert parse_size("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# ---- end to end with DeepSeekForCausalLM -------------------------------------------------------

decoder = pytest.importorskip("deepmoe.model.decoder")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_checkpoint_gives_transformers_logits(case, tmp_path):
    hf_model = _hf_model(HF_CASES[case], seed=1)
    hf_model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_pretrained(tmp_path)
    assert isinstance(model, decoder.DeepSeekForCausalLM) and not model.training
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert _rel(_logits(model, ids), _logits(hf_model, ids)) < 1e-4


@pytest.mark.parametrize("case", list(HF_CASES))
def test_deepmoe_checkpoint_gives_the_same_logits_in_transformers(case, tmp_path):
    config = HF_CASES[case]
    if config.model_type == "deepseek_v3":
        config = DeepSeekConfig.from_dict(dict(config.to_dict(), num_nextn_predict_layers=1))  # + V3's MTP layer
    torch.manual_seed(2)
    model = decoder.DeepSeekForCausalLM(config).eval()
    state = random_state(config, seed=3)
    model.load_state_dict({k: (1 + v if "norm" in k else 3 * v) for k, v in state.items()})
    save_pretrained(model, tmp_path)
    hf_model = transformers_model(tmp_path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert _rel(_logits(model, ids), _logits(hf_model, ids)) < 1e-4
    reloaded = from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_deepseek_moe_16b_layout_round_trips_through_from_pretrained(tmp_path):
    config = tiny_config("deepseek", num_hidden_layers=3, moe_layer_freq=2, attention_bias=True)
    model = decoder.DeepSeekForCausalLM(config).eval()
    save_pretrained(model, tmp_path, max_shard_size="50KB")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["DeepseekForCausalLM"] and raw["num_key_value_heads"] == 2
    assert (
        "model.layers.2.mlp.experts.0.gate_proj.weight"
        in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    )
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(from_pretrained(tmp_path), ids), _logits(model, ids))


def test_from_pretrained_dtype_keeps_the_expert_bias_in_float32(tmp_path):
    config = tiny_config("deepseek_v3")
    save_pretrained(decoder.DeepSeekForCausalLM(config), tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert len(model.model.mtp) == 1 and model.model.mtp[0].eh_proj.weight.dtype == torch.bfloat16


def test_saved_checkpoint_is_readable_like_any_directory(tmp_path):
    import os
    import stat

    from deepmoe import DeepSeekForCausalLM, get_preset

    DeepSeekForCausalLM(get_preset("tiny-v3")).save_pretrained(tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "ckpt", *(tmp_path / "ckpt").iterdir()]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path.name
