"""Expert pruning (docs/design.md#s6-pruning; Lasby et al. 2025, "REAP: Router-weighted Expert Activation
Pruning"): score the routed experts of every MoE layer on calibration data, remove the lowest-scoring ones
and write an ordinary smaller checkpoint.

1. Scores, from one pass over the calibration batches in eval mode (`collect_expert_stats`: a forward hook
   on every MoE layer, MTP blocks included, reads the layer's input and its router's decision). With
   X_j the tokens routed to expert j, g_j(x) the gate weight the router gives j for x (the weight the layer
   multiplies j's output by: top-k renormalised when norm_topk_prob, times routed_scaling_factor),
   f_j(x) the expert's output and s_j(x) its affinity (softmax or sigmoid score, chosen or not):

   - "reap":      S_j = (1/|X_j|) Σ_{x ∈ X_j} g_j(x)·‖f_j(x)‖₂   (REAP's saliency; 0 when X_j is empty)
   - "frequency": S_j = |X_j|                                    (routing frequency)
   - "gate":      S_j = (1/T) Σ_x s_j(x)                         (mean gate score over all T tokens)

2. Selection (`select_kept`): per layer keep the `keep` highest-scoring experts (ties: lower index). With
   group-limited routing (n_group G > 1) every group keeps the same number, its own best keep/G, so the
   pruned layer has G groups of keep/G experts and routes as the original does with the others masked
   out; a `keep` that cannot be split equally, or leaves topk_group × keep/G < num_experts_per_tok (or
   fewer than 2 per group with noaux_tc), is refused with one error. A fraction keeps round(f · n/G) per group.

3. The pruned model (`prune_model`): the router's weight rows, the e_score_correction_bias entries and the
   stacked expert tensors (gate_up_proj [N, 2I, H], down_proj [N, H, I]) indexed by the kept ids, in
   increasing order (so each kept expert stays in its group). Expert masks are not part of a checkpoint.

With sigmoid scores, or softmax scores and norm_topk_prob, the pruned model computes exactly what the
original computes with the removed experts disabled (`Router.set_expert_mask(disabled=...)`). With softmax
and no top-k normalisation (DeepSeek-V2's setting) the softmax is taken over the kept experts only, so each
kept gate grows by 1 / (the kept experts' share of the softmax mass).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from deepmoe.config import DeepSeekConfig
from deepmoe.data import EOT_TOKEN, PreparedCorpus, is_prepared, load_tokenizer, split_batch
from deepmoe.io.checkpoint import checkpoint_dir, copy_tokenizer_files, load_config
from deepmoe.io.files import atomic_directory, claim_directory, refuse_overlap, write_json
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.pretrained import _materialise_buffers
from deepmoe.moe.layer import MoE, MoEOutput
from deepmoe.tools.routing import fixed_batches, source_tokens

METHODS = ("reap", "frequency", "gate")
PRUNE_REPORT = "prune_report.json"
"""Scores and kept experts per layer, written beside the pruned checkpoint's weights."""


# ---- 1. scores ------------------------------------------------------------------------------------


@dataclass
class ExpertStats:
    """Sums over the calibration tokens of one MoE layer (N = its routed experts)."""

    tokens: int
    counts: Tensor
    """[N] int64, |X_j|: tokens routed to expert j."""
    score_sum: Tensor
    """[N] float64, Σ_x s_j(x) over every token."""
    reap_sum: Tensor
    """[N] float64, Σ_{x ∈ X_j} g_j(x)·‖f_j(x)‖₂."""


def _expert_output_norms(layer: MoE, x: Tensor, tokens: Tensor, expert: int) -> Tensor:
    """‖f_j(x_t)‖₂ for the rows `tokens` of x [T, H], computed in float32 from the stacked weights."""
    rows = x[tokens].float()
    gate, up = (rows @ layer.experts.gate_up_proj[expert].float().T).chunk(2, dim=-1)
    return ((F.silu(gate) * up) @ layer.experts.down_proj[expert].float().T).norm(dim=-1)


