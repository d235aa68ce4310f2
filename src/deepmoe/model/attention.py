"""Attention: multi-head latent attention (MLA, DeepSeek-V2/V3) and multi-head attention (DeepSeekMoE 16B).

Parameter names are those of transformers' DeepseekV3Attention / DeepseekV2Attention and LlamaAttention, so
their state_dicts load into one another. Activations are laid out [B, S, n_heads, d] as in DeepSeek-V3's
inference/model.py; queries, keys and values are [B, S, ...] in the cache too.

Differences from transformers (none changes the output):
- transformers' V3 with rope_interleave de-interleaves the rotated q_pe/k_pe (the pairs (x0, x1), (x2, x3), ...
  come out as [x0', x2', ...; x1', x3', ...]), the same permutation for queries and keys, so q·k is unchanged;
  its cache holds k_pe permuted that way. deepmoe (like DeepSeek's code and transformers' V2) keeps the
  interleaved layout. transformers' V2 ignores rope_interleave and always rotates interleaved pairs.
- transformers' cache holds (c_KV, k_pe) as one-head 4D tensors [B, 1, S, d]; deepmoe's holds them side by side,
  [c_KV; k_pe] as one [B, S, d_c + d_r].
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.model.native_sparse_attention import NativeSparseAttention
from deepmoe.model.norm import RMSNorm
from deepmoe.model.rope import RotaryEmbedding, apply_rotary, softmax_scale
from deepmoe.model.sparse_attention import (
    LightningIndexer,
    allowed_keys,
    attention_distribution,
    indexer_kl,
    selection_mask,
    sparse_latent_attention,
)


class KVCache:
    """Per-layer cached tensors, each [B, S, ...], written in place into buffers along the sequence dimension.

    MLA layers cache one tensor, [c_KV; k_rope] [B, S, kv_lora_rank + qk_rope_head_dim] (the latent and the RoPE
    key side by side, so the absorbed form attends over it without copying), and with DSA's lightning indexer a
    second one, its keys k^I [B, S, index_head_dim]; MHA layers (k, v)
    [B, S, num_key_value_heads, head_dim]. Keys are held after RoPE.

    The buffers are allocated for `max_length` tokens (or what the first update needs) and double when a layer
    outgrows them, so a decoding step writes its token instead of copying the whole cache. Under autograd (a
    new tensor that requires grad) the layer's tensors are concatenated instead, so no saved tensor is
    overwritten.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length
        self._buffers: dict[int, tuple[Tensor, ...]] = {}
        self._lengths: dict[int, int] = {}
        self.states: dict[int, dict[str, Any]] = {}
        """Layer index → per-layer state that is not one slot per token (DeepSeek-V4's compressors, by name)."""

    @property
    def layers(self) -> dict[int, tuple[Tensor, ...]]:
        """Layer index → its cached tensors [B, S, ...] (views of the buffers)."""
        return {i: tuple(b[:, : self._lengths[i]] for b in buffers) for i, buffers in self._buffers.items()}

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Append `new` (each [B, S_new, ...]) to the layer's tensors and return them all ([B, S_total, ...])."""
        buffers, length = self._buffers.get(layer_idx), self._lengths.get(layer_idx, 0)
        end = length + new[0].shape[1]
        if torch.is_grad_enabled() and any(t.requires_grad for t in new):
            if buffers is not None:
                new = tuple(torch.cat((b[:, :length], n), 1) for b, n in zip(buffers, new, strict=True))
            full = new
            self._buffers[layer_idx], self._lengths[layer_idx] = full, end
            return full
        if buffers is None or end > buffers[0].shape[1]:
            capacity = max(end, self.max_length or 0, 2 * buffers[0].shape[1] if buffers is not None else 0)
            grown = tuple(n.new_empty(n.shape[0], capacity, *n.shape[2:]) for n in new)
            if buffers is not None and length:
                for g, b in zip(grown, buffers, strict=True):
                    g[:, :length] = b[:, :length]
            buffers = self._buffers[layer_idx] = grown
        for b, n in zip(buffers, new, strict=True):
            b[:, length:end] = n
        self._lengths[layer_idx] = end
        return tuple(b[:, :end] for b in buffers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for the layer (0 when it holds nothing)."""
        return self._lengths.get(layer_idx, 0)

    def crop(self, max_length: int) -> None:
        """Keep at most the first `max_length` tokens of every layer (drop rejected speculative tokens)."""
        if self.states and max_length < max(self._lengths.values(), default=0):
            raise ValueError("a cache holding DeepSeek-V4 compressor states cannot be cropped (they pool past tokens)")
        self._lengths = {i: min(n, max_length) for i, n in self._lengths.items()}

    def nbytes_per_token(self) -> int:
        """Bytes held per token of one sequence, summed over all layers."""
        return sum(math.prod(b.shape[2:]) * b.element_size() for buffers in self._buffers.values() for b in buffers)


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    offset: int,
    group: int = 1,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """softmax(q·kᵀ · scale, causal) · v with scaled_dot_product_attention.

    q: [B, S·group, h, d_qk]; k: [B, T, h, d_qk]; v: [B, T, h, d_v] -> [B, S·group, h, d_v]. Query row i is token
    i // group, at index offset + i // group of the T keys (the first `offset` of which are cached), and sees the
    keys at indices <= its own. group > 1 holds `group` query heads that share a key/value head in consecutive rows.
    key_mask [B, T] bool, False at padding: no query sees those keys, except a padding token itself (so that its
    row, whose keys may all be padding, stays finite; what it computes is never seen by real tokens).
    mask [B, S, T] bool: the keys each token sees (DSA's selection), in place of the causal and padding masks.
    """
    rows, keys = q.shape[1], k.shape[1]
    causal = offset == 0 and group == 1 and key_mask is None and mask is None  # the plain causal square: is_causal
    if mask is not None:
        mask = mask.repeat_interleave(group, dim=1).unsqueeze(1)  # [B, 1, S·group, T]
    elif key_mask is not None or (rows > group and not causal):  # tokens after cached ones, grouped rows, padding
        last = torch.arange(rows, device=q.device) // group + offset  # [S·group], index of each row's token
        key_index = torch.arange(keys, device=q.device)
        mask = key_index <= last[:, None]  # [S·group, T]
        if key_mask is not None:
            own = key_index == last[:, None]
            mask = (mask & (key_mask.bool()[:, None, :] | own)).unsqueeze(1)  # [B, 1, S·group, T]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, L, d]
    d_v = v.shape[-1]
    if d_v < q.shape[-1]:  # fused SDPA kernels want one head width: pad v (MLA: d_v < d_nope + d_rope)
        v = F.pad(v, (0, q.shape[-1] - d_v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out[..., :d_v].transpose(1, 2)


def _rope(rotary: RotaryEmbedding, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin for positions [S] (shared by the batch) → [S, d/2], or per row [B, S] → [B·S, d/2]."""
    return rotary(positions.reshape(-1))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """apply_rotary on x [B, S, n, d] with cos, sin [S, d/2] or, for per-row positions, [B·S, d/2]."""
    if cos.shape[0] == x.shape[1]:
        return apply_rotary(x, cos, sin, interleaved)
    return apply_rotary(x.reshape(1, -1, *x.shape[2:]), cos, sin, interleaved).view(x.shape)


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1).

    c_Q = W_DQ h, q = W_UQ RMSNorm(c_Q) (or q = W_Q h without q_lora_rank), split per head into q^C and q^R;
    [c_KV; k^R] = W_DKV h (kv_a_proj_with_mqa), c_KV ← RMSNorm(c_KV); [k^C; v] = [W_UK; W_UV] c_KV (kv_b_proj);
    q^R and the single, head-shared k^R carry RoPE. Only [c_KV; k^R] is cached.

    absorb=False decompresses k^C, v for every cached token. absorb=True attends over the cache directly, as
    one key/value head shared by all query heads: score = (W_UKᵀ q^C)·c_KV + q^R·k^R, output W_UV Σ p·c_KV,
    whenever tokens are cached; a prompt with nothing cached before it (prefill, training) still runs the naive
    form, which computes the same with fewer FLOPs when queries are as many as keys.

    With `config.has_indexer` (DeepSeek-V3.2's DSA, `model/sparse_attention.py`) each token attends only over the
    top-`index_topk` keys of the lightning `indexer`, whose keys k^I are cached beside [c_KV; k^R]: the naive form
    masks the others out, the absorbed form gathers the selected latents (its work per token ∝ k, not the context).
    The indexer reads x and c^Q detached, so the language-model loss never reaches it. In train mode the naive form
    also leaves the indexer's KL loss in `indexer_loss` (`take_indexer_loss`): over the selected keys, or, with
    `indexer_warmup` set, over every causal key while the attention itself stays dense (V3.2's dense warm-up).
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        self.absorb = False
        hidden, d_qk, bias = config.hidden_size, config.head_dim, config.attention_bias

        # The low-rank norms use the default ε = 1e-6 whatever rms_norm_eps says, as DeepSeek and transformers do.
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.n_heads * d_qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, hidden, bias=bias)
        self.rotary = RotaryEmbedding(config)
        self.softmax_scale = softmax_scale(config)
        self.indexer = LightningIndexer(config) if config.has_indexer else None
        self.nsa = NativeSparseAttention(config) if config.has_nsa else None
        """NSA's compression and gates (`model/native_sparse_attention.py`): the layer then always runs the absorbed
        form over its three branches."""
        self.indexer_warmup = False
        """DSA's dense warm-up: attend over every causal key; in train mode the KL still trains the indexer."""
        self.indexer_loss: Tensor | None = None
        """The indexer's KL of the last train-mode forward (scalar float32), until `take_indexer_loss`."""

    def take_indexer_loss(self) -> Tensor | None:
        """The indexer's KL of the last train-mode forward (None when it computed none), forgotten here."""
        loss, self.indexer_loss = self.indexer_loss, None
        return loss

    def forward(
        self, x: Tensor, positions: Tensor, cache: KVCache | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """x: [B, S, H]; positions: [S] (or per row [B, S]) absolute positions of x's tokens, which follow the
        cached ones; key_mask: [B, T] bool over the cached and new tokens, False at padding."""
        bsz, seqlen, _ = x.shape
        self.indexer_loss = None
        if self.q_lora_rank is None:
            q_compressed, q = None, self.q_proj(x)
        else:
            q_compressed = self.q_a_layernorm(self.q_a_proj(x))  # c^Q [B, S, d_cq], also the indexer's input
            q = self.q_b_proj(q_compressed)
        q = q.view(bsz, seqlen, self.n_heads, -1)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)  # [B, S, n, d_n / d_r]
        cos, sin = _rope(self.rotary, positions)
        q_rope = _rotate(q_rope, cos, sin, self.rope_interleave)

        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, S, d_c]
        k_rope = _rotate(k_rope.unsqueeze(2), cos, sin, self.rope_interleave).squeeze(2)  # [B, S, d_r]
        latent = torch.cat((c_kv, k_rope), dim=-1)  # [B, S, d_c + d_r]
        if self.nsa is not None:  # NSA: compressed, selected and window branches over the latents
            w_kv_b = self.kv_b_proj.weight.view(self.n_heads, -1, self.kv_lora_rank)  # [n, d_n + d_v, d_c]
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_kv_b[:, : self.qk_nope_head_dim])  # W_UKᵀ q^C
            q = torch.cat((q_latent, q_rope), dim=-1)  # [B, S, n, d_c + d_r]
            out = self.nsa(x, q, latent, self.softmax_scale, cache, self.layer_idx, key_mask)  # [B, S, n, d_c]
            out = torch.einsum("bshc,hdc->bshd", out, w_kv_b[:, self.qk_nope_head_dim :])  # W_UV: [B, S, n, d_v]
            return self.o_proj(out.flatten(2))
        # the indexer's input is detached: only its own KL loss trains it, and that loss never reaches the model
        index_keys = self.indexer.keys(x.detach(), cos, sin) if self.indexer is not None else None  # k^I [B, S, D]
        if cache is not None and index_keys is not None:
            latent, index_keys = cache.update(self.layer_idx, latent, index_keys)  # [B, T, d_c + d_r], [B, T, D]
        elif cache is not None:
            (latent,) = cache.update(self.layer_idx, latent)  # [B, T, d_c + d_r]
        total = latent.shape[1]
        offset = total - seqlen
        selected = index_scores = allowed = None
        if self.indexer is not None and (self.training or not self.indexer_warmup):
            allowed = allowed_keys(bsz, seqlen, total, offset, key_mask, x.device)  # [B, S, T]
            index_scores = self.indexer.scores(x.detach(), q_compressed.detach(), index_keys, cos, sin)  # I [B, S, T]
            if not self.indexer_warmup:
                selected = self.indexer.select(index_scores, allowed)  # indices, valid: [B, S, k]

        if self.absorb and offset > 0:  # a prompt with nothing cached (prefill) is cheaper in the naive form
            w_kv_b = self.kv_b_proj.weight.view(self.n_heads, -1, self.kv_lora_rank)  # [n, d_n + d_v, d_c]
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_kv_b[:, : self.qk_nope_head_dim])  # W_UKᵀ q^C
            q = torch.cat((q_latent, q_rope), dim=-1)  # [B, S, n, d_c + d_r]
            if selected is not None:  # DSA: attend over each token's k selected latents only
                out = sparse_latent_attention(q, latent, *selected, self.softmax_scale)  # [B, S, n, d_c + d_r]
            else:
                q = q.view(bsz, seqlen * self.n_heads, 1, -1)  # [B, S·n, 1, d_c + d_r]
                # one key/value head: the keys are [c_KV; k^R], the values c_KV (the same tensor: SDPA wants one width)
                kv = latent.unsqueeze(2)  # [B, T, 1, d_c + d_r]
                out = causal_attention(q, kv, kv, self.softmax_scale, offset, self.n_heads, key_mask)
            out = out[..., : self.kv_lora_rank].reshape(bsz, seqlen, self.n_heads, -1)  # Σ p·c_KV per head
            out = torch.einsum("bshc,hdc->bshd", out, w_kv_b[:, self.qk_nope_head_dim :])  # W_UV: [B, S, n, d_v]
        else:
            c_kv, k_rope = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            kv = self.kv_b_proj(c_kv).view(bsz, c_kv.shape[1], self.n_heads, -1)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [B, T, n, d_n / d_v]
            k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1)
            q = torch.cat((q_nope, q_rope), dim=-1)
            mask = selection_mask(*selected, total) if selected is not None else None  # DSA's keys [B, S, T]
            out = causal_attention(q, k, v, self.softmax_scale, offset, key_mask=key_mask, mask=mask)  # [B, S, n, d_v]
            if self.training and index_scores is not None:  # KL over S_t (sparse) or every causal key (warm-up)
                support = allowed if mask is None else mask
                target = attention_distribution(q, k, self.softmax_scale, support)  # p_t [B, S, T], no gradient
                self.indexer_loss = indexer_kl(target, index_scores, support)
        return self.o_proj(out.flatten(2))


