"""Upcycling (docs/design.md#s5-upcycling): a dense checkpoint becomes a fine-grained MoE that computes the
same function.

Each dense SwiGLU FFN(x) = W_down (silu(W_gate x) ⊙ W_up x) of width I is a sum of M slices of width
w = I/M over its intermediate dimension (rows of W_gate and W_up, columns of W_down):

    FFN(x) = Σ_{j<M} FFN_j(x),   FFN_j = W_down[:, jw:(j+1)w] (silu(W_gate[jw:(j+1)w] x) ⊙ W_up[jw:(j+1)w] x)

The first K_s slices, concatenated, become the shared expert (width K_s·w); the other N_r = M − K_s
are routed experts. The router starts at zero, so every expert gets the same gate g_0 (softmax: 1/N_r;
sigmoid: 1/2; then the config's normalisation and scaling), and each routed expert's W_down is
multiplied by 1/g_0. With top-k = N_r (all routed experts, the default) the layer then computes
shared + Σ_j g_0 · FFN_j / g_0 = FFN(x): the upcycled model equals the dense one at step 0, to float
rounding. A smaller top-k makes a sparse model that no longer computes the dense function; its router
starts from N(0, initializer_range) so that tokens spread over the experts instead of tying.

With R replicas (sparse upcycling), each routed slice appears R times (N_r = R(M − K_s)), each copy's
W_down divided by R, so the sum is unchanged; `noise` σ adds σ·std(W)·ε to each copy's weights, which
breaks the symmetry between copies (and the exact equality, by about σ).

PESC (Wu et al., 2024, "Parameter-Efficient Sparsity Crafting from Dense to Mixture-of-Experts for Instruction
Tuning on General Tasks"; `upcycle_pesc`) keeps each dense FFN F whole, shared and frozen, and makes E experts
E_i = A_i ∘ F, A_i(y) = y + W_up,i σ(W_down,i y) a bottleneck adapter of rank r (`deepmoe.moe.adapter_experts`),
top-k routed with gate weights normalised to sum 1. W_up starts at zero, so every adapter is the identity and the
layer computes Σ_i g_i F(x) = F(x): the dense function at step 0 for any top-k. Training updates the adapters
and routers only (`DeepSeekForCausalLM.trainable_parameters`).

Inputs: a deepmoe dense checkpoint (config `moe` None, any model_type) or a Hugging Face Llama-style
checkpoint (model_type "llama": q/k/v/o attention, gate/up/down SwiGLU, RMSNorm, RoPE on halves), which
becomes model_type "deepseek" (DeepSeekMoE 16B's MHA layout).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepmoe.config import DeepSeekConfig, MoEConfig
from deepmoe.io.checkpoint import (
    CONFIG_NAME,
    SafetensorsCheckpoint,
    checkpoint_dir,
    checkpoint_output,
    copy_tokenizer_files,
    load_checkpoint,
    read_json,
)
from deepmoe.io.files import atomic_directory, claim_directory, refuse_overlap, write_json
from deepmoe.io.hf import expected_shapes, rope_from_hf
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe import MoE

UPCYCLE_RECORD = "upcycle.json"
"""The options and the step-0 check of an upcycled checkpoint, written beside its weights."""


def config_from_llama(raw: dict[str, Any]) -> DeepSeekConfig:
    """A dense model_type "deepseek" config computing what a transformers Llama config computes."""
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    if raw.get("head_dim", head_dim) != head_dim:
        raise ValueError(
            f"llama head_dim={raw['head_dim']} is not supported: must be hidden_size / num_attention_heads"
        )
    rope_theta, scaling = rope_from_hf(raw, 10000.0)
    if scaling is not None:
        raise ValueError(f"llama rope_scaling={scaling} is not supported: deepmoe has plain RoPE and YaRN only")
    if raw.get("mlp_bias") or raw.get("hidden_act", "silu") != "silu":
        raise ValueError("llama FFNs must be SwiGLU without bias (hidden_act silu, mlp_bias false)")
    return DeepSeekConfig(
        model_type="deepseek", attention_type="mha", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        max_position_embeddings=raw.get("max_position_embeddings", 2048), rope_theta=rope_theta,
        rope_interleave=False, rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)), initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
    )  # fmt: skip


def load_dense(path: str | os.PathLike) -> tuple[DeepSeekConfig, dict[str, Tensor]]:
    """(dense config, deepmoe state dict in float32) of a deepmoe dense or a Llama checkpoint directory."""
    directory = checkpoint_dir(path)
    raw = read_json(directory / CONFIG_NAME, CONFIG_NAME)
    if raw.get("model_type") == "llama":
        config = config_from_llama(raw)
        with SafetensorsCheckpoint(directory) as ckpt:
            state = {n: ckpt.get(n).float() for n in ckpt.names() if not n.endswith("rotary_emb.inv_freq")}
        for name, shape in expected_shapes(config).items():
            if name not in state:
                raise ValueError(f"{directory}: llama checkpoint lacks tensor {name!r}")
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"{directory}: tensor {name!r} has shape {list(state[name].shape)}, expected {list(shape)}"
                )
        extra = sorted(set(state) - set(expected_shapes(config)))
        if extra:
            raise ValueError(f"{directory}: unexpected tensor {extra[0]!r} for a llama model")
        return config, state
    config, state = load_checkpoint(directory, dtype=torch.float32)
    if config.moe is not None:
        raise ValueError(f"{directory} is already an MoE model: upcycle takes a dense checkpoint (no MoE layers)")
    return config, state


def _check_keep_dense(dense: DeepSeekConfig, keep_dense: int) -> None:
    if not isinstance(keep_dense, int) or not 0 <= keep_dense < dense.num_hidden_layers:
        raise ValueError(
            f"--keep-dense {keep_dense} is invalid: must be in [0, num_hidden_layers={dense.num_hidden_layers})"
        )


def _gate(dense: DeepSeekConfig, n_routed: int) -> dict[str, Any]:
    """The gate settings of the model_type: softmax and greedy routing (deepseek, deepseek_v2), sigmoid with
    aux-loss-free balancing (deepseek_v3)."""
    if dense.model_type != "deepseek_v3":
        return dict(scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.001)
    if n_routed < 2:
        return dict(scoring_func="sigmoid", topk_method="greedy")
    return dict(scoring_func="sigmoid", topk_method="noaux_tc", use_expert_bias=True, seq_aux_loss_alpha=1e-4)


def upcycled_config(
    dense: DeepSeekConfig,
    experts_per_ffn: int,
    shared: int = 0,
    top_k: int | None = None,
    replicas: int = 1,
    keep_dense: int = 0,
) -> DeepSeekConfig:
    """The MoE config: M = experts_per_ffn slices of width I/M, K_s = `shared` of them shared,
    N_r = replicas·(M − K_s) routed, top-k (default N_r), the first `keep_dense` layers left dense.

    The gate follows the model_type: softmax and greedy routing (deepseek, deepseek_v2), sigmoid with
    aux-loss-free balancing (deepseek_v3).
    """
    m, width = experts_per_ffn, dense.intermediate_size
    if not isinstance(m, int) or m < 1 or width % m:
        raise ValueError(f"--experts-per-ffn {m} is invalid: must divide the FFN width intermediate_size={width}")
    if not isinstance(shared, int) or not 0 <= shared < m:
        raise ValueError(f"--shared {shared} is invalid: must be in [0, experts-per-ffn={m}) (one routed at least)")
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas {replicas} is invalid: must be an integer >= 1")
    n_routed = replicas * (m - shared)
    top_k = n_routed if top_k is None else top_k
    if not isinstance(top_k, int) or not 1 <= top_k <= n_routed:
        raise ValueError(f"--top-k {top_k} is invalid: must be in [1, routed experts={n_routed}]")
    _check_keep_dense(dense, keep_dense)
    moe = MoEConfig(hidden_size=dense.hidden_size, moe_intermediate_size=width // m, n_routed_experts=n_routed,
                    n_shared_experts=shared, num_experts_per_tok=top_k, **_gate(dense, n_routed))  # fmt: skip
    return replace(dense, moe=moe, first_k_dense_replace=keep_dense, moe_layer_freq=1)


def pesc_config(
    dense: DeepSeekConfig, experts: int, top_k: int, adapter_rank: int, keep_dense: int = 0
) -> DeepSeekConfig:
    """The PESC config: each FFN (width I) the one shared expert, E = `experts` adapter experts of rank r =
    `adapter_rank`, top-k routing with normalised gate weights, the first `keep_dense` layers left dense."""
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"--experts {experts} is invalid: must be an integer >= 1")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"--top-k {top_k} is invalid: must be in [1, experts={experts}]")
    if not isinstance(adapter_rank, int) or adapter_rank < 1:
        raise ValueError(f"--adapter-rank {adapter_rank} is invalid: must be an integer >= 1")
    _check_keep_dense(dense, keep_dense)
    moe = MoEConfig(hidden_size=dense.hidden_size, moe_intermediate_size=dense.intermediate_size,
                    n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=top_k, norm_topk_prob=True,
                    expert_adapter_rank=adapter_rank, **_gate(dense, experts))  # fmt: skip
    return replace(dense, moe=moe, first_k_dense_replace=keep_dense, moe_layer_freq=1)


def _gate_at_zero_router(moe: MoEConfig) -> float:
    """g_0, the gate every selected expert gets when the router weights and bias are zero."""
    layer = MoE(moe)
    with torch.no_grad():
        layer.gate.weight.zero_()
        routing = layer.gate(torch.ones(1, moe.hidden_size))
    return float(routing.topk_weight[0, 0])


@dataclass
class UpcycleResult:
    config: DeepSeekConfig
    out: Path | None
    function_preserved: bool
    """Whether the construction computes the dense function at step 0 (top-k = all routed, no noise)."""
    relative_error: float | None = None
    """‖logits_MoE − logits_dense‖ / ‖logits_dense‖ on a random batch, when checked."""


def upcycle_state(
    dense_config: DeepSeekConfig, state: dict[str, Tensor], config: DeepSeekConfig, noise: float = 0.0, seed: int = 0
) -> dict[str, Tensor]:
    """The upcycled model's state dict from the dense one's (see the module docstring)."""
    moe = config.moe
    m_slices = dense_config.intermediate_size // moe.moe_intermediate_size
    k_s, w = moe.n_shared_experts, moe.moe_intermediate_size
    replicas = moe.n_routed_experts // (m_slices - k_s)
    preserved = moe.num_experts_per_tok == moe.n_routed_experts
    fold = 1.0 / (_gate_at_zero_router(moe) * replicas)
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for p in _moe_ffns(config):
        gate, up, down = (out.pop(p + f"{proj}.weight") for proj in ("gate_proj", "up_proj", "down_proj"))
        if k_s:
            out[p + "shared_experts.gate_proj.weight"] = gate[: k_s * w].clone()
            out[p + "shared_experts.up_proj.weight"] = up[: k_s * w].clone()
            out[p + "shared_experts.down_proj.weight"] = down[:, : k_s * w].clone()
        gate_up, down_proj = [], []
        for _ in range(replicas):
            for j in range(k_s, m_slices):
                rows = slice(j * w, (j + 1) * w)
                gu, d = torch.cat([gate[rows], up[rows]]), down[:, rows] * fold
                if noise:
                    gu = gu + noise * gu.std() * torch.randn(gu.shape, generator=generator)
                    d = d + noise * d.std() * torch.randn(d.shape, generator=generator)
                gate_up.append(gu)
                down_proj.append(d)
        out[p + "experts.gate_up_proj"] = torch.stack(gate_up)
        out[p + "experts.down_proj"] = torch.stack(down_proj)
        router = torch.zeros(moe.n_routed_experts, moe.hidden_size)
        if not preserved:  # zero scores would tie: every token would pick the first experts
            router.normal_(0.0, config.initializer_range, generator=generator)
        out[p + "gate.weight"] = router
        if moe.use_expert_bias:
            out[p + "gate.e_score_correction_bias"] = torch.zeros(moe.n_routed_experts)
    return out


def _moe_ffns(config: DeepSeekConfig) -> list[str]:
    """The state-dict prefixes (`...mlp.`) of the MoE layers of `config`, MTP blocks included."""
    blocks = [f"model.layers.{i}." for i in range(config.num_hidden_layers)]
    blocks += [f"model.mtp.{k}.block." for k in range(config.num_nextn_predict_layers)]
    return [prefix + "mlp." for idx, prefix in enumerate(blocks) if config.is_moe_layer(idx)]


def pesc_state(
    dense_config: DeepSeekConfig, state: dict[str, Tensor], config: DeepSeekConfig, seed: int = 0
) -> dict[str, Tensor]:
    """The PESC model's state dict from the dense one's: each dense FFN moved whole to `shared_experts`,
    W_down,i ~ U(−1/√H, 1/√H) (nn.Linear's), W_up,i = 0, the router ~ N(0, initializer_range) (zero scores
    would tie: every token would pick the first experts), the selection bias 0."""
    moe, h = config.moe, config.hidden_size
    n, r = moe.n_routed_experts, moe.expert_adapter_rank
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for p in _moe_ffns(config):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"shared_experts.{proj}.weight"] = out.pop(p + f"{proj}.weight")
        bound = 1 / math.sqrt(h)
        out[p + "experts.adapter_down"] = torch.empty(n, r, h).uniform_(-bound, bound, generator=generator)
        out[p + "experts.adapter_up"] = torch.zeros(n, h, r)
        out[p + "gate.weight"] = torch.empty(n, h).normal_(0.0, config.initializer_range, generator=generator)
        if moe.use_expert_bias:
            out[p + "gate.e_score_correction_bias"] = torch.zeros(n)
    return out


def trained_parameters(config: DeepSeekConfig) -> int:
    """How many parameters training updates in a model of `config` (`trainable_parameters`: all of them, or a
    PESC model's adapters and routers), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in DeepSeekForCausalLM(config).trainable_parameters())


def relative_logit_error(dense: DeepSeekForCausalLM, moe: DeepSeekForCausalLM, seed: int = 0) -> float:
    """‖logits_MoE − logits_dense‖_F / ‖logits_dense‖_F on 2 random sequences of 16 tokens."""
    g = torch.Generator().manual_seed(seed)
    length = min(16, dense.config.max_position_embeddings)
    ids = torch.randint(0, dense.config.vocab_size, (2, length), generator=g)
    with torch.no_grad():
        want, got = dense(ids).logits.double(), moe(ids).logits.double()
    return float((got - want).norm() / want.norm())


def upcycle(
    dense_path: str | os.PathLike,
    out: str | os.PathLike | None,
    experts_per_ffn: int,
    shared: int = 0,
    top_k: int | None = None,
    replicas: int = 1,
    noise: float = 0.0,
    keep_dense: int = 0,
    check: bool = True,
    seed: int = 0,
) -> UpcycleResult:
    """Upcycle the dense checkpoint `dense_path` into an MoE checkpoint `out` (None: do not save).

    `check`: measure the relative logit error of the upcycled model against the dense one.
    The output has the dense model's tokenizer files and `upcycle.json` (the options); an existing
    non-empty `out` is refused unless it is an earlier upcycle's output.
    """
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"--noise {noise!r} is invalid: must be a finite number >= 0")

    def build() -> tuple[UpcycleResult, DeepSeekForCausalLM]:
        dense_config, state = load_dense(dense_path)
        config = upcycled_config(dense_config, experts_per_ffn, shared, top_k, replicas, keep_dense)
        moe = config.moe
        preserved = moe.num_experts_per_tok == moe.n_routed_experts and noise == 0
        new_state = upcycle_state(dense_config, state, config, noise, seed)
        return _built(dense_config, state, config, new_state, preserved, check, seed)

    options = {"experts_per_ffn": experts_per_ffn, "shared": shared, "top_k": top_k, "replicas": replicas,
               "noise": noise, "keep_dense": keep_dense, "seed": seed}  # fmt: skip
    return _save(dense_path, out, build, options)