@torch.no_grad()
def collect_expert_stats(model: DeepSeekForCausalLM, batches: Iterable[Tensor]) -> dict[int, ExpertStats]:
    """Run `batches` ([B, S] token ids each) through `model` in eval mode (MTP modules included) and sum, per
    MoE layer, what the three scores need (`ExpertStats`). The training mode is restored afterwards."""
    stats: dict[int, ExpertStats] = {}

    def hook_for(idx: int, layer: MoE):
        def hook(_module, inputs, output: MoEOutput) -> None:
            routing = output.routing
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            n = routing.scores.shape[1]
            acc = stats.setdefault(
                idx, ExpertStats(0, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64),
                                 torch.zeros(n, dtype=torch.float64))
            )  # fmt: skip
            acc.tokens += x.shape[0]
            acc.score_sum += routing.scores.sum(0).double().cpu()
            weight = routing.topk_weight if routing.kept is None else routing.topk_weight * routing.kept
            for expert in routing.topk_idx.unique().tolist():
                token, slot = (routing.topk_idx == expert).nonzero(as_tuple=True)
                norms = _expert_output_norms(layer, x, token, expert)
                acc.counts[expert] += token.numel()
                acc.reap_sum[expert] += float((weight[token, slot].float() * norms).double().sum())

        return hook

    handles = [layer.register_forward_hook(hook_for(idx, layer)) for idx, layer in model.moe_layers().items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch, output_mtp=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is invalid: choose 'reap' (router-weighted output norm), 'frequency' (tokens "
            "routed) or 'gate' (mean gate score)"
        )


def expert_scores(stats: Mapping[int, ExpertStats], method: str = "reap") -> dict[int, Tensor]:
    """Per MoE layer, each routed expert's score [N] (float64) under `method` (see the module doc)."""
    _check_method(method)
    out: dict[int, Tensor] = {}
    for idx, s in stats.items():
        if method == "reap":
            out[idx] = s.reap_sum / s.counts.clamp_min(1).double()
        elif method == "frequency":
            out[idx] = s.counts.double()
        else:
            out[idx] = s.score_sum / max(s.tokens, 1)
    return out


# ---- 2. selection ---------------------------------------------------------------------------------


def kept_count(config: DeepSeekConfig, n_experts: int, keep: int | float) -> int:
    """The experts a layer of `n_experts` keeps: `keep` itself (an int), or (a fraction in (0, 1])
    round(keep · n / G) per group of the G = n_group groups. ValueError when the count does not fit the
    routing: more than n, not a multiple of G, fewer than num_experts_per_tok reachable, or fewer than 2 per
    group with noaux_tc."""
    moe = config.moe
    groups, k = moe.n_group, moe.num_experts_per_tok
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} must be a number of experts (int) or a fraction in (0, 1]")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep} is invalid: a fraction must be in (0, 1] (or give a number of experts)")
        count = groups * max(1, math.floor(keep * n_experts / groups + 0.5))
    else:
        count = keep
        if not 1 <= count <= n_experts:
            raise ValueError(f"keep={keep} is invalid: must be in [1, n_routed_experts={n_experts}]")
        if count % groups:
            raise ValueError(
                f"keep={keep} cannot be split equally over n_group={groups} groups (group-limited routing needs the "
                f"same number of experts in every group): choose a multiple of {groups}"
            )
    per_group = count // groups
    if count < k:
        raise ValueError(f"keeping {count} of {n_experts} experts leaves fewer than num_experts_per_tok={k}")
    if moe.topk_group * per_group < k:
        raise ValueError(
            f"keeping {count} of {n_experts} experts leaves {per_group} per group: a token's topk_group="
            f"{moe.topk_group} groups would hold {moe.topk_group * per_group} experts, fewer than "
            f"num_experts_per_tok={k}"
        )
    if moe.topk_method == "noaux_tc" and per_group < 2:
        raise ValueError(
            f"keeping {count} of {n_experts} experts leaves 1 per group: noaux_tc scores a group by its top-2 "
            "experts, so every group needs >= 2"
        )
    return count


