"""`deepmoe inspect`: architecture, parameter counts and KV-cache size of a preset or checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deepmoe.config import DeepSeekConfig
from deepmoe.io import load_config
from deepmoe.io.checkpoint import INDEX_NAME, WEIGHTS_NAME, SafetensorsCheckpoint, checkpoint_dir
from deepmoe.io.hf import hf_name
from deepmoe.model.parameters import count_parameters
from deepmoe.presets import PRESETS, get_preset


def resolve_config(preset_or_path: str) -> DeepSeekConfig:
    """A preset name, or a checkpoint directory holding config.json: the model that checkpoint holds (its
    config's MTP modules only when it has their weights: transformers saves the config without them)."""
    if preset_or_path in PRESETS:
        return get_preset(preset_or_path)
    if Path(preset_or_path).exists():
        config = load_config(preset_or_path)
        if config.num_nextn_predict_layers and not _has_mtp_weights(preset_or_path, config):
            config = dataclasses.replace(config, num_nextn_predict_layers=0)
        return config
    raise ValueError(f"{preset_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory")


def _has_mtp_weights(path: str, config: DeepSeekConfig) -> bool:
    """Whether the checkpoint at `path` holds tensors of its MTP modules (layers num_hidden_layers and up);
    True when it has no weight files to tell (a bare config.json)."""
    directory = checkpoint_dir(path)
    if not directory.is_dir() or not ((directory / WEIGHTS_NAME).is_file() or (directory / INDEX_NAME).is_file()):
        return True
    prefixes = tuple(hf_name(f"model.mtp.{k}.enorm.weight", config).removesuffix("enorm.weight")
                     for k in range(config.num_nextn_predict_layers))  # fmt: skip
    with SafetensorsCheckpoint(directory) as checkpoint:
        return any(name.startswith(prefixes) for name in checkpoint.names())


def kv_cache_bytes_per_token(config: DeepSeekConfig, bytes_per_value: int = 2, gqa_groups: int = 8) -> dict[str, int]:
    """Cache bytes per token over all layers (DeepSeek-V2 Table 1): this model's, and what MHA and
    GQA with `gqa_groups` key/value heads of the same head widths would hold. DeepSeek-V4's: the growth of a
    long context, its compressed entries (CSA: an entry and an indexer key every m tokens; HCA: an entry every m'
    tokens), beside which the sliding window's n_win K = V entries per layer are a constant."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if config.attention_type == "mla":
        per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim  # one key + one value
        own = config.kv_lora_rank + config.qk_rope_head_dim  # c_KV and the shared k_rope
        if config.has_indexer:
            own += config.index_head_dim  # DSA: the lightning indexer's key k^I
    elif config.attention_type == "shared_kv":  # V4: the window is bounded; what grows are the compressed entries
        per_head = 2 * config.head_dim
        own = 0
        for kind in config.layer_types:
            if kind == "compressed_sparse_attention":  # the entry and the indexer's key, every m tokens
                own += (config.head_dim + config.index_head_dim) / config.compress_rates[kind]
            elif kind == "heavily_compressed_attention":
                own += config.head_dim / config.compress_rates[kind]
        own /= layers  # `own` is multiplied by the layers below
    else:
        per_head = 2 * config.head_dim
        own = config.num_key_value_heads * per_head
    return {
        "model": round(own * layers * bytes_per_value),
        "mha": heads * per_head * layers * bytes_per_value,
        f"gqa{gqa_groups}": min(gqa_groups, heads) * per_head * layers * bytes_per_value,
    }


def describe(config: DeepSeekConfig) -> dict[str, Any]:
    count = count_parameters(config)
    cache = kv_cache_bytes_per_token(config)
    moe = config.moe
    return {
        "model_type": config.model_type,
        "attention": config.attention_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "moe_layers": sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)),
        "routed_experts": moe.n_routed_experts if moe else 0,
        "shared_experts": moe.n_shared_experts if moe else 0,
        "experts_per_token": moe.num_experts_per_tok if moe else 0,
        "gate": f"{moe.scoring_func}/{moe.topk_method}" if moe else None,
        "mtp_modules": config.num_nextn_predict_layers,
        "total_params": count.total,
        "active_params": count.active,
        "active_params_non_embedding": count.active_non_embedding,
        "mtp_params": count.mtp,
        "kv_cache_bytes_per_token": cache["model"],
        "kv_cache_bytes_per_token_bf16": cache,
    }
