"""`deepmoe steer` (docs/design.md#s2-steering): SteerMoE-style steering by switching routed experts off or on.

Scoring (SteerMoE, Fayyaz et al. 2025, "risk difference"). Behaviour A and behaviour B are given as
text (two sources, or JSONL pairs). Both run through the model once; for MoE layer l and routed
expert i

    p_A(l, i) = (tokens of A that chose expert i in layer l) / (tokens of A)
    p_B(l, i) = the same on B
    score(l, i) = p_A(l, i) − p_B(l, i)            ∈ [−1, 1]

p is an activation frequency: a token chooses K = num_experts_per_tok experts, so Σ_i p(l, i) = K and
Σ_i score(l, i) = 0 in every layer. score > 0 marks an A expert (it fires more often on A), score < 0
a B expert. `method="gate"` scores by the mean gate weight instead (ESFT's average gate score):
ḡ(l, i) = Σ_t g_i,t / tokens (g = 0 where i was not chosen), score = ḡ_A(l, i) − ḡ_B(l, i).

Ranking: by |score| (both sides), or by side: A = score descending, B = score ascending (most
B-specific first). A plan takes the top experts of one side, only those whose score has that side's
sign, either the top k of all (layer, expert) pairs ("spread over layers by rank", as SteerMoE) or
the top k of every layer.

Steering (docs/design.md#r6-expert-masks-and-forcing) goes through the router's expert-mask hook
(`Router.set_expert_mask`), no weight
changes: "disable" = never routed (selection score −∞), "force" = always routed (+∞). A plan never
forces more experts in a layer than num_experts_per_tok, and never disables so many that a token can
no longer fill its K slots (the router's own validation decides).

A forced candidate whose layer already forces K = num_experts_per_tok experts is dropped and still
counts toward k (`full_layer="drop"`, the default), as in SteerMoE's reference code
(adobe-research/SteerMoE, src/utils.py `steer_moe`: the top k of the global |risk difference| ranking
are taken first, then a positive one is set only while its layer has fewer than K set), so k is the
number of ranked candidates looked at and fewer may be forced; they are listed under "dropped".
`full_layer="next"` (a deepmoe option) skips them and takes the next-ranked expert instead, forcing k
where the layers allow. Other refusals of the router (a disable that would leave a token too few
reachable experts; SteerMoE has no such limit) are skipped, listed under "skipped" with the reason,
and the next expert in rank order is tried.

The steering file (the plan's JSON format: reading, checking, writing it and applying it to a model) is
`deepmoe.tools.steering_file`; its names are importable from here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from deepmoe.config import MoEConfig
from deepmoe.data import EOT_TOKEN, load_tokenizer
from deepmoe.evaluate import heldout_loss
from deepmoe.model import from_pretrained
from deepmoe.moe.router import Router
from deepmoe.tools.routing import LayerRouting, collect_routing, fixed_batches, source_tokens
from deepmoe.tools.steering_file import (
    ACTIONS,
    STEERING_FORMAT,
    STEERING_VERSION,
    apply_steering,
    check_steering_target,
    clear_steering,
    write_steering,
)

FULL_LAYER = ("drop", "next")
METHODS = ("frequency", "gate")

Score = tuple[int, int, float]
"""(layer index, expert id, score)."""


# ------------------------------------------------------------------------------------------------ scoring


def _side(side: str) -> str:
    value = str(side).upper()
    if value not in ("A", "B"):
        raise ValueError(f"side must be 'A' or 'B', got {side!r}")
    return value


def _per_token(routing: LayerRouting, method: str) -> Tensor:
    if method == "frequency":
        return routing.selection_ratio
    if method == "gate":
        return routing.average_gate
    raise ValueError(f"unknown scoring method {method!r}: choose one of {', '.join(METHODS)}")


def activation_frequencies(routing: Mapping[int, LayerRouting], method: str = "frequency") -> dict[int, list[float]]:
    """Per layer, p(i) = tokens that chose expert i / tokens (or the mean gate weight with `method="gate"`)."""
    return {layer: _per_token(r, method).tolist() for layer, r in sorted(routing.items())}


def rank_scores(scores: Iterable[Score], order: str = "abs") -> list[Score]:
    """`scores` ranked by |score| descending (`order="abs"`), by score descending ("A") or ascending ("B");
    ties by layer, then expert."""
    scores = list(scores)
    if order == "abs":
        return sorted(scores, key=lambda s: (-abs(s[2]), s[0], s[1]))
    sign = 1.0 if _side(order) == "A" else -1.0
    return sorted(scores, key=lambda s: (-sign * s[2], s[0], s[1]))


def score_experts(
    routing_a: Mapping[int, LayerRouting],
    routing_b: Mapping[int, LayerRouting],
    method: str = "frequency",
    order: str = "abs",
) -> list[Score]:
    """(layer, expert, p_A − p_B) for every routed expert of every layer, ranked (see `rank_scores`).

    `routing_a`/`routing_b` are `collect_routing` results on the A and B inputs.
    """
    if sorted(routing_a) != sorted(routing_b):
        raise ValueError(
            f"A and B were routed through different MoE layers: {sorted(routing_a)} vs {sorted(routing_b)}"
        )
    scores: list[Score] = []
    for layer in sorted(routing_a):
        ra, rb = routing_a[layer], routing_b[layer]
        for name, r in (("A", ra), ("B", rb)):
            if r.tokens <= 0:
                raise ValueError(f"no tokens of {name} were routed through MoE layer {layer}")
        pa, pb = _per_token(ra, method), _per_token(rb, method)
        if pa.shape != pb.shape:
            raise ValueError(f"layer {layer}: A has {pa.numel()} experts, B {pb.numel()}")
        scores.extend((layer, expert, float(d)) for expert, d in enumerate((pa - pb).tolist()))
    return rank_scores(scores, order)


# ------------------------------------------------------------------------------------------------ planning


def _layer_configs(config: Any) -> dict[int, MoEConfig] | MoEConfig | None:
    if config is None or isinstance(config, MoEConfig):
        return config
    if hasattr(config, "moe_layers"):
        return {idx: layer.gate.config for idx, layer in config.moe_layers().items()}
    raise TypeError(f"config must be a model, a MoEConfig or None, got {type(config).__name__}")


def _mask_error(config: MoEConfig, disabled: list[int], forced: list[int]) -> str | None:
    """The router's own refusal of this mask, or None when it accepts it (checked on a meta router)."""
    with torch.device("meta"):
        router = Router(config)
    try:
        router.set_expert_mask(disabled=disabled, forced=forced)
    except ValueError as error:
        return str(error)
    return None


