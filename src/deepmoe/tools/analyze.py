"""`deepmoe analyze`: how a model routes one or more text sources (docs/design.md#s1-routing-analysis and
#b6-routing-metrics-and-maxvio).

`analyze(model, sources)` runs the model over each source (`collect_routing`) and turns the sums into
a JSON-serialisable report; `write_analysis(report, out_dir)` writes it as `report.json`, CSV tables
and PNG plots (`deepmoe.tools.analyze_files`). `analyze_checkpoint(model_dir, sources)` is the `deepmoe
analyze` command's work: it loads a checkpoint and its tokenizer, reads the text sources and returns the
report. Every number is a pure function of the routing counts; the formulas are below and in the
functions that compute them (`deepmoe.tools.routing_metrics`, each tested against a hand-computed example;
all importable from here).

Notation, per MoE layer: N routed experts, K chosen per token, T tokens, c_i the tokens that chose
expert i (Σ_i c_i = K·T slots), C_ij the tokens that chose both i and j, s a text source.

Per layer (all sources together, and each source alone):
  * tokens per expert c_i; share p_i = c_i / Σ_j c_j (the routing distribution);
    selection ratio r_i = c_i / T (the fraction of tokens that chose i, ≤ 1).
  * MaxVio = (max_i c_i − mean c) / mean c; CV = std(c) / mean(c) (population std) (B6).
  * entropy H = −Σ p_i ln p_i (nats); normalised entropy H / ln N ∈ [0, 1] (1 = uniform);
    effective experts exp(H) ∈ [1, N]. With top-K routing H ≥ ln K (every token spreads over K
    experts), so H / ln N ≥ ln K / ln N (0.5 for 4 of 16).
  * dead experts: c_i = 0. Dominant experts: more than twice the mean load (p_i > 2/N).
  * collapse warning when any of: fewer than N/2 effective experts (exp(H) < N/2, i.e.
    H / ln N < 1 − ln 2 / ln N: 0.75 for N = 16), at least N/4 dead experts, or one expert holding
    more than half of the slots (p_i > 0.5, possible only with K = 1). The reasons are listed.

Hash-routed layers (DeepSeek-V4's first layers, `mlp_layer_types` "hash_moe"; docs/design.md) choose no experts:
a fixed table gives each token id its K experts (`tid2eid`). Their `routing` is "hash" (a learned router's layer:
"learned"), the summary lists them under `hash_layers`, and no collapse warning is raised for them (collapse is a
learned router's failure; a hash layer's load follows the table and the token frequencies): their `collapse` holds a
note instead of reasons. Their loads, shares, co-activation and vocabulary are reported as for any layer.

Between sources (per layer):
  * Jensen–Shannon divergence JS(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q)/2, in bits (base 2),
    so 0 ≤ JS ≤ 1 (0: same usage, 1: disjoint experts), for every pair of sources.
  * specificity of expert i to source s: log2( p̃_s,i / mean_{r≠s} p̃_r,i ), with Laplace-smoothed
    shares p̃_s,i = (c_s,i + 1) / (Σ_j c_s,j + N). +1 = the expert's share in s is twice its mean
    share in the other sources; the `top_k` experts with the largest positive specificity are each
    source's specific experts.

Co-activation (per layer, all sources): P(i) = c_i / T, P(i, j) = C_ij / T and
lift(i, j) = P(i, j) / (P(i) P(j)) = C_ij T / (c_i c_j). Experts picked independently and uniformly
(K of N without replacement) give lift (K − 1) N / (K (N − 1)) for every pair (`independent_lift`),
not 1. The `top_k` pairs by lift (pairs seen at least `min_count` times) and by count are listed.

Vocabulary (per layer, all sources): n_v the occurrences of token v, n_v,i those that chose expert i,
P(i | v) = n_v,i / n_v; lift(v, i) = P(i | v) / r_i (how much more often v picks i than an average
token does). For each expert, the `top_k` tokens by lift among tokens seen at least `min_count`
times (ties: more occurrences first), decoded with the tokenizer when one is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from deepmoe.data import load_tokenizer
from deepmoe.io.checkpoint import checkpoint_dir
from deepmoe.model import from_pretrained
from deepmoe.tools.routing import LayerRouting, collect_routing, fixed_batches, source_tokens
from deepmoe.tools.routing_metrics import (
    DEFINITIONS,
    MIN_COUNT,
    finite,
    independent_lift,
    js_divergence,
    load_metrics,
    shares,
    specificity,
    token_lift,
    top_pairs,
)

# ---- the analysis --------------------------------------------------------------------------------

HASH_NOTE = "hash-routed: the experts are a fixed table of the token id (tid2eid), so no learned routing to collapse"


def _floats(values: Tensor) -> list[float | None]:
    return [finite(v) for v in values.tolist()]


def _decode(tokenizer, token_id: int) -> str | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([token_id])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id: leave the text out
        return None


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def analyze(
    model,
    sources: Mapping[str, Sequence[Tensor]],
    tokenizer=None,
    top_k: int = 5,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """Route each source ([B, S] token-id batches) through `model` and report, per MoE layer, the
    load metrics, the per-source distributions, JS divergences and specific experts, the top
    co-activated pairs and each expert's preferred tokens (definitions: the module docstring).

    The result is JSON-serialisable; layers are keyed by their index as a string.
    """

    if not sources:
        raise ValueError("analyze needs at least one source")
    device = _model_device(model)
    names = list(sources)
    vocab_size = model.config.vocab_size
    per_source: dict[str, dict[int, LayerRouting]] = {}
    token_counts: dict[str, Tensor] = {}
    for name in names:
        batches = [b.to(device) for b in sources[name]]
        if not batches:
            raise ValueError(f"source {name!r} holds no batches")
        ids = torch.cat([b.reshape(-1).cpu() for b in batches])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"source {name!r} holds token ids outside the model's vocabulary of {vocab_size}")
        token_counts[name] = torch.bincount(ids, minlength=vocab_size)
        per_source[name] = collect_routing(model, batches, vocab=True)
    layer_ids = sorted(per_source[names[0]])
    hashed = {i for i, layer in model.moe_layers().items() if layer.gate.config.hash_vocab_size}
    all_token_counts = sum(token_counts.values())

    layers: dict[str, Any] = {}
    for idx in layer_ids:
        routings = [per_source[name][idx] for name in names]
        counts_by_source = torch.stack([r.counts for r in routings])  # [S, N]
        counts = counts_by_source.sum(0)
        tokens = sum(r.tokens for r in routings)
        n = counts.numel()
        k = round(int(counts.sum()) / max(tokens, 1))
        gate_sum = sum(r.gate_sum for r in routings)
        coactivation = sum(r.coactivation for r in routings)
        token_expert = sum(r.token_expert for r in routings)

        layer: dict[str, Any] = {
            "tokens": tokens,
            "experts": n,
            "experts_per_token": k,
            "routing": "hash" if idx in hashed else "learned",
            "tokens_per_expert": counts.tolist(),
            "share": _floats(shares(counts)),
            "selection_ratio": _floats(counts.double() / max(tokens, 1)),
            "average_gate": _floats(gate_sum / max(tokens, 1)),
            **load_metrics(counts),
        }
        if idx in hashed:
            layer["collapse"] = {"warning": False, "reasons": [], "note": HASH_NOTE}

        layer["sources"] = {}
        for name, r in zip(names, routings, strict=True):
            metrics = load_metrics(r.counts)
            layer["sources"][name] = {
                "tokens": r.tokens,
                "tokens_per_expert": r.counts.tolist(),
                "share": _floats(shares(r.counts)),
                "average_gate": _floats(r.average_gate),
                "maxvio": metrics["maxvio"],
                "normalized_entropy": metrics["normalized_entropy"],
                "dead_experts": metrics["dead_experts"],
            }

        pairs = []
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                pairs.append(
                    {"sources": [names[a], names[b]], "js": js_divergence(counts_by_source[a], counts_by_source[b])}
                )
        layer["js_divergence"] = pairs
        layer["max_js"] = max(pairs, key=lambda e: e["js"]) if pairs else None

        layer["specificity"] = {}
        layer["specific_experts"] = {}
        if len(names) > 1:
            spec = specificity(counts_by_source)
            share_by_source = shares(counts_by_source)
            for s, name in enumerate(names):
                layer["specificity"][name] = _floats(spec[s])
                order = sorted(range(n), key=lambda i, s=s: (-float(spec[s, i]), i))
                others = [r for r in range(len(names)) if r != s]
                layer["specific_experts"][name] = [
                    {
                        "expert": i,
                        "specificity": float(spec[s, i]),
                        "share": float(share_by_source[s, i]),
                        "share_others": float(share_by_source[others, i].mean()),
                        "shares": {m: float(share_by_source[r, i]) for r, m in enumerate(names)},
                    }
                    for i in [i for i in order if float(counts_by_source[:, i].sum()) >= min_count][:top_k]
                    if float(spec[s, i]) > 0
                ]

        layer["coactivation"] = {
            "independent_lift": independent_lift(n, k),
            "top_pairs_by_lift": top_pairs(coactivation, tokens, top_k, "lift", min_count),
            "top_pairs_by_count": top_pairs(coactivation, tokens, top_k, "count", min_count),
            "matrix": coactivation.tolist(),
        }

        lift = token_lift(token_expert, all_token_counts, counts, tokens)
        frequent = (all_token_counts >= min_count).numpy()
        occurrences = all_token_counts.numpy()
        vocabulary = []
        for i in range(n):
            column = lift[:, i].numpy()
            ids = np.flatnonzero(frequent & (token_expert[:, i] > 0).numpy())
            # lift descending, then occurrences descending, then token id ascending
            candidates = ids[np.lexsort((ids, -occurrences[ids], -column[ids]))].tolist()
            vocabulary.append(
                [
                    {
                        "token_id": v,
                        "token": _decode(tokenizer, v),
                        "occurrences": int(all_token_counts[v]),
                        "count": int(token_expert[v, i]),
                        "p_expert_given_token": float(token_expert[v, i]) / int(all_token_counts[v]),
                        "lift": float(lift[v, i]),
                    }
                    for v in candidates[:top_k]
                ]
            )
        layer["vocabulary"] = vocabulary
        layers[str(idx)] = layer

    summary = {
        "layers": layer_ids,
        "maxvio": {str(i): layers[str(i)]["maxvio"] for i in layer_ids},
        "normalized_entropy": {str(i): layers[str(i)]["normalized_entropy"] for i in layer_ids},
        "max_js": {str(i): (layers[str(i)]["max_js"] or {}).get("js") for i in layer_ids},
        "collapse_layers": [i for i in layer_ids if layers[str(i)]["collapse"]["warning"]],
        "hash_layers": [i for i in layer_ids if i in hashed],
        "dead_experts": sum(len(layers[str(i)]["dead_experts"]) for i in layer_ids),
    }
    return {
        "sources": {name: {"tokens": int(token_counts[name].sum())} for name in names},
        "top_k": top_k,
        "min_count": min_count,
        "definitions": DEFINITIONS,
        "summary": summary,
        "layers": layers,
    }


def _device_name(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def analyze_checkpoint(
    model_dir: str | os.PathLike,
    sources: Sequence[str],
    *,
    max_tokens: int = 40_000,
    seq_len: int = 256,
    batch_size: int = 8,
    top_k: int = 5,
    device: str = "auto",
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """`deepmoe analyze` as a function: load the checkpoint `model_dir` (a run directory means its newest
    step) and its tokenizer, read each text source (a file or folder, or `bundled:DOMAIN`: the held-out
    documents of a bundled domain) into [batch_size, seq_len] windows, at most `max_tokens` tokens per
    source, and return `analyze`'s report with "model" added (write it with `write_analysis`).
    `device` "auto" is cuda when available. `tokenizer` (a `Tokenizer`, or a tokenizer.json file or its
    directory) replaces the checkpoint's. `mmap=True` loads the model memory-mapped (on the CPU; "auto" then
    means the CPU), for a checkpoint larger than free memory (`from_pretrained(..., mmap=True)`). ValueError
    (one line) when the model or a source is unusable.
    """
    for name, value in (("max_tokens", max_tokens), ("seq_len", seq_len), ("batch_size", batch_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    sources = list(sources)
    if len(set(sources)) != len(sources):
        raise ValueError(f"a source is given twice: {', '.join(sources)}")
    model_dir = checkpoint_dir(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a checkpoint directory")
    tokenizer = load_tokenizer(model_dir, needed_for="analyze (reading the text sources)", tokenizer=tokenizer)
    if mmap:
        model = from_pretrained(model_dir, device="cpu" if device == "auto" else device, mmap=True)
    else:
        model = from_pretrained(model_dir, device=_device_name(device)).eval()
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model only {model.config.vocab_size}"
        )
    eot = model.config.eos_token_id
    batches = {}
    for source in sources:
        if not source.startswith("bundled:") and not Path(source).exists():
            raise ValueError(f"data source {source!r}: no such file or folder (or use bundled:english)")
        tokens = source_tokens(source, tokenizer, eot)
        batches[source] = fixed_batches(tokens, seq_len, batch_size, max_tokens)
    report = analyze(model, batches, tokenizer=tokenizer, top_k=top_k)
    report["model"] = str(model_dir)
    return report


__all__ = [
    "analyze",
    "analyze_checkpoint",
]