def upcycle_pesc(
    dense_path: str | os.PathLike,
    out: str | os.PathLike | None,
    experts: int,
    top_k: int,
    adapter_rank: int,
    keep_dense: int = 0,
    check: bool = True,
    seed: int = 0,
) -> UpcycleResult:
    """PESC-upcycle the dense checkpoint `dense_path` into `out` (None: do not save): `pesc_config` and
    `pesc_state`, which compute the dense function at step 0 for any top-k. Options and output as `upcycle`;
    `upcycle.json` records "pesc": true. The checkpoint is deepmoe's only (transformers cannot load adapters)."""

    def build() -> tuple[UpcycleResult, DeepSeekForCausalLM]:
        dense_config, state = load_dense(dense_path)
        config = pesc_config(dense_config, experts, top_k, adapter_rank, keep_dense)
        new_state = pesc_state(dense_config, state, config, seed)
        return _built(dense_config, state, config, new_state, True, check, seed)

    options = {"pesc": True, "experts": experts, "top_k": top_k, "adapter_rank": adapter_rank,
               "keep_dense": keep_dense, "seed": seed}  # fmt: skip
    return _save(dense_path, out, build, options)


def _save(
    dense_path: str | os.PathLike,
    out: str | os.PathLike | None,
    build: Callable[[], tuple[UpcycleResult, DeepSeekForCausalLM]],
    options: dict[str, Any],
) -> UpcycleResult:
    """`build()`'s result, with its model saved in `out` (with the tokenizer files and `upcycle.json`: the
    dense path, `options` and the step-0 check) unless `out` is None."""
    if out is None:
        return build()[0]
    refuse_overlap(out, [dense_path], "the dense checkpoint")
    with claim_directory(out, f"upcycled checkpoint ({UPCYCLE_RECORD})", checkpoint_output(UPCYCLE_RECORD)) as target:
        result, model = build()
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            copy_tokenizer_files(checkpoint_dir(dense_path), tmp)
            record = {"dense": os.path.abspath(dense_path), **options, "function_preserved": result.function_preserved,
                      "relative_error": result.relative_error}  # fmt: skip
            write_json(tmp / UPCYCLE_RECORD, record)
        result.out = target
    return result


def _built(
    dense_config: DeepSeekConfig,
    state: dict[str, Tensor],
    config: DeepSeekConfig,
    new_state: dict[str, Tensor],
    preserved: bool,
    check: bool,
    seed: int,
) -> tuple[UpcycleResult, DeepSeekForCausalLM]:
    """The MoE model of `config` with `new_state` (eval mode) and its result, with the relative logit error
    against the dense model (`state`) when `check`."""
    model = DeepSeekForCausalLM(config)
    model.load_state_dict(new_state, strict=True)
    model.eval()
    result = UpcycleResult(config, None, preserved)
    if check:
        dense = DeepSeekForCausalLM(dense_config)
        dense.load_state_dict(state, strict=True)
        result.relative_error = relative_logit_error(dense.eval(), model, seed)
    return result, model
