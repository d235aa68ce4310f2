"""DeepSeek-V4 attention (DeepSeek-V4 technical report §2.3; docs/design.md#deepseek-v4): shared-KV multi-query
attention over a sliding window, plus compressed entries in CSA and HCA layers.

For a token x (the block input, [B, S, H]) with n heads of width d, the last d_r dims of which carry RoPE:

    c^Q = RMSNorm(W_qa x),  q_h = unit_rms(W_qb c^Q)_h,  kv = RMSNorm(W_kv x)        (one K = V head)
    q, kv rotated (interleaved pairs, the trailing d_r dims) at their positions
    o_h = Σ_j softmax_j([q_h·k_j / √d ; sink_h]) kv_j    (the sink takes probability mass and gives no value)
    o_h's trailing d_r dims rotated back by the query's angle (kv is also the value)
    out = W_ob [W_oa^(1) o^(1); ...; W_oa^(g) o^(g)]     (grouped low-rank output: g groups of n/g heads)

The keys j of query t: the last `sliding_window` tokens up to t, and in CSA / HCA layers the compressed entries
whose windows have closed by t (entry w pools tokens [w·m, (w + 1)·m), visible when w < (t + 1) // m):

    C_w = RMSNorm(Σ_s softmax_s(Z_s + B_s) ⊙ C_s),  C = W_kv x,  Z = W_gate x,  B the learned position bias [m, ·]

over the m tokens of window w (HCA, m' = 128), or (CSA, m = 4, overlapping windows) over 2m slots: the first
halves of window w − 1's projections and the second halves of window w's. C_w is rotated at position w·m. CSA's
lightning indexer pools keys K^I the same way (width index_head_dim) and scores I_t,w = Σ_h w_t,h ·
ReLU(q^I_t,h · K^I_w) / √c^I with q^I = W^I_qb c^Q and w_t = W_w x / √n^I; each query keeps its index_topk
visible entries of highest score.

Parameter names are transformers' DeepseekV4Attention's (`q_a_proj`, `q_a_norm`, `q_b_proj`, `kv_proj`, `kv_norm`,
`o_a_proj`, `o_b_proj`, `sinks`, `compressor.{kv_proj, gate_proj, position_bias, kv_norm}`,
`compressor.indexer.{..., q_b_proj, scorer.weights_proj}`).

The cache keeps, per layer in `KVCache.states`, the last sliding_window − 1 tokens' kv (all a later token can see
of them) and each compressor's open window, its last closed window (CSA's overlap) and the entries so far; the
layer's `KVCache` slots are zero-width and only count the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.model.attention import KVCache
from deepmoe.model.hyper_connections import KeepsFloat32, unit_rms
from deepmoe.model.norm import RMSNorm
from deepmoe.model.rope import RotaryEmbedding, YaRN, apply_rotary


class V4Rotary(RotaryEmbedding):
    """RoPE over `dim` dims with base `base` (YaRN's θ' when `yarn` is given, cos/sin unscaled as V4 uses them)."""

    def __init__(self, dim: int, base: float, yarn: YaRN | None) -> None:
        nn.Module.__init__(self)
        self.dim, self.base, self.yarn, self.attention_factor = dim, base, yarn, 1.0
        self.register_buffer("inv_freq", torch.empty(dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()


def rotate_tail(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the trailing 2·cos.shape[-1] dims of x [B, S, n, d] as interleaved pairs (cos, sin [S, d_r/2])."""
    rope = 2 * cos.shape[-1]
    return torch.cat((x[..., :-rope], apply_rotary(x[..., -rope:], cos, sin, interleaved=True)), dim=-1)


@dataclass
class CompressorState:
    """A compressor's progress over a sequence: the tokens of its open window, its last closed window (CSA's
    overlap) and the compressed entries so far."""

    pending_kv: Tensor | None = None
    """[B, p, c] projections C of the p < m tokens after the last closed window (the gate Z beside it)."""
    pending_gate: Tensor | None = None
    last_kv: Tensor | None = None
    """[B, m, c] the last closed window's C and Z + B (CSA: its first halves pool into the next entry)."""
    last_gate: Tensor | None = None
    entries: Tensor | None = None
    """[B, W, d] compressed entries, normed and rotated."""

    @property
    def closed(self) -> int:
        return 0 if self.entries is None else self.entries.shape[1]