def select_kept(config: DeepSeekConfig, scores: Mapping[int, Tensor], keep: int | float) -> dict[int, list[int]]:
    """Per MoE layer of `scores`, the kept expert ids (increasing): the `kept_count` highest-scoring experts,
    the same number from each of the n_group groups, ties to the lower index."""
    out: dict[int, list[int]] = {}
    for idx, score in scores.items():
        values = [float(v) for v in torch.as_tensor(score, dtype=torch.float64).flatten()]
        count = kept_count(config, len(values), keep)
        groups = config.moe.n_group
        size, per_group = len(values) // groups, count // groups
        kept: list[int] = []
        for g in range(groups):
            members = range(g * size, (g + 1) * size)
            kept += sorted(members, key=lambda i: (-values[i], i))[:per_group]
        out[idx] = sorted(kept)
    return out


# ---- 3. the pruned model --------------------------------------------------------------------------


def pruned_config(config: DeepSeekConfig, counts: Mapping[int, int]) -> DeepSeekConfig:
    """`config` with each MoE layer's n_routed_experts set to `counts[layer]`: one n_routed_experts when every
    layer (MTP blocks included) has the same count, else moe_experts_per_layer (MTP blocks take
    moe.n_routed_experts)."""
    n = config.num_hidden_layers
    mtp = {c for idx, c in counts.items() if idx >= n}
    main = [counts[i] if config.is_moe_layer(i) else 0 for i in range(n)]
    values = {c for c in main if c} | mtp
    base = mtp.pop() if mtp else max(set(main) - {0}, key=main.count)
    per_layer = None if len(values) == 1 else main
    return replace(config, moe=replace(config.moe, n_routed_experts=base), moe_experts_per_layer=per_layer)


def _layer_prefix(config: DeepSeekConfig, idx: int) -> str:
    n = config.num_hidden_layers
    return f"model.layers.{idx}.mlp." if idx < n else f"model.mtp.{idx - n}.block.mlp."


@torch.no_grad()
def prune_model(model: DeepSeekForCausalLM, kept: Mapping[int, list[int]]) -> DeepSeekForCausalLM:
    """A new model (eval mode, the dtypes and device of `model`) holding only the experts `kept` ({MoE layer:
    ids}, every MoE layer of `model`): router rows, selection bias entries and stacked expert slices taken in the order
    of the ids. `model` is left as it is."""
    layers = model.moe_layers()
    if set(kept) != set(layers):
        raise ValueError(f"kept experts must be given for every MoE layer {sorted(layers)}, got {sorted(kept)}")
    config = pruned_config(model.config, {idx: len(ids) for idx, ids in kept.items()})
    state = model.state_dict()
    for idx, ids in kept.items():
        n = layers[idx].config.n_routed_experts
        if len(set(ids)) != len(ids) or any(not 0 <= i < n for i in ids):
            raise ValueError(f"layer {idx}: kept experts {ids} must be distinct ids in [0, {n - 1}]")
        index = torch.tensor(ids, dtype=torch.long)
        prefix = _layer_prefix(model.config, idx)
        for name in ("gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj"):
            if prefix + name in state:
                state[prefix + name] = state[prefix + name].index_select(0, index.to(state[prefix + name].device))
    with torch.device("meta"):  # no random initialisation: the (copied) tensors are assigned
        pruned = DeepSeekForCausalLM(config)
    pruned.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    _materialise_buffers(pruned, "the pruned model")  # RoPE's θ, no expert masks
    return pruned.eval()


