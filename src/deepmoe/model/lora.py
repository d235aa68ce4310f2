"""LoRA adapters on a DeepSeek model (Hu et al. 2021; docs/design.md#lora-adapters): per-expert adapters on the
routed experts' stacked tensors (`deepmoe.moe.lora.LoRAExperts`) and adapters on the attention projections
(`LoRALinear`), W' = W + (α/r)·B A with B = 0 at the start.

`apply_lora(model, LoRAConfig(...))` swaps the targeted modules for their LoRA versions in place (the base
parameters keep their names and objects), freezes every base parameter and leaves only the factors trainable;
`merge_lora` folds (α/r)·B A into the weights and puts plain modules back; `lora_state_dict` is the factors alone,
keyed by deepmoe parameter name (`...experts.gate_up_proj_lora_A`, `...self_attn.q_a_proj.lora_A`);
`deepmoe.io.adapter` writes and reads them as a PEFT adapter directory.

Targets: "experts" (every MoE layer's `mlp.experts.gate_up_proj` and `down_proj`) and "attention" (MLA's
`q_proj` or `q_a_proj`/`q_b_proj`, `kv_a_proj_with_mqa`, `o_proj`; MHA's `q_proj`, `k_proj`, `v_proj`,
`o_proj`), in the decoder layers `model.layers.{i}` (not the MTP modules). MLA's `kv_b_proj` is left out: the
absorbed decoding form reads its weight directly (W_UK, W_UV), which a forward-time adapter would not change.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import check, is_int, is_real
from deepmoe.io import adapter as adapter_io
from deepmoe.moe.experts import RoutedExperts
from deepmoe.moe.lora import LoRAExperts, adopt

LORA_TARGETS = ("experts", "attention")
ATTENTION_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "k_proj", "v_proj")
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts")
_ATTENTION = re.compile(rf"model\.layers\.(\d+)\.self_attn\.({'|'.join(ATTENTION_PROJECTIONS)})")
_FACTOR = re.compile(r"(?:\.|_)lora_[AB]$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoRAConfig:
    """What `apply_lora` adapts, and how.

    rank: r >= 1. alpha: α (default r, so α/r = 1); the update is scaled by α/r. targets: a subset of
    LORA_TARGETS. layers: the decoder layers adapted (None: all). experts: {layer: experts} to adapt with
    LoRA (ESFT's selection): only these layers and experts get a trainable adapter (targets "experts" only).
    """

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = ("experts",)
    layers: tuple[int, ...] | None = None
    experts: Mapping[int, Sequence[int]] | None = field(default=None)

    def __post_init__(self) -> None:
        check(self, is_int(self.rank) and self.rank >= 1, "rank", "must be an integer >= 1")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        check(self, is_real(self.alpha) and self.alpha > 0, "alpha", "must be a finite number > 0")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        targets = tuple(self.targets)
        check(self, bool(targets) and set(targets) <= set(LORA_TARGETS), "targets",
              f"must be a non-empty subset of {', '.join(LORA_TARGETS)}")  # fmt: skip
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))
        if self.layers is not None:
            check(self, all(is_int(i) and i >= 0 for i in self.layers), "layers", "must be layer numbers >= 0")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if self.experts is not None:
            check(self, self.targets == ("experts",), "experts",
                  "adapts chosen experts only: targets must be ('experts',)")  # fmt: skip
            object.__setattr__(self, "experts", {int(k): sorted(set(map(int, v))) for k, v in self.experts.items()})

    @property
    def scaling(self) -> float:
        """α/r."""
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank adapter: y = x Wᵀ + b + (α/r)·(x Aᵀ) Bᵀ, A [r, in], B [out, r].

    Built around an existing `linear`: the same `weight` and `bias` parameters (same names), plus `lora_A` and
    `lora_B` on the weight's device and dtype (A as nn.Linear's init, B = 0, as PEFT)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        adopt(self, linear)  # the base parameters are `linear`'s own
        self.rank, self.alpha = rank, alpha
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        """α/r."""
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """(α/r)·B A [out, in]."""
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def unwrap(self) -> nn.Linear:
        """A plain nn.Linear holding this module's base parameters (the adapter dropped, not merged)."""
        plain = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(plain)
        adopt(plain, self, skip=frozenset({"rank", "alpha", "lora_A", "lora_B"}))
        return plain


def lora_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """Module name → the module `config` adapts in `model` (a DeepSeekForCausalLM's names)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        experts, attention = _EXPERTS.fullmatch(name), _ATTENTION.fullmatch(name)
        match = experts or attention
        if match is None or (config.layers is not None and int(match[1]) not in config.layers):
            continue
        if experts and "experts" in config.targets and isinstance(module, RoutedExperts):
            if config.experts is None or config.experts.get(int(match[1])):
                found[name] = module
        elif attention and "attention" in config.targets and isinstance(module, nn.Linear):
            found[name] = module
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Add `config`'s adapters to `model` in place and return it: every parameter it had is frozen
    (requires_grad False), the new LoRA factors are trainable. Refused (ValueError) for a model that already has
    adapters, or where `config` finds nothing to adapt (e.g. "experts" on a model without MoE layers)."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora or reload it first)")
    targets = lora_targets(model, config)
    if not targets:
        raise ValueError(f"LoRAConfig.targets={config.targets!r} finds nothing to adapt in this model "
                         f"(layers {config.layers or 'all'})")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets.items():
        if isinstance(module, RoutedExperts):
            layer = int(_EXPERTS.fullmatch(name)[1])
            chosen = None if config.experts is None else config.experts[layer]
            wrapped = LoRAExperts(module, config.rank, config.alpha, chosen)
        else:
            wrapped = LoRALinear(module, config.rank, config.alpha)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapped)
    model.lora_config = config
    return model


def is_lora_name(name: str) -> bool:
    """Whether a state-dict name is a LoRA factor."""
    return _FACTOR.search(name) is not None


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA factors of `model` (detached), by parameter name."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_name(name)}


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` without the LoRA factors: what a checkpoint of the base model holds."""
    return {name: t for name, t in model.state_dict().items() if not is_lora_name(name)}


def _adapted(model: nn.Module) -> dict[str, LoRAExperts | LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRAExperts, LoRALinear))}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weights, W ← W + (α/r)·B A (computed in float32, stored in W's dtype), and
    put plain modules back: the model has its original parameter names and nothing else. In place; returns it.
    The merged weights' requires_grad is as the model's other parameters' (frozen by `apply_lora`)."""
    for name, module in _adapted(model).items():
        if isinstance(module, LoRAExperts):
            for proj in ("gate_up_proj", "down_proj"):
                weight = getattr(module, proj)
                lora_a, lora_b = (t.float() for t in module.lora_factors(proj))
                weight.add_((torch.bmm(lora_b, lora_a) * module.scaling).to(weight.dtype))
        else:
            module.weight.add_((module.lora_B.float() @ module.lora_A.float() * module.scaling).to(module.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.unwrap())
    model.lora_config = None
    return model


def load_lora_state_dict(model: nn.Module, tensors: Mapping[str, Tensor], where: str = "adapter") -> None:
    """Copy LoRA factors into a model with adapters (`apply_lora`), checking first that the names are exactly
    the model's factors and every shape fits (ValueError naming the tensor)."""
    own = dict(model.named_parameters())
    factors = {n for n in own if is_lora_name(n)}
    missing, extra = sorted(factors - tensors.keys()), sorted(tensors.keys() - factors)
    if extra:
        raise ValueError(f"{where}: tensor {extra[0]!r} is not a LoRA factor of this model ({len(extra)} such)")
    if missing:
        raise ValueError(f"{where}: lacks the LoRA factor {missing[0]!r} ({len(missing)} missing)")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {list(t.shape)}, this model's factor {list(own[name].shape)} "
                "(an adapter for another model)"
            )
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapters as a PEFT adapter directory (`deepmoe.io.adapter.save_adapter`), with PEFT's
    layers_to_transform when only some decoder layers have adapters (ESFT's layers)."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    adapted = sorted({int(m[1]) for name in _adapted(model) if (m := _LAYER.match(name))})
    every = adapted == list(range(model.config.num_hidden_layers))
    return adapter_io.save_adapter(
        lora_state_dict(model), path, rank=config.rank, alpha=config.alpha, config=model.config,
        layers=None if every else adapted, base_model_name_or_path=base_model_name_or_path,
    )  # fmt: skip


def load_adapter(model: nn.Module, path: str | os.PathLike | adapter_io.Adapter) -> nn.Module:
    """Add the adapter directory `path` (PEFT LoRA format) to `model` in place (`apply_lora` with the adapter's
    rank, α, targets and layers, then its factors) and return it. Refused with one AdapterError when the adapter
    was made for a model of another config, or its tensors do not fit this model's modules."""
    adapter = path if isinstance(path, adapter_io.Adapter) else adapter_io.read_adapter(path)
    adapter_io.check_adapter_base(adapter, model.config)
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        config = LoRAConfig(rank=adapter.rank, alpha=adapter.alpha, targets=adapter.targets, layers=adapter.layers)
        apply_lora(model, config)
        load_lora_state_dict(model, adapter.tensors, adapter.path)
    except ValueError as err:
        if getattr(model, "lora_config", None) is not None:  # leave the model as it was
            for name, module in _adapted(model).items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.unwrap())
            model.lora_config = None
        for p, requires_grad in trainable.items():
            p.requires_grad_(requires_grad)
        raise adapter_io.AdapterError(f"{adapter.path}: does not fit this model: {err}") from None
    return model


__all__ = [
    "ATTENTION_PROJECTIONS",
    "LORA_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "base_state_dict",
    "is_lora_name",
    "load_adapter",
    "load_lora_state_dict",
    "lora_state_dict",
    "lora_targets",
    "merge_lora",
    "save_adapter",
]