def steering_plan(
    scores: Iterable[Score],
    side: str = "A",
    k: int = 8,
    action: str = "disable",
    per_layer: bool = False,
    config: Any = None,
    full_layer: str = "drop",
) -> dict[str, Any]:
    """A JSON-serialisable steering plan: the top `k` experts of `side` to `action`.

    Experts of `side` are those whose score has its sign (A: > 0, B: < 0), taken in rank order: `k` of
    all (layer, expert) pairs, or `k` in every layer with `per_layer`. With `config` (the model, or its
    MoEConfig) every layer's mask is checked as it grows. With `action="force"`, a candidate whose layer
    already forces num_experts_per_tok experts is, with `full_layer="drop"` (SteerMoE), dropped and
    still counted toward k (listed under "dropped"); with `full_layer="next"`, skipped without counting,
    so the next one in rank order takes its place. Any other mask the router refuses (e.g. a disable
    that leaves a token too few reachable experts) is skipped (listed under "skipped" with the reason)
    and the next one in rank order is tried.

    Returns {"format", "version", "action", "side", "k", "per_layer", "full_layer", "layers": {"layer":
    [experts]}, "selected": [{layer, expert, score}], "dropped": [...], "skipped": [...], "notes": [...],
    "scores": [[l, e, s], ...]}.
    """
    side = _side(side)
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if full_layer not in FULL_LAYER:
        raise ValueError(f"full_layer must be one of {', '.join(FULL_LAYER)}, got {full_layer!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    ranked = rank_scores(scores, side)
    sign = 1.0 if side == "A" else -1.0
    candidates = [s for s in ranked if sign * s[2] > 0]
    configs = _layer_configs(config)
    notes: list[str] = []
    if configs is None:
        notes.append("limits not checked: no model or MoEConfig was given")

    chosen: dict[int, list[int]] = {}
    selected: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    dropped_in: dict[int, int] = {}
    skipped: list[dict[str, Any]] = []
    for layer, expert, score in candidates:
        taken = chosen.setdefault(layer, [])
        counted = len(taken) + dropped_in.get(layer, 0) if per_layer else len(selected) + len(dropped)
        if counted >= k:
            if per_layer:
                continue
            break
        if configs is not None:
            if isinstance(configs, dict):
                if layer not in configs:
                    raise ValueError(f"scores name layer {layer}, which is not a MoE layer of the model")
                layer_config = configs[layer]
            else:
                layer_config = configs
            entry = {"layer": layer, "expert": expert, "score": score}
            limit = layer_config.num_experts_per_tok
            if action == "force" and len(taken) >= limit:
                reason = f"layer {layer} already forces num_experts_per_tok={limit} experts"
                if full_layer == "drop":
                    dropped.append({**entry, "reason": reason})
                    dropped_in[layer] = dropped_in.get(layer, 0) + 1
                else:
                    skipped.append({**entry, "reason": reason})
                continue
            trial = [*taken, expert]
            reason = _mask_error(layer_config, trial if action == "disable" else [], trial if action == "force" else [])
            if reason is not None:
                skipped.append({**entry, "reason": reason})
                continue
        taken.append(expert)
        selected.append({"layer": layer, "expert": expert, "score": score})

    layers = {str(layer): sorted(experts) for layer, experts in sorted(chosen.items()) if experts}
    if per_layer:
        short = {layer: len(chosen.get(layer, [])) for layer in sorted({s[0] for s in ranked})}
        short = {layer: n for layer, n in short.items() if n < k}
        if short:
            notes.append(
                f"fewer than {k} experts of side {side} in layers "
                + ", ".join(f"{layer} ({n})" for layer, n in short.items())
            )
    elif len(selected) < k:
        notes.append(f"only {len(selected)} of the {k} requested experts of side {side} could be {action}d")
    if dropped:
        notes.append(
            f"{len(dropped)} of the top experts fell in layers already forcing num_experts_per_tok experts and were "
            "dropped, counted toward k as in SteerMoE (full_layer='next' takes the next-ranked ones instead)"
        )
    if skipped:
        notes.append(f"{len(skipped)} experts skipped: the router refuses the mask they would make")
    return {
        "format": STEERING_FORMAT,
        "version": STEERING_VERSION,
        "action": action,
        "side": side,
        "k": k,
        "per_layer": per_layer,
        "full_layer": full_layer,
        "layers": layers,
        "selected": selected,
        "dropped": dropped,
        "skipped": skipped,
        "notes": notes,
        "scores": [[layer, expert, score] for layer, expert, score in ranked],
    }


# ------------------------------------------------------------------------------------------------ masks


def _snapshot_masks(model) -> dict[int, tuple[Tensor, Tensor]]:
    return {
        idx: (layer.gate.disabled_experts.clone(), layer.gate.forced_experts.clone())
        for idx, layer in model.moe_layers().items()
    }


def _restore_masks(model, masks: dict[int, tuple[Tensor, Tensor]]) -> None:
    for idx, layer in model.moe_layers().items():
        disabled, forced = masks[idx]
        if disabled.any() or forced.any():
            layer.gate.set_expert_mask(
                disabled=disabled.nonzero().flatten().cpu(), forced=forced.nonzero().flatten().cpu()
            )
        else:
            layer.gate.clear_expert_mask()


# ------------------------------------------------------------------------------------------------ effect


def _device(model) -> torch.device:
    return next(model.parameters()).device


def steering_effect(
    model,
    batches_a: Sequence[Tensor],
    batches_b: Sequence[Tensor],
    scores: Iterable[Score],
    ks: Iterable[int] = (0, 1, 2, 4, 8),
    side: str = "A",
    action: str = "disable",
    per_layer: bool = False,
    full_layer: str = "drop",
) -> list[dict[str, Any]]:
    """Held-out mean token loss (nats) on A and on B with the top k experts of `side` switched, per k.

    k counts experts over all layers in global rank order (or per layer with `per_layer`), through
    `steering_plan(..., config=model, full_layer=full_layer)`, so the router's limits hold. Rows: {"k",
    "experts" (switched in all), "per_layer" ({layer: n} over the scored layers), "loss_a", "loss_b",
    "delta_a", "delta_b" (against the unsteered model), "notes" (the plan's)}. The model's masks are
    restored afterwards.
    """
    scores = list(scores)
    scored_layers = sorted({layer for layer, _, _ in scores})
    saved = _snapshot_masks(model)
    rows: list[dict[str, Any]] = []
    try:
        clear_steering(model)
        base = (heldout_loss(model, batches_a), heldout_loss(model, batches_b))
        for k in ks:
            plan = steering_plan(
                scores, side=side, k=k, action=action, per_layer=per_layer, config=model, full_layer=full_layer
            )
            applied = apply_steering(model, plan)
            loss_a, loss_b = (heldout_loss(model, batches_a), heldout_loss(model, batches_b)) if applied else base
            rows.append(
                {
                    "k": k,
                    "experts": sum(len(e) for e in applied.values()),
                    "per_layer": {str(layer): len(applied.get(layer, [])) for layer in scored_layers},
                    "loss_a": loss_a,
                    "loss_b": loss_b,
                    "delta_a": loss_a - base[0],
                    "delta_b": loss_b - base[1],
                    "notes": plan["notes"],
                }
            )
    finally:
        _restore_masks(model, saved)
    return rows


# ------------------------------------------------------------------------------------------------ inputs


def load_pairs(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The A and B texts of a JSONL file of {"a": text, "b": text} lines (blank lines are skipped)."""
    a, b = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("a", "b")):
                raise ValueError(f'{path}, line {number}: expected an object with text fields "a" and "b"')
            if not item["a"].strip() or not item["b"].strip():
                raise ValueError(f"{path}, line {number}: empty text")
            a.append(item["a"])
            b.append(item["b"])
    if not a:
        raise ValueError(f"{path}: no pairs")
    return a, b


def text_batches(texts: Sequence[str], tokenizer, max_len: int) -> list[Tensor]:
    """One [1, L] batch per text (its first `max_len` tokens), so texts never see each other."""
    batches = []
    for text in texts:
        ids = tokenizer.encode(text).ids[:max_len]
        if ids:
            batches.append(torch.tensor([ids], dtype=torch.long))
    if not batches:
        raise ValueError("the texts hold no tokens")
    return batches


def _eot_id(tokenizer, config) -> int | None:

    eot = tokenizer.token_to_id(EOT_TOKEN)
    if eot is None:
        eos = config.eos_token_id
        eot = eos[0] if isinstance(eos, list) and eos else eos
    return eot


# ------------------------------------------------------------------------------------------------ the command


def _inputs(
    tokenizer,
    config,
    a: str | None,
    b: str | None,
    pairs: str | os.PathLike | None,
    effect: bool,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]] | None, dict]:
    """Scoring batches and (with `effect`) evaluation batches for A and B, and a description of them."""
    max_len = min(seq_len, config.max_position_embeddings)
    if pairs is not None:
        texts = dict(zip("ab", load_pairs(pairs), strict=True))
        n = len(texts["a"])
        if effect:
            if n < 2:
                raise ValueError(f"{pairs}: effect needs at least 2 pairs (half to score, half to evaluate)")
            half = n // 2
            score = {s: text_batches(t[:half], tokenizer, max_len) for s, t in texts.items()}
            evaluate = {s: text_batches(t[half:], tokenizer, max_len) for s, t in texts.items()}
            info = {"pairs": str(pairs), "score_pairs": half, "eval_pairs": n - half}
        else:
            score, evaluate = {s: text_batches(t, tokenizer, max_len) for s, t in texts.items()}, None
            info = {"pairs": str(pairs), "score_pairs": n}
        return score, evaluate, info
    eot = _eot_id(tokenizer, config)
    tokens = {"a": source_tokens(a, tokenizer, eot), "b": source_tokens(b, tokenizer, eot)}
    info: dict[str, Any] = {"a": a, "b": b}
    if effect:
        n = min(max_tokens, min(t.numel() for t in tokens.values()) // 2)
        if n < 2:
            raise ValueError("effect needs at least 4 tokens in each source")
        score = {s: fixed_batches(t[:n], max_len, batch_size) for s, t in tokens.items()}
        evaluate = {s: fixed_batches(t[n : 2 * n], max_len, batch_size) for s, t in tokens.items()}
        info.update(score_tokens=n, eval_tokens=n, eval_slice=f"tokens [{n}, {2 * n}) of each source")
        return score, evaluate, info
    score = {s: fixed_batches(t, max_len, batch_size, max_tokens) for s, t in tokens.items()}
    info.update(score_tokens={s: min(t.numel(), max_tokens) for s, t in tokens.items()})
    return score, None, info


def default_ks(top: int, per_layer: bool, action: str, k_per_token: int) -> list[int]:
    """The expert counts `steer(..., effect=True)` measures when no `ks` is given: 0..K forced per layer,
    0, 1, 2, 4, 8 disabled per layer, or 0, k, 2k, 4k, 8k (k = `top`) over all layers."""
    if per_layer:
        return list(range(k_per_token + 1)) if action == "force" else [0, 1, 2, 4, 8]
    step = max(top, 1)
    return [0, step, 2 * step, 4 * step, 8 * step]


def steer(
    model_dir: str | os.PathLike,
    *,
    a: str | None = None,
    b: str | None = None,
    pairs: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    side: str = "A",
    top: int = 8,
    action: str = "disable",
    per_layer: bool = False,
    full_layer: str = "drop",
    method: str = "frequency",
    effect: bool = False,
    ks: Sequence[int] | None = None,
    max_tokens: int = 32768,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """`deepmoe steer` as a function: score the experts of the checkpoint `model_dir` on behaviour A against
    B (`a` and `b` text sources: files, folders or `bundled:DOMAIN`; or `pairs`, a JSONL file of {"a", "b"}
    texts), plan the top `top` experts of `side` to `action` (`steering_plan`) and, with `effect`, measure
    the held-out loss on A and B with the top k of each side switched, for k in `ks` (default
    `default_ks`): scoring then uses the first half of each source (of the pairs), evaluation the second.

    Returns the steering file's content: the plan with "method", "inputs" (what was read), "frequencies"
    ({"a"|"b": {layer: [per expert]}}, `activation_frequencies`) and, with `effect`, "effect" ({"A"|"B":
    `steering_effect` rows}). With `out`, that file is written there, and `out` is checked before any work:
    only a steering file is ever replaced (`check_steering_target`). `on_plan(output)` is called once the
    plan is made, before the (longer) effect measurement. `tokenizer` (a `Tokenizer`, or a tokenizer.json
    file or its directory) replaces the checkpoint's. `mmap=True` keeps the weights memory-mapped (CPU,
    `from_pretrained(..., mmap=True)`) for a checkpoint larger than free memory. ValueError on unusable inputs.
    """
    if pairs is not None and (a is not None or b is not None):
        raise ValueError("steer takes either a and b (text sources) or pairs, not both")
    if pairs is None and (a is None or b is None):
        raise ValueError("steer needs both a and b (text sources), or pairs")
    side = _side(side)
    steering_plan([], side=side, k=top, action=action, full_layer=full_layer)  # checks them before any work
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}: choose one of {', '.join(METHODS)}")
    for name, value in (("max_tokens", max_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if out is not None:
        check_steering_target(out)  # before any work; again when writing
        if not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):
            raise ValueError(f"--out {out}: the directory {os.path.dirname(os.path.abspath(out))} is not writable")
    if mmap:
        device = "cpu" if device == "auto" else device
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(model_dir, device=device, mmap=mmap).eval()
    if not model.moe_layers():
        raise ValueError(f"{model_dir}: the model has no MoE layer to steer")
    tokenizer = load_tokenizer(model_dir, needed_for="steering (reading text)", tokenizer=tokenizer)
    score_batches, eval_batches, info = _inputs(
        tokenizer, model.config, a, b, pairs, effect, max_tokens, seq_len, batch_size
    )
    clear_steering(model)
    routing = {s: collect_routing(model, [x.to(device) for x in bs]) for s, bs in score_batches.items()}
    scores = score_experts(routing["a"], routing["b"], method=method)
    plan = steering_plan(
        scores, side=side, k=top, action=action, per_layer=per_layer, config=model, full_layer=full_layer
    )
    freq = {s: activation_frequencies(r, method) for s, r in routing.items()}
    output: dict[str, Any] = {**plan, "method": method, "inputs": info, "frequencies": freq}
    if on_plan is not None:
        on_plan(output)
    if eval_batches is not None:
        ev = {s: [x.to(device) for x in bs] for s, bs in eval_batches.items()}
        k_per_token = min(layer.gate.config.num_experts_per_tok for layer in model.moe_layers().values())
        ks = list(ks) if ks is not None else default_ks(top, per_layer, action, k_per_token)
        output["effect"] = {}
        for steer_side in ("A", "B"):
            output["effect"][steer_side] = steering_effect(
                model, ev["a"], ev["b"], scores, ks, side=steer_side, action=action, per_layer=per_layer,
                full_layer=full_layer,
            )  # fmt: skip
    if out is not None:
        write_steering(out, output)
    return output


__all__ = [
    "FULL_LAYER",
    "METHODS",
    "activation_frequencies",
    "default_ks",
    "load_pairs",
    "rank_scores",
    "score_experts",
    "steer",
    "steering_effect",
    "steering_plan",
    "text_batches",
]