# ---- 4. the command -------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def calibration_batches(data: str, tokenizer: Tokenizer, tokens: int, seq_len: int, batch_size: int) -> list[Tensor]:
    """At most `tokens` calibration tokens of `data` as [B, S] batches: a text file or folder, `bundled:DOMAIN`
    (the held-out bundled documents of that domain), or prepared data (`deepmoe data prepare`, with the
    model's tokenizer: its train split)."""
    if is_prepared(data):
        corpus = PreparedCorpus([(data, 1.0)], tokenizer, "the model")
        batches = corpus.ordered_batches("train", batch_size, seq_len, max(1, tokens // (batch_size * seq_len)))
        return [split_batch(b)[0] for b in batches]
    return fixed_batches(source_tokens(data, tokenizer, tokenizer.token_to_id(EOT_TOKEN)), seq_len, batch_size, tokens)


def prune(
    model_dir: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    *,
    keep: int | float,
    method: str = "reap",
    tokens: int = 32768,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    tokenizer: str | os.PathLike | Tokenizer | None = None,
) -> dict[str, Any]:
    """`deepmoe prune` as a function: score the routed experts of the checkpoint `model_dir` on at most `tokens`
    tokens of `data` (`calibration_batches`) with `method`, keep `keep` per layer (`select_kept`) and write the
    pruned checkpoint, its tokenizer files and `prune_report.json` to `out`. `out` must be missing or empty
    (claimed before any work, written atomically). Returns the report. ValueError (or OSError) on unusable
    inputs."""
    _check_method(method)
    for name, value in {"tokens": tokens, "seq_len": seq_len, "batch_size": batch_size}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    source = checkpoint_dir(model_dir)
    refuse_overlap(out, [source], "the checkpoint being pruned")
    config = load_config(source)
    if config.moe is None:
        raise ValueError(f"{source}: a dense model has no experts to prune")
    layers = [i for i in range(config.num_hidden_layers + config.num_nextn_predict_layers) if config.is_moe_layer(i)]
    for idx in layers:  # a bad keep is refused before any work
        kept_count(config, config.moe_config(idx).n_routed_experts, keep)
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
    with claim_directory(out, "new or empty directory") as target:
        vocab = load_tokenizer(source, needed_for="pruning (reading the calibration text)", tokenizer=tokenizer)
        batches = calibration_batches(data, vocab, tokens, seq_len, batch_size)
        if max(int(b.max()) for b in batches) >= config.vocab_size:
            raise ValueError(f"the tokenizer yields ids beyond the model's vocab_size={config.vocab_size}")
        model = from_pretrained(source, device=_device(device))
        device_ = next(model.parameters()).device
        stats = collect_expert_stats(model, [b.to(device_) for b in batches])
        scores = expert_scores(stats, method)
        for idx, layer in model.moe_layers().items():  # a layer no token reached (an MTP block of 1-token rows)
            scores.setdefault(idx, torch.zeros(layer.config.n_routed_experts, dtype=torch.float64))
        kept = select_kept(config, scores, keep)
        pruned = prune_model(model, kept)
        report = {
            "source": str(source), "method": method, "keep": keep,
            "calibration": {"data": data, "tokens": int(sum(b.numel() for b in batches)), "seq_len": seq_len},
            "n_routed_experts": {"before": config.moe.n_routed_experts, "after": pruned.config.moe.n_routed_experts},
            "layers": {
                str(idx): {
                    "experts": int(scores[idx].numel()), "kept": ids,
                    "removed": [i for i in range(scores[idx].numel()) if i not in set(ids)],
                    "scores": [float(v) for v in scores[idx]],
                    "tokens_routed": stats[idx].counts.tolist() if idx in stats else None,
                }
                for idx, ids in sorted(kept.items())
            },
        }  # fmt: skip
        with atomic_directory(target) as tmp:
            pruned.save_pretrained(tmp)
            copy_tokenizer_files(source, tmp)
            write_json(tmp / PRUNE_REPORT, report)
        report["out"] = str(Path(target))
    return report


__all__ = [
    "METHODS",
    "PRUNE_REPORT",
    "ExpertStats",
    "collect_expert_stats",
    "expert_scores",
    "kept_count",
    "prune",
    "prune_model",
    "pruned_config",
    "select_kept",
]
