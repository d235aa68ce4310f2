"""The DeepSeek causal LM: embedding → blocks (attention + dense or MoE FFN) → norm → head,
plus the V3 multi-token-prediction modules (docs/design.md#m2-decoder, docs/design.md#m3-multi-token-prediction).

Parameter names are Hugging Face's (`model.layers.{i}.self_attn...`, `model.layers.{i}.mlp...`,
`lm_head`), so a state dict maps one to one onto an HF checkpoint; the MTP modules live in
`model.mtp.{k}` (the checkpoint's `model.layers.{L + k}`, mapped by `deepmoe.io`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from deepmoe.config import DeepSeekConfig
from deepmoe.model.attention import KVCache, MultiHeadLatentAttention, build_attention
from deepmoe.model.generate import generate
from deepmoe.model.hyper_connections import HyperConnection, HyperHead
from deepmoe.model.norm import RMSNorm
from deepmoe.model.pretrained import load_pretrained, save_pretrained
from deepmoe.model.v4_attention import SharedKVAttention
from deepmoe.moe import MoE, RoutingStats, SwiGLU
from deepmoe.moe.experts import RoutedExperts
from deepmoe.moe.router import Router, RowExpertMask
from deepmoe.parallel import apply_expert_parallel


@dataclass
class CausalLMOutput:
    logits: Tensor
    """[B, S, V] next-token logits."""
    loss: Tensor | None = None
    """lm_loss + aux_loss + mtp_loss (+ indexer_loss_weight · indexer_loss in train mode), when labels are given."""
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    """Sum of the MoE layers' weighted balance losses (0 for a dense model)."""
    mtp_loss: Tensor | None = None
    """λ/D Σ_k L_k of the multi-token-prediction modules, when labels are given."""
    indexer_loss: Tensor | None = None
    """DSA (train mode): the lightning indexers' KL to the main attention, the mean over the MLA layers (MTP blocks
    included) of each one's mean over query tokens; in `loss` times `indexer_loss_weight`. Its gradient reaches the
    indexers only, and the other losses' never do."""
    mtp_logits: list[Tensor] = field(default_factory=list)
    """[B, S − k, V] for depth k = 1..D: position i predicts token i + k + 1."""
    routing_stats: dict[int, RoutingStats] = field(default_factory=dict)
    """Per MoE layer index, that layer's routing statistics."""
    past_key_values: KVCache | None = None
    hidden_states: Tensor | None = None
    """[B, S, H] last block's output before the final norm (h^0 of the MTP modules)."""


@dataclass
class BlockRouting:
    """What a block's MoE layer reports besides its output, which the block has added into x (not returned:
    a view leaving an FSDP2 unit is a hazard FSDP2 warns about)."""

    aux_loss: Tensor
    stats: RoutingStats | None
    """None when the forward was asked for no routing statistics (decoding)."""