class Compressor(KeepsFloat32):
    """Gated, position-biased pooling of every `ratio` tokens into one entry of width `dim` (CSA when `overlap`).
    The position bias stays float32 (`KeepsFloat32`)."""

    float32_parameters = ("position_bias",)

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = 2 * dim if overlap else dim  # CSA: two series, the first halves pool into the next window's entry
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.kv_norm = RMSNorm(dim, eps)

    def reset_parameters(self) -> None:
        """B = 0 (transformers' init)."""
        nn.init.zeros_(self.position_bias)

    def forward(self, x: Tensor, state: CompressorState, rotary: V4Rotary) -> Tensor:
        """Pool the windows x [B, S, H] closes (after the ones in `state`, which it updates) → all entries [B, W, d]."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        if state.pending_kv is not None:
            kv, gate = torch.cat((state.pending_kv, kv), 1), torch.cat((state.pending_gate, gate), 1)
        bsz, m = x.shape[0], self.ratio
        usable = kv.shape[1] // m * m
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        entries = state.entries if state.entries is not None else kv.new_zeros(bsz, 0, self.dim)
        if usable == 0:
            return entries
        n_windows = usable // m
        kv = kv[:, :usable].view(bsz, n_windows, m, -1)
        gate = gate[:, :usable].view(bsz, n_windows, m, -1) + self.position_bias
        if self.overlap:
            d = self.dim
            if state.last_kv is None:  # no window before the first: zero values of weight 0
                first_kv, first_gate = kv.new_zeros(bsz, 1, m, 2 * d), gate.new_full((bsz, 1, m, 2 * d), -torch.inf)
            else:
                first_kv, first_gate = state.last_kv.unsqueeze(1), state.last_gate.unsqueeze(1)
            previous_kv, previous_gate = torch.cat((first_kv, kv[:, :-1]), 1), torch.cat((first_gate, gate[:, :-1]), 1)
            state.last_kv, state.last_gate = kv[:, -1], gate[:, -1]
            kv = torch.cat((previous_kv[..., :d], kv[..., d:]), dim=2)  # [B, W, 2m, d]
            gate = torch.cat((previous_gate[..., :d], gate[..., d:]), dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # [B, W, d]
        positions = torch.arange(state.closed, state.closed + n_windows, device=x.device) * m
        cos, sin = rotary(positions)
        pooled = rotate_tail(self.kv_norm(pooled).unsqueeze(2), cos, sin).squeeze(2)
        state.entries = torch.cat((entries, pooled), dim=1)
        return state.entries


class IndexerScorer(nn.Module):
    """I_t,w = Σ_h w_t,h · ReLU(q_t,h · K_w) / √c with w_t = W_w x_t / √n (float32)."""

    def __init__(self, hidden: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.weights_proj = nn.Linear(hidden, n_heads, bias=False)

    def forward(self, q: Tensor, keys: Tensor, x: Tensor) -> Tensor:
        """q [B, S, n, c], keys [B, W, c], x [B, S, H] → [B, S, W]."""
        scores = torch.einsum("bshc,bwc->bshw", q.float(), keys.float()).relu() * self.head_dim**-0.5
        weights = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, S, n]
        return (scores * weights.unsqueeze(-1)).sum(dim=2)


class Indexer(Compressor):
    """CSA's lightning indexer: its own overlapping compressor of width index_head_dim, and the queries and
    scores that pick each token's index_topk entries."""

    def __init__(self, config: DeepSeekConfig, ratio: int) -> None:
        super().__init__(config.hidden_size, config.index_head_dim, ratio, True, config.rms_norm_eps)
        self.n_heads, self.top_k = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * self.dim, bias=False)
        self.scorer = IndexerScorer(config.hidden_size, self.n_heads, self.dim)

    def select(
        self, x: Tensor, q_compressed: Tensor, positions: Tensor, state: CompressorState, rotary: V4Rotary
    ) -> Tensor:
        """[B, S, W] bool: the visible entries among each token's index_topk best (x [B, S, H], c^Q [B, S, r])."""
        keys = self(x, state, rotary)  # [B, W, c]
        cos, sin = rotary(positions)
        q = rotate_tail(self.q_b_proj(q_compressed).unflatten(-1, (self.n_heads, self.dim)), cos, sin)
        visible = visible_entries(positions, keys.shape[1], self.ratio)  # [S, W]
        scores = self.scorer(q, keys, x).masked_fill(~visible, -torch.inf)
        # ties (entries every head scores 0 after the ReLU) go to the earlier entry, so that a cached step picks
        # what the full forward picks (topk's choice among ties depends on the number of entries)
        top = scores.argsort(dim=-1, descending=True, stable=True)[..., : self.top_k]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & visible


