"""`deepmoe analyze`: how a model routes one or more text sources (docs/design.md#s1-routing-analysis and
#b6-routing-metrics-and-maxvio).

`analyze(model, sources)` runs the model over each source (`collect_routing`) and turns the sums into
a JSON-serialisable report; `write_analysis(report, out_dir)` writes it as `report.json`, CSV tables
and PNG plots. `analyze_checkpoint(model_dir, sources)` is the `deepmoe analyze` command's work: it loads
a checkpoint and its tokenizer, reads the text sources and returns the report. Every number is a pure
function of the routing counts; the formulas are below and in the functions that compute them (each is
tested against a hand-computed example).

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

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepmoe.io.checkpoint import checkpoint_dir
from deepmoe.io.files import atomic_write, claim_directory, visible_entries
from deepmoe.moe.balance import coefficient_of_variation, max_violation
from deepmoe.tools.routing import LayerRouting, collect_routing

DOMINANT_FACTOR = 2.0
"""An expert is dominant when its load exceeds DOMINANT_FACTOR × the mean load."""
SPECIFICITY_PSEUDO_COUNT = 1.0
"""Laplace smoothing of the per-source counts in the specificity score."""
MIN_COUNT = 5
"""Pairs (co-activation) and tokens (vocabulary) seen fewer times are not ranked by lift."""

DEFINITIONS = {
    "share": "p_i = c_i / sum_j c_j: expert i's share of the layer's K*T routed slots",
    "selection_ratio": "r_i = c_i / T: fraction of tokens that chose expert i",
    "average_gate": "sum_t g_i,t / T: mean gate weight of expert i per token (0 when not chosen)",
    "maxvio": "(max_i c_i - mean c) / mean c",
    "cv": "std(c) / mean(c), population std",
    "entropy": "H = -sum_i p_i ln p_i (nats)",
    "normalized_entropy": "H / ln N in [0, 1]; at least ln K / ln N under top-K routing",
    "effective_experts": "exp(H) in [1, N]",
    "dead_experts": "experts with c_i = 0",
    "dominant_experts": f"experts with c_i > {DOMINANT_FACTOR:g} * mean c (p_i > {DOMINANT_FACTOR:g}/N)",
    "collapse": "warning when exp(H) < N/2, or >= N/4 dead experts, or one expert with p_i > 0.5",
    "js_divergence": "JS(P,Q) = KL(P||M)/2 + KL(Q||M)/2, M = (P+Q)/2, base 2, in [0, 1]",
    "specificity": "log2(p~_s,i / mean_{r!=s} p~_r,i), p~_s,i = (c_s,i + 1) / (sum_j c_s,j + N)",
    "coactivation_lift": "P(i,j) / (P(i) P(j)) = C_ij T / (c_i c_j); independent uniform top-K: (K-1)N/(K(N-1))",
    "token_lift": "P(i | v) / r_i, P(i | v) = n_v,i / n_v; tokens seen >= min_count times",
}


# ---- scoring formulas (tensors in, floats/tensors out) -----------------------------------------


def shares(counts: Tensor) -> Tensor:
    """[..., N] counts → the distribution over the last dimension (all zero stays zero)."""
    counts = counts.double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)


def entropy(p: Tensor) -> float:
    """H(p) = −Σ p_i ln p_i in nats (0 ln 0 = 0); `p` is normalised first."""
    p = shares(p)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum())


def load_metrics(counts: Tensor) -> dict[str, Any]:
    """B6 numbers of one layer's [N] tokens-per-expert: MaxVio, CV, entropy (nats, normalised,
    effective experts), dead and dominant experts and the collapse warning with its reasons."""
    counts = counts.long()
    n = counts.numel()
    p = shares(counts)
    h = entropy(p)
    mean = counts.double().mean()
    dead = [int(i) for i in torch.nonzero(counts == 0).flatten()]
    dominant = [int(i) for i in torch.nonzero(counts.double() > DOMINANT_FACTOR * mean).flatten()]
    effective = math.exp(h)
    reasons = []
    if effective < n / 2:
        reasons.append(f"only {effective:.2f} effective experts of {n} (< N/2)")
    if n > 1 and len(dead) >= n / 4:
        reasons.append(f"{len(dead)} of {n} experts are dead (>= N/4)")
    if float(p.max()) > 0.5:
        reasons.append(f"expert {int(p.argmax())} holds {float(p.max()):.0%} of the slots (> 50%)")
    return {
        "maxvio": float(max_violation(counts)),
        "cv": float(coefficient_of_variation(counts)),
        "entropy": h,
        "normalized_entropy": h / math.log(n) if n > 1 else 1.0,
        "effective_experts": effective,
        "dead_experts": dead,
        "dominant_experts": dominant,
        "collapse": {"warning": bool(reasons), "reasons": reasons},
    }


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen–Shannon divergence in bits between two distributions (normalised first): in [0, 1]."""
    p, q = shares(p), shares(q)
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        mask = a > 0
        return (a[mask] * torch.log2(a[mask] / m[mask])).sum()

    return float(((kl(p) + kl(q)) / 2).clamp(0.0, 1.0))


