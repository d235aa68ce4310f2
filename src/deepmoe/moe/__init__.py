"""The DeepSeekMoE layer, usable on its own: router, balance, dispatch, experts, layer."""

from deepmoe.moe.adapter_experts import AdapterExperts
from deepmoe.moe.balance import RoutingStats, balance_losses, routing_stats
from deepmoe.moe.dispatch import Dispatcher, DispatchState, LocalDispatcher
from deepmoe.moe.experts import RoutedExperts, SwiGLU
from deepmoe.moe.layer import MoE, MoEOutput
from deepmoe.moe.router import Router, RouterOutput

__all__ = [
    "AdapterExperts",
    "DispatchState",
    "Dispatcher",
    "LocalDispatcher",
    "MoE",
    "MoEOutput",
    "RoutedExperts",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "SwiGLU",
    "balance_losses",
    "routing_stats",
]
