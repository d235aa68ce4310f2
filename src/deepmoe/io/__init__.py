"""Hugging Face format I/O (docs/design.md#m5-hugging-face-checkpoints): config.json and safetensors checkpoints of
model_type deepseek, deepseek_v2 and deepseek_v3, read memory-mapped (no pickle) and written atomically, as a
config and a state dict (a model from them: `deepmoe.model.pretrained`)."""

from deepmoe.io.checkpoint import (
    CheckpointError,
    SafetensorsCheckpoint,
    checkpoint_dir,
    load_checkpoint,
    load_config,
    parse_size,
    save_checkpoint,
)
from deepmoe.io.fp8_blocks import dequantize_fp8, quantize_fp8
from deepmoe.io.hf import config_from_hf, config_to_hf, expected_shapes

__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "checkpoint_dir",
    "config_from_hf",
    "config_to_hf",
    "dequantize_fp8",
    "expected_shapes",
    "load_checkpoint",
    "load_config",
    "parse_size",
    "quantize_fp8",
    "save_checkpoint",
]