def specificity(counts: Tensor, pseudo_count: float = SPECIFICITY_PSEUDO_COUNT) -> Tensor:
    """[S, N] per-source counts → [S, N] log2(p̃_s,i / mean_{r≠s} p̃_r,i), p̃ the shares smoothed by
    `pseudo_count` per expert. Needs at least two sources."""
    s, n = counts.shape
    if s < 2:
        raise ValueError("specificity needs at least two sources")
    smoothed = (counts.double() + pseudo_count) / (counts.double().sum(-1, keepdim=True) + pseudo_count * n)
    others = (smoothed.sum(0, keepdim=True) - smoothed) / (s - 1)
    return torch.log2(smoothed / others)


def coactivation_lift(coactivation: Tensor, tokens: int) -> Tensor:
    """[N, N] lift P(i,j) / (P(i) P(j)) = C_ij T / (c_i c_j), c = the diagonal; NaN where c_i c_j = 0."""
    c = coactivation.diagonal().double()
    expected = torch.outer(c, c)
    lift = coactivation.double() * tokens / expected
    return torch.where(expected > 0, lift, torch.full_like(lift, math.nan))


def independent_lift(n_experts: int, k: int) -> float:
    """The lift of every pair when each token picks K of N experts uniformly at random."""
    if n_experts < 2 or k < 2:
        return 0.0
    return (k - 1) * n_experts / (k * (n_experts - 1))


def token_lift(token_expert: Tensor, token_counts: Tensor, counts: Tensor, tokens: int) -> Tensor:
    """[V, N] lift P(i | v) / r_i with P(i | v) = n_v,i / n_v and r_i = c_i / T; NaN where n_v = 0 or
    c_i = 0."""
    n_v = token_counts.double()[:, None]
    ratio = counts.double()[None, :] / max(tokens, 1)
    lift = token_expert.double() / n_v / ratio
    valid = (n_v > 0) & (ratio > 0)
    return torch.where(valid, lift, torch.full_like(lift, math.nan))


def top_pairs(
    coactivation: Tensor, tokens: int, top_k: int, by: str = "lift", min_count: int = MIN_COUNT
) -> list[dict[str, Any]]:
    """The `top_k` expert pairs i < j by lift (pairs with C_ij ≥ min_count) or by count C_ij."""
    lift = coactivation_lift(coactivation, tokens)
    n = coactivation.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    count = coactivation[i, j]
    pair_lift = lift[i, j]
    if by == "lift":
        keep = (count >= min_count) & ~torch.isnan(pair_lift)
        key = torch.where(keep, pair_lift, torch.full_like(pair_lift, -math.inf))
    elif by == "count":
        keep = count > 0
        key = count.double()
    else:
        raise ValueError(f"rank pairs by 'lift' or 'count', not {by!r}")
    # stable order: key descending, then (i, j) ascending
    order = sorted(range(len(key)), key=lambda m: (-float(key[m]), int(i[m]), int(j[m])))
    result = []
    for m in order:
        if len(result) >= top_k or not keep[m]:
            break
        result.append(
            {
                "experts": [int(i[m]), int(j[m])],
                "count": int(count[m]),
                "lift": _num(pair_lift[m]),
            }
        )
    return result