class MultiHeadAttention(nn.Module):
    """Multi-head attention with num_key_value_heads key/value heads (GQA when fewer than the query heads).

    Llama's attention, used by DeepSeekMoE 16B (model_type "deepseek", RoPE on the whole head, rotate_half).
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_interleave = config.rope_interleave
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.rotary = RotaryEmbedding(config)
        self.softmax_scale = softmax_scale(config)

    def forward(
        self, x: Tensor, positions: Tensor, cache: KVCache | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """x: [B, S, H]; positions: [S] (or per row [B, S]) absolute positions of x's tokens, which follow the
        cached ones; key_mask: [B, T] bool over the cached and new tokens, False at padding."""
        bsz, seqlen, _ = x.shape
        group = self.n_heads // self.n_kv_heads
        cos, sin = _rope(self.rotary, positions)
        q = _rotate(self.q_proj(x).view(bsz, seqlen, self.n_heads, -1), cos, sin, self.rope_interleave)
        k = _rotate(self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, -1), cos, sin, self.rope_interleave)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, -1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, T, n_kv, d]
        # query head j uses key/value head j // group: put the group's heads in consecutive rows
        q = q.unflatten(2, (self.n_kv_heads, group)).transpose(2, 3).flatten(1, 2)  # [B, S·group, n_kv, d]
        out = causal_attention(q, k, v, self.softmax_scale, k.shape[1] - seqlen, group, key_mask)  # [B, S·g, n_kv, d]
        out = out.unflatten(1, (seqlen, group)).transpose(2, 3)  # [B, S, n_kv, group, d]
        return self.o_proj(out.flatten(2))


def build_attention(config: DeepSeekConfig, layer_idx: int) -> nn.Module:
    """MLA for attention_type "mla", MHA for "mha"."""
    if config.attention_type == "mla":
        return MultiHeadLatentAttention(config, layer_idx)
    return MultiHeadAttention(config, layer_idx)
