"""Configuration dataclasses, validated when built.

Field names follow Hugging Face's DeepSeek configs (`n_routed_experts`,
`num_experts_per_tok`, `n_group`, `topk_group`, `routed_scaling_factor`, ...)
so that checkpoint configs map onto them one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
CAPACITY_SCOPES = ("expert", "device")
DROP_POLICIES = ("probs", "position")
EXPERTS_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")


def check(config: Any, ok: bool, field: str, allowed: str) -> None:
    """Raise the one ValueError a bad setting gets: `Class.field=value is invalid: allowed`."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r} is invalid: {allowed}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite int or float (not a bool, a string or None): the type a numeric field needs."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MoEConfig:
    """One DeepSeekMoE layer (R1–R6, B1–B5, E1–E3 in docs/design.md).

    Frozen: a setting cannot be changed in place (several layers may share one config, and a bad value
    would only fail deep inside a forward). Change it with `dataclasses.replace(config, field=value)`,
    which validates the new config at once, and give it to one layer with `layer.config = new_config`.

    Notation of the papers: H = `hidden_size`, N_r = `n_routed_experts`,
    N_s = `n_shared_experts`, K_r = `num_experts_per_tok`, G = `n_group`,
    M = `topk_group`, D = `n_devices`, γ = `bias_update_speed`.
    """

    hidden_size: int = 1024
    moe_intermediate_size: int = 256
    """Width of each routed expert's SwiGLU FFN (fine-grained: a fraction of a dense FFN)."""
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    """Always-active experts, run as one SwiGLU of width N_s × moe_intermediate_size."""
    num_experts_per_tok: int = 6

    # gate (R1, R2)
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    # group-limited routing (R3): "greedy" (no groups), "group_limited_greedy"
    # (V2: group score = max score), "noaux_tc" (V3: sum of the top-2 biased scores)
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1

    # aux-loss-free balancing (R4): b_i += γ·sign(mean load − load_i)
    use_expert_bias: bool = False
    bias_update_speed: float = 0.001

    # token dropping (R5), training only; None turns it off
    capacity_factor: float | None = None
    capacity_scope: str = "expert"
    """Capacity per expert (cf·T·K_r/N_r) or per device (cf·T·K_r/D)."""
    drop_policy: str = "probs"
    """"probs": drop the lowest-affinity slots; "position": drop the latest tokens."""
    no_drop_fraction: float = 0.0
    """Fraction of the batch's sequences (the first ones) whose tokens are never dropped."""

    # balance losses (B1–B5); each term is multiplied by its weight, 0 turns it off
    n_devices: int = 1
    """D: how many devices the experts are spread over (device-level losses, capacity)."""
    aux_loss_alpha: float = 0.0
    """α1, expert-level loss (B1)."""
    device_aux_loss_alpha: float = 0.0
    """α2, device-level loss (B2)."""
    comm_aux_loss_alpha: float = 0.0
    """α3, communication loss (B3)."""
    seq_aux_loss_alpha: float = 0.0
    """α of the sequence-wise loss (B4)."""
    z_loss_coef: float = 0.0
    """Router z-loss: mean_t (logsumexp_i u_t·e_i)²."""
    entropy_loss_coef: float = 0.0
    """Mean per-token routing entropy; > 0 sharpens routing, < 0 spreads it."""

    experts_implementation: str = "auto"
    """"grouped_mm" (one grouped product), "loop" (per-expert slices) or "auto"."""
    fp8_experts: bool = False
    """Routed experts' products in fine-grained FP8 (V3: 1×128 activation tiles, 128×128 weight blocks, e4m3),
    simulated (quantise–dequantise, float32 accumulation) where there is no FP8 matrix unit."""

    # DeepSeek-V4
    swiglu_limit: float | None = None
    """Clamped SwiGLU of the routed and shared experts: gate ≤ limit, up in [−limit, limit]; None: no clamp."""
    hash_vocab_size: int = 0
    """Hash routing (V4's first layers): the experts of token id v are the buffer `tid2eid[v]` [vocab, K_r] of this
    many token ids, the gate weights still come from the learned scores; 0: learned top-K routing."""
    expert_adapter_rank: int | None = None
    """PESC (docs/design.md#pesc-adapter-experts): r, the bottleneck width of adapter experts. Each routed expert
    is then the one shared dense FFN (n_shared_experts=1, width moe_intermediate_size) followed by its own adapter
    y + W_up σ(W_down y); None: ordinary SwiGLU experts."""

    def __post_init__(self) -> None:
        for field in (
            "hidden_size",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "n_devices",
        ):
            value = getattr(self, field)
            check(self, is_int(value) and value >= 1, field, "must be an integer >= 1")
        check(
            self,
            is_int(self.n_shared_experts) and self.n_shared_experts >= 0,
            "n_shared_experts",
            "must be an integer >= 0",
        )
        n_r = self.n_routed_experts
        check(self, self.num_experts_per_tok <= n_r, "num_experts_per_tok", f"must be in [1, n_routed_experts={n_r}]")
        for field in ("norm_topk_prob", "use_expert_bias", "fp8_experts"):
            check(self, isinstance(getattr(self, field), bool), field, "must be True or False")
        check(self, self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        check(
            self,
            is_real(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            "must be a finite number > 0",
        )

        check(self, self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        check(self, n_r % self.n_group == 0, "n_group", f"must divide n_routed_experts={n_r}")
        check(
            self,
            self.topk_method != "greedy" or self.n_group == 1,
            "n_group",
            "must be 1 with topk_method='greedy' (use 'group_limited_greedy' or 'noaux_tc' for groups)",
        )
        check(self, self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
        per_group = n_r // self.n_group
        check(
            self,
            self.topk_group * per_group >= self.num_experts_per_tok,
            "topk_group",
            f"topk_group × experts per group ({per_group}) must be >= num_experts_per_tok={self.num_experts_per_tok}",
        )
        check(
            self,
            self.topk_method != "noaux_tc" or per_group >= 2,
            "n_group",
            "noaux_tc scores a group by its top-2 experts: each group needs >= 2 experts",
        )

        check(
            self,
            is_real(self.bias_update_speed) and self.bias_update_speed >= 0,
            "bias_update_speed",
            "must be a finite number >= 0",
        )
        cf = self.capacity_factor
        check(self, cf is None or (is_real(cf) and cf > 0), "capacity_factor", "must be None or a number > 0")
        check(self, self.capacity_scope in CAPACITY_SCOPES, "capacity_scope", f"must be one of {CAPACITY_SCOPES}")
        check(self, self.drop_policy in DROP_POLICIES, "drop_policy", f"must be one of {DROP_POLICIES}")
        check(
            self,
            is_real(self.no_drop_fraction) and 0.0 <= self.no_drop_fraction <= 1.0,
            "no_drop_fraction",
            "must be in [0, 1]",
        )
        check(self, n_r % self.n_devices == 0, "n_devices", f"must divide n_routed_experts={n_r}")

        for field in (
            "aux_loss_alpha",
            "device_aux_loss_alpha",
            "comm_aux_loss_alpha",
            "seq_aux_loss_alpha",
            "z_loss_coef",
        ):
            value = getattr(self, field)
            check(self, is_real(value) and value >= 0, field, "must be a finite number >= 0")
        check(self, is_real(self.entropy_loss_coef), "entropy_loss_coef", "must be a finite number")
        limit = self.swiglu_limit
        check(self, limit is None or (is_real(limit) and limit > 0), "swiglu_limit", "must be None or a number > 0")
        check(
            self,
            is_int(self.hash_vocab_size) and self.hash_vocab_size >= 0,
            "hash_vocab_size",
            "must be an integer >= 0 (0: learned routing)",
        )
        check(
            self,
            self.experts_implementation in EXPERTS_IMPLEMENTATIONS,
            "experts_implementation",
            f"must be one of {EXPERTS_IMPLEMENTATIONS}",
        )
        rank = self.expert_adapter_rank
        check(
            self, rank is None or (is_int(rank) and rank >= 1), "expert_adapter_rank", "must be None or an integer >= 1"
        )
        if rank is not None:
            check(
                self,
                self.n_shared_experts == 1,
                "n_shared_experts",
                "must be 1 with expert_adapter_rank (PESC): the one dense FFN every adapter expert reads",
            )
            check(self, not self.fp8_experts, "fp8_experts", "must be False with expert_adapter_rank (PESC)")

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def experts_per_device(self) -> int:
        return self.n_routed_experts // self.n_devices

    @property
    def max_devices_per_token(self) -> int:
        """M of the communication loss (B3): how many devices one token can reach at most."""
        if self.topk_method != "greedy" and self.n_group == self.n_devices:
            return self.topk_group
        return min(self.num_experts_per_tok, self.n_devices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
ATTENTION_TYPES = ("mla", "mha", "shared_kv")
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")


@dataclass
class DeepSeekConfig:
    """A DeepSeek causal LM (M1–M4 in docs/design.md). Field names follow HF's config.json of each model_type.

    Mutable, like Hugging Face configs (`config.num_hidden_layers = 2` before building a model): it is a
    recipe that the model's constructor reads once. Its `moe` is a frozen `MoEConfig`
    (`config.moe = dataclasses.replace(config.moe, ...)`); a built model's MoE layers each hold theirs
    (`model.moe_layers()[i].config`), so changing one layer's routing never changes another's.

    `moe` is the routed layer's config (None: every FFN is dense); its hidden_size must
    equal this config's. Layer i uses the MoE FFN when `moe` is set, i >= first_k_dense_replace
    and i % moe_layer_freq == 0.

    DeepSpeed-MoE's variants (docs/design.md, E4) are configs: Pyramid-MoE sets `moe_experts_per_layer`
    (more experts in later layers); Residual-MoE is a fixed dense MLP plus a top-1 routed
    correction, i.e. `n_shared_experts=1, num_experts_per_tok=1` (preset `tiny-residual-moe`).
    """

    model_type: str = "deepseek_v3"
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 192
    """Width of the dense SwiGLU FFNs (the first_k_dense_replace layers)."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 4

    # attention: "mla" (V2/V3) or "mha" (DeepSeekMoE 16B, Llama-style with num_key_value_heads)
    attention_type: str = "mla"
    num_key_value_heads: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention_bias: bool = False

    # DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): model_type "deepseek_v32" only; None elsewhere (dense MLA)
    index_topk: int | None = None
    """k: the cached tokens each query attends to, the top-k of the lightning indexer's scores."""
    index_head_dim: int | None = None
    """D, the indexer's query/key width (its first qk_rope_head_dim dims carry RoPE)."""
    index_n_heads: int | None = None
    """H^I, the indexer's query heads (one shared key head)."""

    # DeepSeek-V4 (model_type "deepseek_v4", attention_type "shared_kv": one K = V head of width
    # head_dim = qk_nope_head_dim + qk_rope_head_dim); None for the other model types. V4 also uses q_lora_rank and,
    # with CSA layers, index_topk / index_head_dim / index_n_heads (its lightning indexer over compressed entries).
    layer_types: list[str] | None = None
    """Each layer's attention: "sliding_attention", "compressed_sparse_attention" (CSA) or
    "heavily_compressed_attention" (HCA); every one attends over a sliding window of sliding_window tokens."""
    mlp_layer_types: list[str] | None = None
    """Each layer's MoE: "hash_moe" (experts from the token id, `MoEConfig.hash_vocab_size`) or "moe"."""
    compress_rates: dict[str, int] | None = None
    """Tokens pooled into one compressed entry, by layer type: m of CSA (4), m' of HCA (128)."""
    sliding_window: int | None = None
    """n_win: the latest tokens (the query's own included) each query attends to uncompressed."""
    compress_rope_theta: float | None = None
    """RoPE base of the CSA/HCA layers (with rope_scaling); sliding layers use rope_theta, unscaled."""
    o_groups: int | None = None
    """g of the grouped low-rank output projection."""
    o_lora_rank: int | None = None
    """d_g, each group's intermediate width in the grouped output projection."""
    hc_mult: int | None = None
    """n_hc, the residual streams of the manifold-constrained hyper-connections (mHC)."""
    hc_sinkhorn_iters: int | None = None
    """Sinkhorn–Knopp iterations projecting mHC's residual mapping onto doubly stochastic matrices."""
    hc_eps: float | None = None
    """ε added to mHC's pre and combination weights (and to the Sinkhorn denominators)."""

    # position embedding
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF rope_scaling, e.g. {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}."""
    rope_interleave: bool = True
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek V2/V3 do; False: rotate halves (Llama)."""

    # FFN layout
    moe: MoEConfig | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    moe_experts_per_layer: list[int] | None = None
    """Pyramid-MoE: N_r of each main layer, one entry per layer index 0..num_hidden_layers−1; an MoE
    layer's entry replaces moe.n_routed_experts (every other MoE setting is shared), a dense layer's
    entry must be 0. None: every MoE layer has moe.n_routed_experts. The MTP modules keep moe's."""

    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0
    """D, the number of multi-token-prediction modules (V3: 1)."""
    mtp_loss_weight: float = 0.3
    """λ of the MTP loss, λ/D Σ_k L_k."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # Native Sparse Attention (NSA, Yuan et al. 2025) on MLA's latents, docs/design.md#m7b-native-sparse-attention-
    # on-mla: all five set, or all None (dense MLA)
    nsa_compress_block: int | None = None
    """l: tokens per compressed block (one compressed latent each)."""
    nsa_compress_stride: int | None = None
    """d: the stride between compressed blocks (d <= l, d divides l)."""
    nsa_select_block: int | None = None
    """l': tokens per selection block (a multiple of d, >= l)."""
    nsa_select_count: int | None = None
    """n: selection blocks each token attends to, the initial and the 2 local blocks among them (n >= 3)."""
    nsa_window: int | None = None
    """w: the latest tokens (the token's own included) of the sliding-window branch."""

    def __post_init__(self) -> None:
        check(self, self.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}")
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "moe_layer_freq",
        ):
            value = getattr(self, field)
            check(self, is_int(value) and value >= 1, field, "must be an integer >= 1")
        for field in ("attention_bias", "rope_interleave", "tie_word_embeddings"):
            check(self, isinstance(getattr(self, field), bool), field, "must be True or False")
        check(self, self.attention_type in ATTENTION_TYPES, "attention_type", f"must be one of {ATTENTION_TYPES}")
        if self.attention_type == "mha":
            check(
                self,
                self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"must divide hidden_size={self.hidden_size}",
            )
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            check(
                self,
                is_int(self.num_key_value_heads)
                and self.num_key_value_heads >= 1
                and self.num_attention_heads % self.num_key_value_heads == 0,
                "num_key_value_heads",
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
            check(self, self.head_dim % 2 == 0, "num_attention_heads", "hidden_size / num_attention_heads must be even")
        else:
            check(
                self,
                self.q_lora_rank is None or (is_int(self.q_lora_rank) and self.q_lora_rank >= 1),
                "q_lora_rank",
                "must be None or an integer >= 1",
            )
            for field in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                value = getattr(self, field)
                check(self, is_int(value) and value >= 1, field, "must be an integer >= 1")
            check(
                self,
                is_int(self.qk_rope_head_dim) and self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
                "qk_rope_head_dim",
                "must be an even integer >= 2",
            )
        self._check_sparse_attention()
        self._check_v4()
        check(self, is_real(self.rope_theta) and self.rope_theta > 0, "rope_theta", "must be a finite number > 0")
        if self.rope_scaling is not None:
            check(self, isinstance(self.rope_scaling, dict), "rope_scaling", "must be a dict or None")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            check(self, kind in ("yarn", "default", None), "rope_scaling", "only 'yarn' scaling is supported")
            factor = self.rope_scaling.get("factor", 1.0)
            check(self, is_real(factor) and factor >= 1.0, "rope_scaling", "factor must be a finite number >= 1")
        if self.moe is not None:
            check(self, isinstance(self.moe, MoEConfig), "moe", "must be a MoEConfig or None")
            check(
                self,
                self.moe.hidden_size == self.hidden_size,
                "moe",
                f"moe.hidden_size={self.moe.hidden_size} must equal hidden_size={self.hidden_size}",
            )
        check(
            self,
            is_int(self.first_k_dense_replace) and 0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be an integer in [0, num_hidden_layers={self.num_hidden_layers}]",
        )
        self._check_experts_per_layer()
        check(self, is_real(self.rms_norm_eps) and self.rms_norm_eps > 0, "rms_norm_eps", "must be a finite number > 0")
        check(
            self,
            is_real(self.initializer_range) and self.initializer_range >= 0,
            "initializer_range",
            "must be a finite number >= 0",
        )
        check(
            self,
            is_int(self.num_nextn_predict_layers) and self.num_nextn_predict_layers >= 0,
            "num_nextn_predict_layers",
            "must be an integer >= 0",
        )
        check(
            self,
            is_real(self.mtp_loss_weight) and self.mtp_loss_weight >= 0,
            "mtp_loss_weight",
            "must be a finite number >= 0",
        )
        for field in ("bos_token_id", "pad_token_id"):
            value = getattr(self, field)
            check(
                self,
                value is None or (is_int(value) and 0 <= value < self.vocab_size),
                field,
                f"must be None or an integer in [0, {self.vocab_size})",
            )
        eos = self.eos_token_id
        check(
            self,
            eos is None
            or (is_int(eos) and eos >= 0)
            or (isinstance(eos, list) and all(is_int(e) and e >= 0 for e in eos)),
            "eos_token_id",
            "must be None, an integer >= 0 or a list of them",
        )
        self._check_native_sparse_attention()

    @property
    def has_indexer(self) -> bool:
        """Whether the MLA layers select their keys with DSA's lightning indexer (model_type "deepseek_v32")."""
        return self.model_type == "deepseek_v32"

    def _check_sparse_attention(self) -> None:
        fields = ("index_topk", "index_head_dim", "index_n_heads")
        if self.model_type == "deepseek_v4":  # its CSA indexer: checked by _check_v4
            return
        if not self.has_indexer:
            for field in fields:
                check(self, getattr(self, field) is None, field, "must be None unless model_type='deepseek_v32'")
            return
        check(self, self.attention_type == "mla", "attention_type", "must be 'mla' with model_type='deepseek_v32'")
        check(
            self,
            is_int(self.q_lora_rank),
            "q_lora_rank",
            "must be set with model_type='deepseek_v32' (the indexer's query comes from MLA's compressed query)",
        )
        for field in fields:
            check(self, is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "must be an integer >= 1")
        check(
            self,
            self.index_topk <= self.max_position_embeddings,
            "index_topk",
            f"must be <= max_position_embeddings={self.max_position_embeddings} (a larger k selects every token)",
        )
        check(
            self,
            self.index_head_dim >= self.qk_rope_head_dim,
            "index_head_dim",
            f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its first qk_rope_head_dim dims carry RoPE)",
        )

    V4_FIELDS = ("layer_types", "mlp_layer_types", "compress_rates", "sliding_window", "compress_rope_theta",
                 "o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "hc_eps")  # fmt: skip

    def _check_v4(self) -> None:
        if self.model_type != "deepseek_v4":
            check(self, self.attention_type != "shared_kv", "attention_type", "'shared_kv' is model_type='deepseek_v4'")
            for field in self.V4_FIELDS:
                check(self, getattr(self, field) is None, field, "must be None unless model_type='deepseek_v4'")
            return
        n = self.num_hidden_layers
        check(self, self.attention_type == "shared_kv", "attention_type", "must be 'shared_kv' with deepseek_v4")
        check(self, is_int(self.q_lora_rank), "q_lora_rank", "must be an integer >= 1 with deepseek_v4")
        check(self, self.moe is not None, "moe", "must be set with deepseek_v4 (every layer is MoE)")
        check(self, self.intermediate_size == self.moe.moe_intermediate_size, "intermediate_size",
              f"must equal moe.moe_intermediate_size={self.moe.moe_intermediate_size} with deepseek_v4 (no dense "
              "FFN)")  # fmt: skip
        check(self, self.first_k_dense_replace == 0 and self.moe_layer_freq == 1, "first_k_dense_replace",
              "must be 0 (and moe_layer_freq 1) with deepseek_v4: every layer is MoE")  # fmt: skip
        for field, allowed in (("layer_types", V4_LAYER_TYPES), ("mlp_layer_types", V4_MLP_LAYER_TYPES)):
            types = getattr(self, field)  # longer lists are cut to the layers, as transformers' config does
            check(self, isinstance(types, (list, tuple)) and len(types) >= n and all(t in allowed for t in types),
                  field, f"must list num_hidden_layers={n} entries from {allowed}")  # fmt: skip
            setattr(self, field, list(types[:n]))
        rates = self.compress_rates
        check(self, isinstance(rates, dict) and set(rates) == set(V4_LAYER_TYPES[1:])
              and all(is_int(r) and r >= 1 for r in rates.values()), "compress_rates",
              f"must map {V4_LAYER_TYPES[1:]} to integers >= 1")  # fmt: skip
        for field in ("sliding_window", "o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters"):
            value = getattr(self, field)
            check(self, is_int(value) and value >= 1, field, "must be an integer >= 1 with deepseek_v4")
        for field in ("compress_rope_theta", "hc_eps"):
            value = getattr(self, field)
            check(self, is_real(value) and value > 0, field, "must be a finite number > 0 with deepseek_v4")
        width = self.num_attention_heads * self.head_dim
        check(self, width % self.o_groups == 0, "o_groups",
              f"must divide num_attention_heads × head_dim = {width}")  # fmt: skip
        if "compressed_sparse_attention" in self.layer_types:
            for field in ("index_topk", "index_head_dim", "index_n_heads"):
                value = getattr(self, field)
                check(self, is_int(value) and value >= 1, field, "must be an integer >= 1 with CSA layers")
            check(self, self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
                  f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its last dims carry RoPE)")  # fmt: skip

    @property
    def head_dim(self) -> int:
        """Per-head width of MHA, or the query/key width qk_nope_head_dim + qk_rope_head_dim of MLA."""
        if self.attention_type == "mha":
            return self.hidden_size // self.num_attention_heads
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def _check_experts_per_layer(self) -> None:
        counts, n = self.moe_experts_per_layer, self.num_hidden_layers
        if counts is None:
            return
        field = "moe_experts_per_layer"
        check(self, self.moe is not None, field, "needs moe (a model with MoE layers)")
        check(
            self,
            isinstance(counts, (list, tuple)) and len(counts) == n,
            field,
            f"must be a list of num_hidden_layers={n} expert counts (0 for the dense layers)",
        )
        self.moe_experts_per_layer = list(counts)
        for i, count in enumerate(counts):
            if not self.is_moe_layer(i):
                check(self, count == 0 and is_int(count), field, f"entry {i} must be 0: layer {i} is dense")
                continue
            check(self, is_int(count) and count >= 1, field, f"entry {i} must be an integer >= 1")
            try:
                replace(self.moe, n_routed_experts=count)
            except ValueError as err:
                raise ValueError(f"DeepSeekConfig.moe_experts_per_layer[{i}]={count} is invalid: {err}") from None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe is not None and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def moe_config(self, layer_idx: int) -> MoEConfig:
        """The MoE config of layer `layer_idx` (an MoE layer; MTP blocks are layers >= num_hidden_layers):
        `moe` with that layer's n_routed_experts where `moe_experts_per_layer` sets one."""
        if not self.is_moe_layer(layer_idx):
            raise ValueError(f"layer {layer_idx} is not an MoE layer")
        if self.mlp_layer_types is not None and layer_idx < self.num_hidden_layers:
            if self.mlp_layer_types[layer_idx] == "hash_moe":  # V4: experts from the token id, no selection bias
                return replace(self.moe, hash_vocab_size=self.vocab_size, use_expert_bias=False)
        counts = self.moe_experts_per_layer
        if counts is None or layer_idx >= self.num_hidden_layers or counts[layer_idx] == self.moe.n_routed_experts:
            return self.moe
        return replace(self.moe, n_routed_experts=counts[layer_idx])

    NSA_FIELDS = ("nsa_compress_block", "nsa_compress_stride", "nsa_select_block", "nsa_select_count", "nsa_window")

    @property
    def has_nsa(self) -> bool:
        """Whether the MLA layers run Native Sparse Attention (the nsa_* fields set)."""
        return self.nsa_compress_block is not None

    def _check_native_sparse_attention(self) -> None:
        unset = [field for field in self.NSA_FIELDS if getattr(self, field) is None]
        if len(unset) == len(self.NSA_FIELDS):
            return
        for field in self.NSA_FIELDS:
            check(self, field not in unset, field, f"must be set with the other NSA fields {self.NSA_FIELDS}")
            check(self, is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "must be an integer >= 1")
        block, stride, select, count = (getattr(self, f) for f in self.NSA_FIELDS[:4])
        check(self, self.attention_type == "mla", "attention_type", "must be 'mla' with NSA (the nsa_* fields)")
        check(self, not self.has_indexer, "model_type", "must not be 'deepseek_v32' with NSA (DSA or NSA, not both)")
        longest = self.max_position_embeddings
        check(self, block <= longest, "nsa_compress_block", f"must be <= max_position_embeddings={longest}")
        check(
            self,
            stride <= block and block % stride == 0,
            "nsa_compress_stride",
            f"must divide nsa_compress_block={block} (a stride above the block skips tokens)",
        )
        check(
            self,
            select % stride == 0 and block <= select <= longest,
            "nsa_select_block",
            f"must be a multiple of nsa_compress_stride={stride}, >= nsa_compress_block={block} (every block "
            f"before the local ones then has compressed blocks to score it) and <= max_position_embeddings={longest}",
        )
        check(
            self,
            3 <= count and count * select <= longest,
            "nsa_select_count",
            f"must be >= 3 (the initial and the 2 local blocks are always selected) and count × nsa_select_block "
            f"<= max_position_embeddings={longest}",
        )
        check(self, self.nsa_window <= longest, "nsa_window", f"must be <= max_position_embeddings={longest}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> DeepSeekConfig:
        fields = dict(fields)
        if isinstance(fields.get("moe"), dict):
            fields["moe"] = MoEConfig(**fields["moe"])
        return cls(**fields)
