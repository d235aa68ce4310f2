"""Native Sparse Attention (NSA; Yuan et al., 2025, "Native Sparse Attention: Hardware-Aligned and Natively
Trainable Sparse Attention") on MLA's latent cache (docs/design.md#m7b-native-sparse-attention-on-mla).

Every MLA head attends to the same per-token latent e_s = [c_KV; k^R]_s of width d_c + d_r (the absorbed form:
score (W_UKᵀ q^C)·c_KV + q^R·k^R, value c_KV, W_UV after), so all heads form one GQA group of the paper and the
three branches are attentions over three sets of latents:

    compressed (eq. 7):  ẽ_i = φ(e_{i·d : i·d+l} + p), i = 0 .. ⌊(T − l)/d⌋, blocks of l = `nsa_compress_block`
                         tokens at stride d = `nsa_compress_stride`; p [l, d_c + d_r] an intra-block position
                         embedding, φ an MLP (Linear(l·(d_c+d_r) → d_c+d_r), SiLU, Linear). Token t sees ẽ_i once
                         its block is complete, i·d + l − 1 <= t.
    selected (eq. 8–11): p^cmp_t = Σ_heads softmax of the compressed branch; block j of l' = `nsa_select_block`
                         tokens scores p^slc_t[j] = Σ_i p^cmp_t[i] · |block_i ∩ block_j| / d (eq. 10's weights,
                         e.g. 1, 2, 2, 2, 1 for l = 32, d = 16, l' = 64); t attends to the tokens <= t of the
                         top-n = `nsa_select_count` blocks, the initial block and the 2 local blocks always among
                         them.
    sliding window:      the latents of the w = `nsa_window` tokens t − w + 1 .. t.

    o_t = Σ_c g^c_t · Attn_c(q_t, ·)     g_t = sigmoid(W_g x_t) [n_heads, 3] (eq. 5, per head and branch)

The compressed latents attend like ordinary cached latents (and flow into the same W_UV), so decoding reads them
from the KV cache: `KVCache` holds, beside each token's latent, the compressed latent of the block that ends at
that token (zeros at the other tokens), so cropping the cache (speculative decoding) drops exactly the blocks of
the dropped tokens. Selection has no gradient (top-n); φ and p learn through the compressed branch, the gates
through all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.model.sparse_attention import sparse_latent_attention


class LatentCache(Protocol):
    """What NSA reads and writes of `model/attention.py`'s `KVCache` (named here so the import points one way)."""

    layers: Mapping[int, tuple[Tensor, ...]]

    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]: ...


BRANCHES = ("compressed", "selected", "window")


def compressed_count(total: int, block: int, stride: int) -> int:
    """How many complete compression blocks (length `block`, stride `stride`) T = `total` tokens hold."""
    return 0 if total < block else (total - block) // stride + 1


def selection_scores(p_cmp: Tensor, n_blocks: int, block: int, stride: int, select_block: int) -> Tensor:
    """p^slc[j] = Σ_i p^cmp[i] · |compression block i ∩ selection block j| / d (eq. 10's weights): p_cmp [..., C]
    → [..., J]. Block i covers the l/d stride-d pieces i .. i + l/d − 1 and selection block j the l'/d pieces
    from j·l'/d, so each piece sums the blocks over it and each selection block its pieces (O(C), no C × J)."""
    per_block, per_select = block // stride, select_block // stride
    n_compressed = p_cmp.shape[-1]
    pieces = p_cmp.new_zeros(*p_cmp.shape[:-1], n_blocks * per_select)  # >= C + l/d − 1: block i ends by T
    for m in range(per_block):
        pieces[..., m : m + n_compressed] += p_cmp
    return pieces.unflatten(-1, (n_blocks, per_select)).sum(-1)


def _keys_visible(tokens: Tensor, valid: Tensor, last: Tensor, key_mask: Tensor | None) -> Tensor:
    """valid [B, S, k] without padding keys: key_mask [B, T] False at padding, except each token's own (last [S])."""
    if key_mask is None:
        return valid
    real = key_mask.bool().gather(1, tokens.flatten(1)).view_as(tokens)
    return valid & (real | (tokens == last[None, :, None]))


