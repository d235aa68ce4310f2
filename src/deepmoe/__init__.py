"""deepmoe: DeepSeek-style Mixture-of-Experts models in PyTorch."""

from deepmoe.config import MoEConfig
from deepmoe.moe import MoE, MoEOutput, Router, RouterOutput, RoutingStats

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "Router", "RouterOutput", "RoutingStats", "__version__"]