class DecoderLayer(nn.Module):
    """x + Attn(RMSNorm(x)), then + FFN(RMSNorm(·)); the FFN is dense SwiGLU or the MoE layer.

    DeepSeek-V4: x is the mHC streams [B, S, n, H], and each residual is a hyper-connection (`attn_hc`, `ffn_hc`)."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        v4 = config.model_type == "deepseek_v4"
        self.self_attn = SharedKVAttention(config, layer_idx) if v4 else build_attention(config, layer_idx)
        self.attn_hc = HyperConnection(config) if v4 else None
        self.ffn_hc = HyperConnection(config) if v4 else None
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config.moe_config(layer_idx))
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        key_mask: Tensor | None = None,
        output_routing_stats: bool = True,
        expert_mask: RowExpertMask | None = None,
        token_ids: Tensor | None = None,
    ):
        """x [B, S, H] → ([B, S, H], the MoE layer's `BlockRouting` or None); key_mask [B, T] bool, False at
        padding keys; expert_mask: the rows' own expert masks for the MoE layer (`Router.row_mask`); token_ids
        [B, S]: what a hash-routed MoE layer (V4) chooses by."""
        if self.attn_hc is not None:
            return self._hyper_forward(x, positions, cache, key_mask, output_routing_stats, expert_mask, token_ids)
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, key_mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            # no host sync per layer (check_finite=False): the model checks its input ids
            moe_out = self.mlp(h, check_finite=False, output_stats=output_routing_stats, expert_mask=expert_mask)
            return x + moe_out.hidden_states, BlockRouting(moe_out.aux_loss, moe_out.stats)
        return x + self.mlp(h), None

    def _hyper_forward(self, streams, positions, cache, key_mask, output_routing_stats, expert_mask, token_ids):
        """DeepSeek-V4's block on the mHC streams [B, S, n, H] (`deepmoe.model.hyper_connections`)."""
        h, post, res = self.attn_hc(streams)
        attn = self.self_attn(self.input_layernorm(h), positions, cache, key_mask)
        streams = self.attn_hc.merge(attn, streams, post, res)
        h, post, res = self.ffn_hc(streams)
        moe_out = self.mlp(self.post_attention_layernorm(h), check_finite=False, output_stats=output_routing_stats,
                           expert_mask=expert_mask, token_ids=token_ids)  # fmt: skip
        streams = self.ffn_hc.merge(moe_out.hidden_states, streams, post, res)
        return streams, BlockRouting(moe_out.aux_loss, moe_out.stats)


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 §2.2):
    h'_i = W_eh [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],  h^k = Block(h'),  logits = Head(RMSNorm(h^k)).

    The concatenation order (embedding first) is the one of DeepSeek's released weights.
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(
        self,
        previous: Tensor,
        next_embeddings: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        output_routing_stats: bool = True,
        key_mask: Tensor | None = None,
    ):
        """previous h^{k-1} [B, S, H], next_embeddings Emb(t_{i+k}) [B, S, H] → (h^k, normed h^k, `BlockRouting`
        or None); key_mask [B, T] bool over the cached and new slots, False where masked out."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(previous)], dim=-1))
        x, moe_out = self.block(x, positions, cache, key_mask, output_routing_stats)
        return x, self.norm(x), moe_out


class V4MTPModule(nn.Module):
    """DeepSeek-V4's multi-token prediction depth k, on the mHC streams: with H^{k-1} [B, S, n, H] the previous
    depth's streams (the main model's before its `hc_head`),
    X'_i = W_e RMSNorm(Emb(t_{i+k})) + W_h RMSNorm(H^{k-1}_i) (the embedding term added to every stream),
    H^k = Block(X') (a sliding-window layer, learned routing), logits = Head(RMSNorm(hc_head(H^k))).
    DeepSeek's names: `e_proj`, `h_proj`, `enorm`, `hnorm`, `norm`, `hc_head`; the embedding and head are shared."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.e_proj = nn.Linear(h, h, bias=False)
        self.h_proj = nn.Linear(h, h, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(
        self,
        previous: Tensor,
        next_embeddings: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        output_routing_stats: bool = True,
        key_mask: Tensor | None = None,
    ):
        """previous H^{k-1} [B, S, n, H], next_embeddings Emb(t_{i+k}) [B, S, H] → (H^k, normed collapsed H^k
        [B, S, H], `BlockRouting`)."""
        x = self.e_proj(self.enorm(next_embeddings)).unsqueeze(2) + self.h_proj(self.hnorm(previous))
        x, moe_out = self.block(x, positions, cache, key_mask, output_routing_stats)
        return x, self.norm(self.hc_head(x)), moe_out


class DeepSeekModel(nn.Module):
    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        n = config.num_hidden_layers
        mtp = V4MTPModule if config.model_type == "deepseek_v4" else MTPModule
        self.mtp = nn.ModuleList(mtp(config, n + k) for k in range(config.num_nextn_predict_layers))
        self.hc_head = HyperHead(config) if config.model_type == "deepseek_v4" else None


class DeepSeekForCausalLM(nn.Module):
    """DeepSeekMoE 16B / V2 / V3-style causal LM built from a `DeepSeekConfig`."""

    indexer_loss_weight: float = 1.0
    """The weight of `indexer_loss` (DSA's lightning indexers' KL, train mode) in `loss`."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.model = DeepSeekModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()  # the modules have just initialised themselves (reset_parameters replays that)

    def head(self, x: Tensor) -> Tensor:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer exactly as the constructor does — what a model built on the
        meta device needs once materialised::

            with torch.device("meta"):
                model = DeepSeekForCausalLM(config)
            model.to_empty(device="cuda")
            model.reset_parameters()  # then load_state_dict(...), or train from here

        `to_empty` leaves memory uninitialised, including the buffers no checkpoint holds (RoPE's θ, the
        router's expert masks), so this step is needed even before `load_state_dict`. It replays the
        constructor: each module that owns a parameter or buffer runs its own `reset_parameters` (nn.Linear's
        and nn.Embedding's init, the router's, the routed experts', RoPE's θ), in construction order, then the
        model's scheme (`_init_weights`). Under the same seed and on the same device, the values are the
        constructor's, bit for bit. MTP modules included.
        """
        for module in self.modules():
            owns = next(module.parameters(recurse=False), None) is not None
            owns = owns or next(module.buffers(recurse=False), None) is not None
            if module is not self and owns and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """HF's init: N(0, initializer_range) for every matrix, ones for norms, zeros for the bias b."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def set_absorbed_attention(self, absorb: bool = True) -> None:
        """MLA's absorbed form (W_UK folded into the query, W_UV into the output) for every layer."""
        for module in self.modules():
            if isinstance(module, MultiHeadLatentAttention):
                module.absorb = absorb

    def indexed_attention(self) -> list[MultiHeadLatentAttention]:
        """The MLA modules with a lightning indexer (DSA), MTP blocks included; empty without one."""
        blocks = [*self.model.layers, *(m.block for m in self.model.mtp)]
        return [b.self_attn for b in blocks if getattr(b.self_attn, "indexer", None) is not None]

    def indexer_parameters(self) -> list[nn.Parameter]:
        """The lightning indexers' parameters (what DSA's dense warm-up trains)."""
        return [p for attn in self.indexed_attention() for p in attn.indexer.parameters()]

    def set_indexer_warmup(self, warmup: bool = True) -> None:
        """DSA's dense warm-up (True): every MLA layer with an indexer attends densely, and in train mode its KL
        runs over all causal keys; False: attention over the indexer's top-k (the default). Which parameters train
        is the caller's (the trainer freezes all but `indexer_parameters()` during the warm-up)."""
        for attn in self.indexed_attention():
            attn.indexer_warmup = warmup

    def moe_layers(self) -> dict[int, MoE]:
        """Layer index → MoE layer, MTP blocks included (index num_hidden_layers + k)."""
        blocks = [*self.model.layers, *(m.block for m in self.model.mtp)]
        return {b.layer_idx: b.mlp for b in blocks if isinstance(b.mlp, MoE)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training updates: all of them, except in a PESC model (`MoEConfig.expert_adapter_rank`),
        which trains its adapter experts and routers only; the dense FFNs, attention, embeddings, norms and head
        stay frozen (docs/design.md#pesc-adapter-experts)."""
        if self.config.moe is None or self.config.moe.expert_adapter_rank is None:
            return list(self.parameters())
        layers = self.moe_layers().values()
        return [p for layer in layers for module in (layer.gate, layer.experts) for p in module.parameters()]

    def enable_expert_parallel(self, mesh: DeviceMesh | dist.ProcessGroup | None = None) -> None:
        """Shard every MoE layer's routed experts over the ranks of `mesh` (a 1-D DeviceMesh, a process group,
        None: every rank): `deepmoe.parallel.apply_expert_parallel(model, mesh)`, which this calls. Load or
        build the full model on every rank first, then call this; for training, `deepmoe.parallel.parallelize`
        does it with FSDP2 around it."""
        apply_expert_parallel(self, mesh)

    def _check_input(self, input_ids: Tensor, past_length: int) -> None:
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer (LongTensor) tensor of token ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: give at least one token")
        if input_ids.is_meta:
            raise ValueError("input_ids is on the meta device and holds no values: give the token ids on a real device")
        weight = self.model.embed_tokens.weight
        if weight.is_meta:
            raise ValueError(
                "the model's weights are on the meta device: materialise them first (model.to_empty(device=...) then "
                "model.reset_parameters(), or load a checkpoint with from_pretrained)"
            )
        total = past_length + input_ids.shape[1]
        if total > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {total} tokens is longer than max_position_embeddings={cfg.max_position_embeddings}"
            )
        if torch.compiler.is_compiling():  # the value checks read the ids on the host: eager mode only
            return
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one device→host sync per call, not per layer
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")

    @staticmethod
    def _check_labels(labels: Tensor, input_ids: Tensor, vocab_size: int) -> None:
        """labels: an integer tensor of input_ids' shape and device, each id in [0, vocab_size) or −100 (ignored)."""
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
            what = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an integer (LongTensor) tensor of token ids (or -100), got {what}")
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)} (they are shifted inside), "
                f"got {tuple(labels.shape)}"
            )
        if labels.device != input_ids.device:
            raise ValueError(f"labels are on {labels.device}, input_ids on {input_ids.device}: put them on one device")
        if torch.compiler.is_compiling():  # a host read: eager mode only, as the token ids' check
            return
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        if bad.any():
            value = int(labels[bad][0])
            raise ValueError(
                f"label {value} is outside the vocabulary [0, {vocab_size}): labels are token ids, or -100 for a "
                f"position the loss ignores"
            )

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_mtp: bool | None = None,
        attention_mask: Tensor | None = None,
        output_routing_stats: bool = True,
        expert_masks: dict[int, RowExpertMask] | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, S] → logits [B, S, V]; `labels` [B, S] (−100 = ignore) are shifted inside, as in HF.

        The MTP modules run when `output_mtp` is set, by default when labels are given (training);
        never with a cache.

        In eager mode the token ids, labels (and `attention_mask`) are checked here, once per call (their values
        are read on the host); the layers below do not sync (but for the experts' per-expert loop where no grouped
        kernel exists; debug checks: `deepmoe.runtime.set_debug_checks`). Under torch.compile those value checks
        are left out: validate the ids before calling.

        `attention_mask` [B, past + S] of 0/1 over the cached and new tokens (as in HF) marks padding: padded keys
        are masked out of attention and positions count real tokens only (a left-padded row's first token is at
        position 0). What the padding positions themselves output is meaningless.

        `output_routing_stats=False` (what decoding passes) skips the per-layer routing statistics and, in eval
        mode, the balance losses: `routing_stats` stays empty and `aux_loss` is 0.

        `expert_masks` {MoE layer index: `RowExpertMask`} (from that layer's `gate.row_mask`): each row's own
        disabled/forced experts in that layer, on top of the global masks (per-request steering when serving).
        """
        cfg = self.config
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        start = cache.get_seq_length() if cache is not None else 0
        self._check_input(input_ids, start)
        if labels is not None:
            self._check_labels(labels, input_ids, cfg.vocab_size)
        seq = input_ids.shape[1]
        positions = torch.arange(start, start + seq, device=input_ids.device)
        key_mask = None
        if attention_mask is not None:
            key_mask = self._key_mask(attention_mask, input_ids.shape[0], start + seq)
            if key_mask is not None:
                positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B, S]

        embeddings = self.model.embed_tokens(input_ids)
        x = embeddings
        if self.model.hc_head is not None:  # V4: n copies of the embedding as the mHC streams [B, S, n, H]
            x = embeddings.unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()
        stats: dict[int, RoutingStats] = {}
        aux = embeddings.new_zeros((), dtype=torch.float32)
        masks = expert_masks or {}
        if masks and not set(masks) <= {i for i, b in enumerate(self.model.layers) if isinstance(b.mlp, MoE)}:
            moe = sorted(i for i in self.moe_layers() if i < cfg.num_hidden_layers)
            raise ValueError(f"expert_masks names layers {sorted(masks)}; the MoE layers are {moe}")
        for layer in self.model.layers:
            mask = masks.get(layer.layer_idx)
            x, moe_out = layer(x, positions, cache, key_mask, output_routing_stats, mask, input_ids)
            if moe_out is not None:
                if moe_out.stats is not None:
                    stats[layer.layer_idx] = moe_out.stats
                aux = aux + moe_out.aux_loss
        streams = x  # V4: the mHC streams, what its MTP modules read
        if self.model.hc_head is not None:
            x = self.model.hc_head(x)
        logits = self.head(self.model.norm(x))
        out = CausalLMOutput(logits=logits, aux_loss=aux, routing_stats=stats, past_key_values=cache, hidden_states=x)

        if output_mtp is None:
            output_mtp = labels is not None
        if self.model.mtp and output_mtp and cache is None:
            if key_mask is not None:
                raise ValueError("the MTP modules do not take padding: give an attention_mask of ones or none")
            self._multi_token_prediction(streams, embeddings, out, output_routing_stats)
        kl = []  # a plain loop: dynamo cannot trace a walrus inside a comprehension ("uninitialized cell")
        for attention in self.indexed_attention():
            loss = attention.take_indexer_loss()
            if loss is not None:
                kl.append(loss)
        if kl:
            out.indexer_loss = torch.stack(kl).mean()
        if labels is not None:
            out.lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
            out.loss = out.lm_loss + out.aux_loss
            if out.indexer_loss is not None:
                out.loss = out.loss + self.indexer_loss_weight * out.indexer_loss
            if out.mtp_logits:
                depth_losses = [
                    F.cross_entropy(
                        lg[:, : seq - k - 1].flatten(0, 1).float(), labels[:, k + 1 :].flatten(), ignore_index=-100
                    )
                    for k, lg in enumerate(out.mtp_logits, start=1)
                    if seq - k - 1 > 0
                ]
                if depth_losses:
                    out.mtp_loss = cfg.mtp_loss_weight / len(out.mtp_logits) * sum(depth_losses)
                    out.loss = out.loss + out.mtp_loss
        return out

    def _key_mask(self, attention_mask: Tensor, batch: int, length: int) -> Tensor | None:
        """attention_mask [B, past + S] of 0/1 → bool [B, past + S], or None when nothing is padding."""
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, length):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a tensor [batch, past + seq] = [{batch}, {length}], got {shape}")
        key_mask = attention_mask.to(self.model.embed_tokens.weight.device) == 1
        if torch.compiler.is_compiling():  # no host reads in compiled code: the mask is always applied
            return key_mask
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        return None if key_mask.all() else key_mask

    def _multi_token_prediction(
        self, hidden: Tensor, embeddings: Tensor, out: CausalLMOutput, output_routing_stats: bool = True
    ) -> None:
        """Depth k uses h^{k-1}_{0..S-k-1} and Emb(t_{k..S-1}); fills out.mtp_logits, stats and aux loss."""
        seq = hidden.shape[1]
        previous = hidden
        for k, module in enumerate(self.model.mtp, start=1):
            if seq - k < 1:
                break
            positions = torch.arange(seq - k, device=hidden.device)
            previous, normed, moe_out = module(
                previous[:, : seq - k], embeddings[:, k:], positions, None, output_routing_stats
            )
            out.mtp_logits.append(self.head(normed))
            if moe_out is not None:
                if moe_out.stats is not None:
                    out.routing_stats[module.block.layer_idx] = moe_out.stats
                out.aux_loss = out.aux_loss + moe_out.aux_loss

    # ---- Hugging Face-style entry points (the work is done in deepmoe.model.pretrained and .generate) ----
    @classmethod
    def from_pretrained(
        cls, path, dtype: torch.dtype | None = None, device=None, delta=None, mmap: bool = False, adapter=None
    ) -> DeepSeekForCausalLM:
        """Load a HF-format checkpoint directory (config.json + safetensors), a training step's directory or
        a run directory (its newest complete step), optionally with an ESFT delta applied on top. `mmap=True`:
        weights memory-mapped from the files, for inference on a checkpoint larger than memory
        (`deepmoe.model.pretrained.load_pretrained`). `adapter`: a LoRA adapter directory (PEFT format) added on top
        (`deepmoe.model.lora.load_adapter`)."""
        return load_pretrained(cls, path, dtype=dtype, device=device, delta=delta, mmap=mmap, adapter=adapter)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB"):
        """Write config.json + safetensors with HF's names for this model_type, atomically."""
        return save_pretrained(self, path, max_shard_size=max_shard_size)

    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs) -> Tensor:
        """The prompt followed by the new tokens [B, S + n]; see `deepmoe.model.generate.generate`."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    @torch.no_grad()
    def update_expert_bias(self, stats: dict[int, RoutingStats], process_group=None) -> None:
        """Aux-loss-free balancing step (R4) for every MoE layer with a selection bias. `process_group`: the
        data-parallel ranks whose loads are summed first (see `MoE.update_bias`); None: `stats` as they are.

        `stats` maps a layer index to its `RoutingStats` (the output's `routing_stats`) or directly to the
        layer's load [N_r] (a tensor or a list of token counts)."""
        if not isinstance(stats, dict):
            raise TypeError(
                f"update_expert_bias takes a dict of layer index -> RoutingStats (the output's routing_stats), "
                f"got {type(stats).__name__}"
            )
        for idx, layer in self.moe_layers().items():
            if layer.config.use_expert_bias and idx in stats:
                entry = stats[idx]
                load = entry.tokens_per_expert if isinstance(entry, RoutingStats) else entry
                layer.update_bias(load, process_group=process_group)