class NativeSparseAttention(nn.Module):
    """NSA's compression MLP φ with its position embedding p, and the gates W_g (module docstring); the attention
    itself runs on the queries and latents of the MLA layer that owns it."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.compress_block = config.nsa_compress_block
        self.compress_stride = config.nsa_compress_stride
        self.select_block = config.nsa_select_block
        self.select_count = config.nsa_select_count
        self.window = config.nsa_window
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.block_position = nn.Embedding(self.compress_block, width)  # p: one row per position in a block
        self.compress_proj = nn.Linear(self.compress_block * width, width, bias=False)
        self.compress_out = nn.Linear(width, width, bias=False)
        self.gate = nn.Linear(config.hidden_size, self.n_heads * len(BRANCHES), bias=False)

    def compress(self, latent: Tensor) -> Tensor:
        """φ over the complete blocks of latent [B, L, d_c + d_r] starting at its first token → [B, C, d_c + d_r]."""
        if latent.shape[1] < self.compress_block:
            return latent.new_zeros(latent.shape[0], 0, latent.shape[-1])
        blocks = latent.unfold(1, self.compress_block, self.compress_stride).transpose(-1, -2)  # [B, C, l, d]
        blocks = blocks + self.block_position.weight
        return self.compress_out(F.silu(self.compress_proj(blocks.flatten(2))))

    def update_cache(self, latent: Tensor, cache: LatentCache | None, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Compress the blocks that the new tokens complete and append both to the cache: latent [B, S, d] of the
        new tokens → (latents [B, T, d], compressed latents [B, C, d]) of all T tokens. cache: a `KVCache` or None
        (then the S tokens are all there is)."""
        size, d = self.compress_block, self.compress_stride
        offset = cache.get_seq_length(layer_idx) if cache is not None else 0
        first = max(0, -(-(offset - size + 1) // d))  # the first block ending at a new token
        context = latent[:, :0]  # no block ends at a new token: nothing to compress
        if compressed_count(offset + latent.shape[1], size, d) > first:  # from block `first` on (first·d <= offset)
            context = latent
            if offset > first * d:  # that block starts among the cached tokens
                context = torch.cat((cache.layers[layer_idx][0][:, first * d : offset], latent), dim=1)
        new = self.compress(context)  # blocks first, first + 1, ...: [B, C_new, d]
        if cache is None:
            return latent, new
        slots = torch.arange(first, first + new.shape[1], device=latent.device) * d + size - 1 - offset
        aligned = latent.new_zeros(latent.shape).index_copy(1, slots, new.to(latent.dtype))  # block i at its end
        latent, aligned = cache.update(layer_idx, latent, aligned)
        return latent, aligned[:, size - 1 :: d]

    def branches(
        self, q: Tensor, latent: Tensor, compressed: Tensor, scale: float, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The three branches' Σ p·c_KV per head, each [B, S, n, d_c], for the last S tokens of the T.

        q: [B, S, n, d_c + d_r] (W_UKᵀ q^C and q^R); latent: [B, T, d_c + d_r]; compressed: [B, C, d_c + d_r];
        key_mask: [B, T] bool, False at padding (a compressed latent is seen only when its block has none)."""
        bsz, seqlen, _, _ = q.shape
        total, n_compressed, d_c = latent.shape[1], compressed.shape[1], self.kv_lora_rank
        last = torch.arange(total - seqlen, total, device=q.device)  # [S], each token's index among the T

        # compressed: softmax over the complete blocks (none yet: output 0, probabilities 0)
        ends = torch.arange(n_compressed, device=q.device) * self.compress_stride + self.compress_block - 1
        seen = (ends[None, :] <= last[:, None]).expand(bsz, seqlen, n_compressed)  # [B, S, C]
        if key_mask is not None and n_compressed:
            real = key_mask.bool()[:, : ends[-1] + 1]
            seen = seen & real.unfold(1, self.compress_block, self.compress_stride).all(-1)[:, None]
        logits = torch.einsum("bshd,bcd->bshc", q, compressed) * scale
        logits = logits.masked_fill(~seen[:, :, None], torch.finfo(logits.dtype).min)
        probs = logits.softmax(-1) * seen[:, :, None]  # [B, S, n, C]
        out_compressed = torch.einsum("bshc,bcd->bshd", probs, compressed[..., :d_c])

        # selected: blocks scored by the compressed branch's probabilities summed over heads
        n_blocks = -(-total // self.select_block)
        p_cmp = probs.detach().sum(2).float()  # [B, S, C], summed over the heads (one GQA group)
        scores = selection_scores(p_cmp, n_blocks, self.compress_block, self.compress_stride, self.select_block)
        block = torch.arange(n_blocks, device=q.device)
        current = (last // self.select_block)[:, None]  # [S, 1]
        causal = block[None, :] * self.select_block <= last[:, None]  # [S, J]
        forced = (block == 0) | (block == current) | (block == current - 1)
        scores = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
        picked = scores.topk(min(self.select_count, n_blocks), dim=-1).indices  # [B, S, n]
        tokens = (picked[..., None] * self.select_block + torch.arange(self.select_block, device=q.device)).flatten(2)
        valid = causal.expand(bsz, -1, -1).gather(-1, picked).repeat_interleave(self.select_block, dim=-1)
        valid = valid & (tokens <= last[None, :, None])
        tokens = tokens.clamp_max(total - 1)
        valid = _keys_visible(tokens, valid, last, key_mask)
        out_selected = sparse_latent_attention(q, latent, tokens, valid, scale)[..., :d_c]

        # sliding window: t − w + 1 .. t
        tokens = (last[:, None] - torch.arange(self.window, device=q.device)).expand(bsz, -1, -1)  # [B, S, w]
        valid = _keys_visible(tokens.clamp_min(0), tokens >= 0, last, key_mask)
        out_window = sparse_latent_attention(q, latent, tokens.clamp_min(0), valid, scale)[..., :d_c]
        return out_compressed, out_selected, out_window

    def forward(
        self,
        x: Tensor,
        q: Tensor,
        latent: Tensor,
        scale: float,
        cache: LatentCache | None = None,
        layer_idx: int = 0,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """o = Σ_c g^c · Attn_c in the latent space: x [B, S, H]; q [B, S, n, d_c + d_r]; latent [B, S, d_c + d_r]
        of the new tokens (cached, with their compressed blocks, when `cache` is a `KVCache`) → [B, S, n, d_c]
        (the caller applies W_UV)."""
        latent, compressed = self.update_cache(latent, cache, layer_idx)
        outputs = self.branches(q, latent, compressed, scale, key_mask)
        gates = torch.sigmoid(self.gate(x)).view(*x.shape[:2], self.n_heads, len(BRANCHES), 1)
        return sum(gates[:, :, :, i] * out for i, out in enumerate(outputs))
