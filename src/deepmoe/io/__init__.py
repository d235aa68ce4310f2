"""Hugging Face format I/O (docs/design.md#m5-hugging-face-checkpoints): config.json and safetensors checkpoints of
model_type deepseek, deepseek_v2 and deepseek_v3, read memory-mapped (no pickle) and written atomically."""

from deepmoe.io.checkpoint import (
    CheckpointError,
    SafetensorsCheckpoint,
    dequantize_fp8,
    from_pretrained,
    load_checkpoint,
    load_config,
    parse_size,
    save_checkpoint,
    save_pretrained,
)
from deepmoe.io.hf import config_from_hf, config_to_hf, expected_shapes

__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "config_from_hf",
    "config_to_hf",
    "dequantize_fp8",
    "expected_shapes",
    "from_pretrained",
    "load_checkpoint",
    "load_config",
    "parse_size",
    "save_checkpoint",
    "save_pretrained",
]
