"""deepmoe: DeepSeek-style Mixture-of-Experts models in PyTorch."""

from deepmoe.config import DeepSeekConfig, MoEConfig
from deepmoe.model import (
    CausalLMOutput,
    DeepSeekForCausalLM,
    KVCache,
    from_pretrained,
    generate,
    generate_speculative,
    save_pretrained,
)
from deepmoe.model.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from deepmoe.model.parameters import count_parameters
from deepmoe.moe import MoE, MoEOutput, Router, RouterOutput, RoutingStats
from deepmoe.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "DeepSeekConfig",
    "DeepSeekForCausalLM",
    "KVCache",
    "LoRAConfig",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "__version__",
    "apply_lora",
    "count_parameters",
    "from_pretrained",
    "generate",
    "generate_speculative",
    "get_preset",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "save_pretrained",
]