# ---- the analysis --------------------------------------------------------------------------------


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _floats(values: Tensor) -> list[float | None]:
    return [_num(v) for v in values.tolist()]


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
    import numpy as np

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
            "tokens_per_expert": counts.tolist(),
            "share": _floats(shares(counts)),
            "selection_ratio": _floats(counts.double() / max(tokens, 1)),
            "average_gate": _floats(gate_sum / max(tokens, 1)),
            **load_metrics(counts),
        }

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
                    for i in order[:top_k]
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
) -> dict[str, Any]:
    """`deepmoe analyze` as a function: load the checkpoint `model_dir` (a run directory means its newest
    step) and its tokenizer, read each text source (a file or folder, or `bundled:DOMAIN`: the held-out
    documents of a bundled domain) into [batch_size, seq_len] windows, at most `max_tokens` tokens per
    source, and return `analyze`'s report with "model" added (write it with `write_analysis`).
    `device` "auto" is cuda when available. ValueError (one line) when the model or a source is unusable.
    """
    from deepmoe.data import load_tokenizer
    from deepmoe.model import from_pretrained
    from deepmoe.tools.routing import fixed_batches, source_tokens

    for name, value in (("max_tokens", max_tokens), ("seq_len", seq_len), ("batch_size", batch_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    sources = list(sources)
    if len(set(sources)) != len(sources):
        raise ValueError(f"a source is given twice: {', '.join(sources)}")
    model_dir = checkpoint_dir(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a checkpoint directory")
    tokenizer = load_tokenizer(model_dir, needed_for="analyze (reading the text sources)")
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


# ---- files -----------------------------------------------------------------------------------------


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return atomic_write(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    try:
        fig.tight_layout()
        return atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_load_heatmap(report: dict[str, Any], path: Path) -> Path:
    """Layer × expert heatmap of each expert's load relative to the mean (share · N), all sources."""
    import numpy as np

    plt = _pyplot()
    layers = report["layers"]
    names = list(layers)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.45 * max(1, len(names))))
    matrix = np.array([[s or 0.0 for s in layers[n]["share"]] for n in names], dtype=float)
    relative = matrix * matrix.shape[1]
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, label="load / mean load")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("Expert load (all sources)")
    return _save(plt, fig, path)


def plot_source_distribution(layer: dict[str, Any], idx: str, path: Path) -> Path:
    """One layer: each source's expert shares relative to uniform (share · N), grouped bars."""
    import numpy as np

    plt = _pyplot()
    sources = layer["sources"]
    n = layer["experts"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n + 2), 3.6))
    width = 0.8 / max(1, len(sources))
    x = np.arange(n)
    for s, (name, data) in enumerate(sources.items()):
        ax.bar(x + (s - (len(sources) - 1) / 2) * width, [(v or 0.0) * n for v in data["share"]], width, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("load / mean load")
    best = layer.get("max_js")
    title = f"Layer {idx}: routing distribution per source"
    if best:
        title += f" (JS {best['js']:.3f})"
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_coactivation(layer: dict[str, Any], idx: str, path: Path) -> Path:
    """One layer: the co-activation lift matrix P(i,j)/(P(i)P(j)) (diagonal blank)."""
    import numpy as np

    plt = _pyplot()
    coact = torch.tensor(layer["coactivation"]["matrix"], dtype=torch.long)
    lift = coactivation_lift(coact, layer["tokens"]).numpy()
    np.fill_diagonal(lift, np.nan)
    n = lift.shape[0]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    image = ax.imshow(lift, cmap="magma", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, label="lift P(i,j) / (P(i) P(j))")
    ticks = range(0, n, max(1, n // 16))
    ax.set_xticks(ticks, [str(i) for i in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(i) for i in ticks], fontsize=7)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    ax.set_title(f"Layer {idx}: co-activation (independent = {layer['coactivation']['independent_lift']:.2f})")
    return _save(plt, fig, path)


def write_analysis(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write `report` to `out_dir` (created): report.json, layers.csv, load.csv, js.csv,
    specific_experts.csv, coactivation.csv, vocabulary.csv, load_heatmap.png and, per layer L,
    sources_layer_L.png and coactivation_layer_L.png. Every file is written atomically.
    Returns the paths written. A non-empty `out_dir` is refused unless it holds an earlier analysis.
    """
    with claim_directory(out_dir, "routing analysis (deepmoe analyze)", is_analysis) as out:
        out.mkdir(exist_ok=True)
        return _write_analysis(report, out)


_ANALYSIS_FILE = re.compile(r"report\.json|(layers|load|js|specific_experts|coactivation|vocabulary)\.csv"
                            r"|load_heatmap\.png|(sources|coactivation)_layer_\d+\.png")  # fmt: skip


def is_analysis(directory: Path) -> bool:
    """Whether `directory` holds only what `write_analysis` writes, with its report.json."""
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError):
        return False
    names = visible_entries(directory)
    return (
        isinstance(report, dict)
        and {"sources", "layers"} <= report.keys()
        and all(_ANALYSIS_FILE.fullmatch(n) for n in names)
    )


def _write_analysis(report: dict[str, Any], out: Path) -> list[Path]:
    from deepmoe.report import write_report

    layers = report["layers"]
    names = list(report["sources"])
    written = [write_report(out / "report.json", report)]

    rows = []
    for idx, layer in layers.items():
        best = layer["max_js"]
        rows.append(
            [
                idx,
                layer["tokens"],
                layer["maxvio"],
                layer["cv"],
                layer["entropy"],
                layer["normalized_entropy"],
                layer["effective_experts"],
                len(layer["dead_experts"]),
                " ".join(map(str, layer["dominant_experts"])),
                int(layer["collapse"]["warning"]),
                None if best is None else best["js"],
                "" if best is None else " vs ".join(best["sources"]),
            ]
        )
    header = ["layer", "tokens", "maxvio", "cv", "entropy", "normalized_entropy", "effective_experts"]
    header += ["dead_experts", "dominant_experts", "collapse", "max_js", "max_js_sources"]
    written.append(_csv(out / "layers.csv", header, rows))

    header = ["layer", "expert", "tokens", "share", "selection_ratio", "average_gate"]
    for name in names:
        header += [f"tokens[{name}]", f"share[{name}]"]
        if len(names) > 1:
            header.append(f"specificity[{name}]")
    rows = []
    for idx, layer in layers.items():
        for i in range(layer["experts"]):
            row = [idx, i, layer["tokens_per_expert"][i], layer["share"][i]]
            row += [layer["selection_ratio"][i], layer["average_gate"][i]]
            for name in names:
                src = layer["sources"][name]
                row += [src["tokens_per_expert"][i], src["share"][i]]
                if len(names) > 1:
                    row.append(layer["specificity"][name][i])
            rows.append(row)
    written.append(_csv(out / "load.csv", header, rows))

    rows = [[idx, *e["sources"], e["js"]] for idx, layer in layers.items() for e in layer["js_divergence"]]
    written.append(_csv(out / "js.csv", ["layer", "source_a", "source_b", "js"], rows))

    rows = []
    for idx, layer in layers.items():
        for name, experts in layer["specific_experts"].items():
            for rank, e in enumerate(experts, 1):
                rows.append([idx, name, rank, e["expert"], e["specificity"], e["share"], e["share_others"]])
    header = ["layer", "source", "rank", "expert", "specificity", "share", "share_others"]
    written.append(_csv(out / "specific_experts.csv", header, rows))

    rows = []
    for idx, layer in layers.items():
        coact = torch.tensor(layer["coactivation"]["matrix"], dtype=torch.long)
        lift = coactivation_lift(coact, layer["tokens"])
        n = coact.shape[0]
        for i in range(n):
            for j in range(i + 1, n):
                rows.append([idx, i, j, int(coact[i, j]), _num(lift[i, j])])
    written.append(_csv(out / "coactivation.csv", ["layer", "expert_i", "expert_j", "count", "lift"], rows))

    rows = []
    for idx, layer in layers.items():
        for i, tokens in enumerate(layer["vocabulary"]):
            for rank, t in enumerate(tokens, 1):
                row = [idx, i, rank, t["token_id"], t["token"], t["occurrences"], t["count"]]
                rows.append(row + [t["p_expert_given_token"], t["lift"]])
    header = ["layer", "expert", "rank", "token_id", "token", "occurrences", "count", "p_expert_given_token", "lift"]
    written.append(_csv(out / "vocabulary.csv", header, rows))

    if layers:
        written.append(plot_load_heatmap(report, out / "load_heatmap.png"))
    for idx, layer in layers.items():
        written.append(plot_source_distribution(layer, idx, out / f"sources_layer_{idx}.png"))
        written.append(plot_coactivation(layer, idx, out / f"coactivation_layer_{idx}.png"))
    return written