def visible_entries(positions: Tensor, n_entries: int, ratio: int) -> Tensor:
    """[S, W] bool: entry w (tokens [w·m, (w + 1)·m)) is visible to the token at position t when w < (t + 1) // m."""
    return torch.arange(n_entries, device=positions.device) < ((positions + 1) // ratio)[:, None]


class SharedKVAttention(KeepsFloat32):
    """V4's attention of one layer (see the module docstring): sliding window, plus CSA or HCA entries. The sinks
    stay float32 (`KeepsFloat32`)."""

    float32_parameters = ("sinks",)

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        mtp = layer_idx >= config.num_hidden_layers  # an MTP module's block: a sliding-window layer
        self.layer_type = "sliding_attention" if mtp else config.layer_types[layer_idx]
        self.n_heads, self.head_dim, self.window = config.num_attention_heads, config.head_dim, config.sliding_window
        self.o_groups, self.eps = config.o_groups, config.rms_norm_eps
        hidden, d, n = config.hidden_size, config.head_dim, config.num_attention_heads
        self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, n * d, bias=False)
        self.kv_proj = nn.Linear(hidden, d, bias=False)
        self.kv_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_a_proj = nn.Linear(n * d // self.o_groups, self.o_groups * config.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(self.o_groups * config.o_lora_rank, hidden, bias=False)
        self.sinks = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        sliding = self.layer_type == "sliding_attention"
        yarn = None if sliding else YaRN.from_config(config)
        base = config.rope_theta if sliding else config.compress_rope_theta
        self.rotary = V4Rotary(config.qk_rope_head_dim, base, yarn)
        self.compressor: Compressor | None = None
        if not sliding:
            ratio = config.compress_rates[self.layer_type]
            csa = self.layer_type == "compressed_sparse_attention"
            self.compressor = Compressor(hidden, d, ratio, csa, config.rms_norm_eps)
            if csa:
                self.compressor.indexer = Indexer(config, ratio)

    def reset_parameters(self) -> None:
        """Sinks 0 (transformers' init)."""
        nn.init.zeros_(self.sinks)

    def _states(self, cache: KVCache | None) -> tuple[CompressorState, CompressorState]:
        """The compressor's and the indexer's states: the cache's (created on first use), or fresh ones."""
        if cache is None:
            return CompressorState(), CompressorState()
        states = cache.states.setdefault(self.layer_idx, {})
        return states.setdefault("compressor", CompressorState()), states.setdefault("indexer", CompressorState())

    def forward(
        self, x: Tensor, positions: Tensor, cache: KVCache | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """x [B, S, H]; positions [S], absolute positions of x's tokens, which follow the cached ones."""
        if key_mask is not None or positions.dim() != 1:
            raise ValueError("DeepSeek-V4 attention does not take padding: give an attention_mask of ones or none")
        bsz, seqlen, _ = x.shape
        cos, sin = self.rotary(positions)
        q_compressed = self.q_a_norm(self.q_a_proj(x))  # c^Q [B, S, r]
        q = self.q_b_proj(q_compressed).unflatten(-1, (self.n_heads, self.head_dim))
        q = rotate_tail(unit_rms(q, self.eps).to(q.dtype), cos, sin)  # [B, S, n, d]
        kv = rotate_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(2), cos, sin).squeeze(2)  # [B, S, d]
        end = positions[-1] + 1
        if cache is not None:  # the window's K = V in `states`; the cache's own slots only count the tokens
            cache.update(self.layer_idx, kv[..., :0])
            state = cache.states.setdefault(self.layer_idx, {})
            if "window" in state:
                kv = torch.cat((state["window"], kv), dim=1)
            state["window"] = kv[:, max(0, kv.shape[1] - self.window + 1) :]  # what the next token still sees
        key_positions = torch.arange(kv.shape[1], device=x.device) + (end - kv.shape[1])
        distance = positions[:, None] - key_positions  # [S, T]
        mask = ((distance >= 0) & (distance < self.window)).expand(bsz, -1, -1)  # [B, S, T]
        keys = kv
        if self.compressor is not None:
            compressor_state, indexer_state = self._states(cache)
            entries = self.compressor(x, compressor_state, self.rotary)  # [B, W, d]
            visible = visible_entries(positions, entries.shape[1], self.compressor.ratio).expand(bsz, -1, -1)
            indexer: Indexer | None = getattr(self.compressor, "indexer", None)
            if indexer is not None:
                visible = visible & indexer.select(x, q_compressed, positions, indexer_state, self.rotary)
            keys, mask = torch.cat((kv, entries), dim=1), torch.cat((mask, visible), dim=2)
        scores = torch.einsum("bshd,btd->bhst", q, keys) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask.unsqueeze(1), -torch.inf)
        sinks = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(bsz, -1, seqlen, 1)
        probs = torch.cat((scores, sinks), dim=-1).softmax(dim=-1)[..., :-1]
        out = rotate_tail(torch.einsum("bhst,btd->bshd", probs, keys), cos, -sin)  # [B, S, n, d]
        groups = out.reshape(bsz, seqlen, self.o_groups, -1)  # [B, S, g, n·d/g]
        w_a = self.o_a_proj.weight.view(self.o_groups, -1, groups.shape[-1])  # [g, d_g, n·d/g]
        return self.o_b_proj(torch.einsum("bsgi,gri->bsgr", groups, w_a).flatten(2))
