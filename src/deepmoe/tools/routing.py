"""Routing statistics of a model over token batches: what analysis, steering and ESFT read.

One pass of the model with a forward hook on every MoE layer; the router's own outputs
(`MoEOutput.routing`) are accumulated, nothing is re-computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from deepmoe.data import bundled_corpus, read_text_path, split_documents
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.moe.layer import MoEOutput


@dataclass
class LayerRouting:
    """Sums over every token routed through one MoE layer (N = routed experts)."""

    tokens: int
    counts: Tensor
    """[N] int64, tokens that chose each expert."""
    gate_sum: Tensor
    """[N] float64, Σ_t g_i,t: the gate weights of the chosen experts (0 elsewhere)."""
    score_sum: Tensor
    """[N] float64, Σ_t s_i,t: the affinities, chosen or not."""
    coactivation: Tensor
    """[N, N] int64, tokens that chose both i and j (the diagonal is `counts`)."""
    token_expert: Tensor | None
    """[V, N] int64, how often token id v chose expert i (with `vocab=True`)."""

    @property
    def selection_ratio(self) -> Tensor:
        """[N] share of tokens that chose each expert (ESFT's token selection ratio · K)."""
        return self.counts.double() / max(self.tokens, 1)

    @property
    def average_gate(self) -> Tensor:
        """[N] mean gate weight per token (ESFT's average gate score)."""
        return self.gate_sum / max(self.tokens, 1)

    @property
    def distribution(self) -> Tensor:
        """[N] the layer's expert usage as a probability distribution."""
        return self.counts.double() / self.counts.sum().clamp_min(1)


@torch.no_grad()
def collect_routing(
    model: DeepSeekForCausalLM, batches: Iterable[Tensor], vocab: bool = False, include_mtp: bool = False
) -> dict[int, LayerRouting]:
    """Run `batches` ([B, S] token ids each) through `model` and sum each MoE layer's routing."""
    layers = {i: m for i, m in model.moe_layers().items() if include_mtp or i < model.config.num_hidden_layers}
    sums: dict[int, LayerRouting] = {}
    current: list[Tensor] = []

    def hook_for(idx: int):
        def hook(_module, _inputs, output: MoEOutput) -> None:
            routing = output.routing
            n = routing.scores.shape[1]
            chosen = torch.zeros_like(routing.scores, dtype=torch.bool).scatter_(1, routing.topk_idx, True)
            gates = torch.zeros_like(routing.scores).scatter_(1, routing.topk_idx, routing.topk_weight)
            if idx not in sums:
                sums[idx] = LayerRouting(
                    0,
                    torch.zeros(n, dtype=torch.long),
                    torch.zeros(n, dtype=torch.float64),
                    torch.zeros(n, dtype=torch.float64),
                    torch.zeros(n, n, dtype=torch.long),
                    torch.zeros(model.config.vocab_size, n, dtype=torch.long) if vocab else None,
                )
            acc = sums[idx]
            acc.tokens += chosen.shape[0]
            acc.counts += chosen.sum(0).cpu()
            acc.gate_sum += gates.sum(0).double().cpu()
            acc.score_sum += routing.scores.sum(0).double().cpu()
            acc.coactivation += (chosen.T.float() @ chosen.float()).long().cpu()
            if acc.token_expert is not None:
                acc.token_expert.index_add_(0, current[0].reshape(-1).cpu(), chosen.long().cpu())

        return hook

    handles = [layer.register_forward_hook(hook_for(idx)) for idx, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current[:] = [batch]
            model(batch, output_mtp=include_mtp)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums


BUNDLED_PREFIX = "bundled:"


def source_tokens(source: str, tokenizer, eot_id: int | None = None) -> Tensor:
    """[N] token ids of a text source, encoded with the model's tokenizer.

    `source` is a file or folder of text (every document, in file order), or `bundled:DOMAIN`
    (e.g. `bundled:english`, `bundled:code`): the held-out documents of that domain of the
    bundled corpus, which a model trained on the bundled corpus has not seen.
    """
    if source.startswith(BUNDLED_PREFIX):
        domain = source.removeprefix(BUNDLED_PREFIX)
        _, heldout = split_documents(bundled_corpus(), 0.05)
        documents = [d for d in heldout if d.domain == domain]
        if not documents:
            domains = sorted({d.domain for d in heldout})
            raise ValueError(f"no bundled domain {domain!r}: choose one of {', '.join(domains)}")
    else:
        documents = read_text_path(source)
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document.text).ids)
        if eot_id is not None:
            ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def fixed_batches(
    tokens: Tensor, seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None
) -> list[Tensor]:
    """Consecutive [batch_size, seq_len] windows of `tokens` (the last batch may be smaller), at most
    `max_tokens` tokens in all; a stream shorter than one window becomes one shorter sequence."""
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() == 0:
        raise ValueError("the text source holds no tokens")
    if tokens.numel() < seq_len:
        return [tokens[None]]
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    return list(windows.split(batch_size))
