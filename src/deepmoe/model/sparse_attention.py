"""DeepSeek Sparse Attention (DSA; the V3.2 report's "DeepSeek Sparse Attention", docs/design.md#m7-deepseek-sparse-
attention): a lightning indexer picks, for each query token t, the k = `index_topk` earlier tokens whose latents
MLA attends to; all others are masked out.

The indexer has H^I = `index_n_heads` query heads of width D = `index_head_dim` and one shared key head:

    q^I_{t,j} = W^{IQ}_j c^Q_t          c^Q_t = RMSNorm(W^{DQ} h_t), MLA's compressed query (`wq_b`)
    k^I_s = LayerNorm(W^{IK} h_s)                                         (`wk`, `k_norm`: weight + bias, ε = 1e-6)
    w_{t,j} = (W^w h_t)_j                                                 (`weights_proj`, float32)
    I_{t,s} = Σ_j w_{t,j} · (H^I)^-½ · ReLU(q^I_{t,j} · k^I_s · D^-½)   for s <= t

RoPE rotates the first qk_rope_head_dim dims of q^I and k^I with the half-split (rotate_half, non-interleaved)
pairing (x_i, x_{i+d/2}), unlike MLA's own interleaved pairs (x_{2i}, x_{2i+1}): DeepSeek's released indexer
does so, and a model run with the other pairing selects worse at long context without any error. Token t then
attends (MLA, either form) only over the k keys with the largest I_{t,s} (all of them when t < k).

Parameter names are those of DeepSeek-V3.2's checkpoints and transformers' DeepseekV32Indexer
(`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`). DeepSeek's kernels also rotate q^I and k^I by a
Hadamard transform and score in FP8; the transform is orthogonal (q·k unchanged) and FP8 only rounds, so both
are left out here, as transformers leaves them out. The indexer only selects: top-k has no gradient, so the
language-model loss does not train its weights.

Training (the V3.2 report's continued pre-training; docs/design.md#m7-deepseek-sparse-attention): in train mode
MLA also returns the indexer's loss, KL(p_t ‖ softmax(I_t)) averaged over the query tokens, with p_t the main
attention's distribution summed over heads and L1-normalised (`attention_distribution`, no gradient) and the
indexer's input detached from the main model (`indexer_kl`). In the dense warm-up the attention stays dense and
the KL runs over every causal key; in sparse training it runs over the selected keys S_t only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import DeepSeekConfig
from deepmoe.model.rope import apply_rotary


class Float32Linear(nn.Linear):
    """nn.Linear (no bias) whose weight stays float32 when the model is cast (`.to(torch.bfloat16)`, `.half()`, a
    parent's cast; loading a bf16 tensor with `assign=True`), as V3.2 keeps the indexer's head weights; the input
    is cast to float32 and the output is float32."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Float32Linear:
        before = self.weight.detach()  # the old tensor: a cast replaces the parameter's data
        super()._apply(fn, recurse)
        self._keep_float32(before)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_float32(None)

    @torch.no_grad()
    def _keep_float32(self, before: Tensor | None) -> None:
        after = self.weight
        if after.dtype != torch.float32 and after.dtype.is_floating_point:
            source = before if before is not None and before.dtype == torch.float32 else after.detach()
            self.weight.data = source.to(device=after.device, dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def rotate_half_split(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first 2·cos.shape[-1] dims of x [B, S, n, D] with the half-split pairing (x_i, x_{i+d/2});
    the other dims pass unchanged. cos, sin: [S, d/2], or per row [B·S, d/2]."""
    d = 2 * cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    if cos.shape[0] == x.shape[1]:
        rot = apply_rotary(rot, cos, sin, interleaved=False)
    else:
        rot = apply_rotary(rot.reshape(1, -1, *rot.shape[2:]), cos, sin, interleaved=False).view(rot.shape)
    return torch.cat((rot, rest), dim=-1)


def allowed_keys(
    bsz: int, seqlen: int, total: int, offset: int, key_mask: Tensor | None, device: torch.device
) -> Tensor:
    """[B, S, T] bool: the keys token i (at index offset + i of the T) may see, causally; key_mask [B, T] False at
    padding hides those keys, except a token's own (as `causal_attention` does)."""
    last = torch.arange(seqlen, device=device)[:, None] + offset  # [S, 1]
    key_index = torch.arange(total, device=device)
    allowed = (key_index <= last).expand(bsz, seqlen, total)
    if key_mask is not None:
        allowed = allowed & (key_mask.bool()[:, None, :] | (key_index == last))
    return allowed


class LightningIndexer(nn.Module):
    """DSA's lightning indexer: I_{t,s} (module docstring) and the top-k keys of each query token."""

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.index_topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Float32Linear(config.hidden_size, self.n_heads, bias=False)

    def keys(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """k^I = RoPE(LayerNorm(W^{IK} x)): x [B, S, H] → [B, S, D] (what the cache holds beside the latent)."""
        return rotate_half_split(self.k_norm(self.wk(x)).unsqueeze(2), cos, sin).squeeze(2)

    max_logits: int = 2**27
    """The most per-head logits [B, S', H^I, T] (float32) one chunk of query tokens builds (512 MiB): a long
    prompt is scored S' tokens at a time."""

    def scores(self, x: Tensor, q_compressed: Tensor, keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """I [B, S, T] float32 (no mask) of x [B, S, H] against keys [B, T, D]; q_compressed = c^Q [B, S, d_cq]."""
        bsz, seqlen, _ = x.shape
        q = rotate_half_split(self.wq_b(q_compressed).view(bsz, seqlen, self.n_heads, self.head_dim), cos, sin)
        q, keys = q.float(), keys.float()
        w = self.weights_proj(x) * self.n_heads**-0.5  # [B, S, H^I], float32
        rows = max(1, self.max_logits // (bsz * self.n_heads * keys.shape[1]))
        chunks = []
        for i in range(0, seqlen, rows):
            logits = torch.einsum("bsjd,btd->bsjt", q[:, i : i + rows], keys) * self.head_dim**-0.5  # [B, S', H^I, T]
            chunks.append(torch.einsum("bsj,bsjt->bst", w[:, i : i + rows], logits.relu()))
        return torch.cat(chunks, dim=1)

    def select(self, scores: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """The top-min(k, T) keys of each token among the `allowed` ones [B, S, T] by `scores` [B, S, T] (no
        gradient): (indices [B, S, k] into the T keys, valid [B, S, k] bool: False for picks outside `allowed`,
        which fill the k slots when fewer are allowed)."""
        index = scores.detach().masked_fill(~allowed, float("-inf"))
        indices = index.topk(min(self.index_topk, index.shape[-1]), dim=-1).indices  # [B, S, k]
        return indices, allowed.gather(-1, indices)

    def forward(
        self, x: Tensor, q_compressed: Tensor, keys: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`select` on the scores of x [B, S, H] against keys [B, T, D]: (indices, valid) [B, S, k]."""
        return self.select(self.scores(x, q_compressed, keys, cos, sin), allowed)


def selection_mask(indices: Tensor, valid: Tensor, total: int) -> Tensor:
    """[B, S, T] bool, True at the selected (and valid) keys."""
    mask = valid.new_zeros(*indices.shape[:-1], total)
    return mask.scatter(-1, indices, valid)


def sparse_latent_attention(q: Tensor, latent: Tensor, indices: Tensor, valid: Tensor, scale: float) -> Tensor:
    """The absorbed MLA over each token's selected latents only: Σ_{s selected} softmax(q·[c_KV; k^R]_s · scale)
    [c_KV; k^R]_s, the work per token growing with k, not with the context.

    q: [B, S, n, d_c + d_r] (W_UKᵀ q^C and q^R per head); latent: [B, T, d_c + d_r]; indices, valid: [B, S, k]
    → [B, S, n, d_c + d_r] (the caller keeps the first d_c columns, Σ p·c_KV)."""
    bsz, seqlen, n_heads, width = q.shape
    k = indices.shape[-1]
    # row by row: index_select of whole rows is several times faster than a gather over every column
    picked = torch.stack([latent[b].index_select(0, indices[b].reshape(-1)) for b in range(bsz)])  # [B, S·k, d]
    picked = picked.view(bsz * seqlen, 1, k, width)  # one key/value head per token, its k selected latents
    mask = valid.reshape(bsz * seqlen, 1, 1, k)
    out = F.scaled_dot_product_attention(q.reshape(bsz * seqlen, 1, n_heads, width), picked, picked, mask, scale=scale)
    return out.view(bsz, seqlen, n_heads, width)


def attention_distribution(q: Tensor, k: Tensor, scale: float, mask: Tensor, max_logits: int = 2**27) -> Tensor:
    """p_t of the indexer's loss: the attention probabilities softmax(q·kᵀ · scale) over the keys in `mask`, summed
    over the heads and L1-normalised (the mean over heads), float32 and without gradient.

    q: [B, S, n, d]; k: [B, T, n, d]; mask [B, S, T] bool (causal and padding, or DSA's selection; every row has a
    key) → [B, S, T], 0 outside `mask`. Computed S' query tokens at a time (at most `max_logits` logits)."""
    bsz, seqlen, n_heads, _ = q.shape
    rows = max(1, max_logits // (bsz * n_heads * k.shape[1]))
    with torch.no_grad():
        k = k.float()
        chunks = []
        for i in range(0, seqlen, rows):
            logits = torch.einsum("bshd,bthd->bsht", q[:, i : i + rows].float(), k) * scale  # [B, S', n, T]
            logits = logits.masked_fill(~mask[:, i : i + rows, None], float("-inf"))
            chunks.append(logits.softmax(-1).mean(2))
        return torch.cat(chunks, dim=1)


def indexer_kl(target: Tensor, scores: Tensor, support: Tensor) -> Tensor:
    """The indexer's loss: the mean over query tokens of KL(p_t ‖ softmax(I_t)), both over the keys in `support`.

    target p [B, S, T] (rows summing to 1 over `support`, 0 elsewhere: `attention_distribution` under the same
    mask); scores I [B, S, T] (the indexer's, with gradient); support [B, S, T] bool, every row non-empty → scalar
    float32. The KL's gradient reaches only `scores`."""
    log_q = scores.float().masked_fill(~support, -1e30).log_softmax(-1)  # finite: p · log q is 0 off the support
    p = target.detach().float()
    kl = torch.where(support & (p > 0), p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(log_q))
    return kl.sum(-1).mean()
