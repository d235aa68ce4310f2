"""Plain, slow, per-token reference implementations of the formulas in docs/design.md.

Written independently of the library: Python loops over tokens and experts,
lists and sorted(), one small matrix-vector product at a time.
"""

from __future__ import annotations

import math

import torch

from deepmoe.config import MoEConfig


def route(x, weight, bias, cfg: MoEConfig, disabled=(), forced=()):
    """Per token: (chosen experts as a list, {expert: gate weight}, scores list)."""
    n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_group = n // cfg.n_group
    results = []
    for t in range(x.shape[0]):
        logits = [float(weight[i].detach().float() @ x[t].float()) for i in range(n)]
        if cfg.scoring_func == "softmax":
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        select = [scores[i] + (float(bias[i]) if bias is not None else 0.0) for i in range(n)]
        for i in disabled:
            select[i] = -math.inf

        allowed = set(range(n))
        if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
            group_score = {}
            for g in range(cfg.n_group):
                members = sorted(select[g * per_group : (g + 1) * per_group], reverse=True)
                group_score[g] = members[0] if cfg.topk_method == "group_limited_greedy" else members[0] + members[1]
            forced_groups = sorted({i // per_group for i in forced})
            others = sorted((g for g in range(cfg.n_group) if g not in forced_groups), key=lambda g: -group_score[g])
            groups = forced_groups + others[: max(0, cfg.topk_group - len(forced_groups))]
            allowed = {i for i in range(n) if i // per_group in groups}

        rest = sorted((i for i in allowed if i not in forced), key=lambda i: -select[i])
        chosen = list(forced) + rest[: k - len(forced)]
        weights = {i: scores[i] for i in chosen}
        if cfg.norm_topk_prob:
            total = sum(weights.values()) + 1e-20
            weights = {i: w / total for i, w in weights.items()}
        weights = {i: w * cfg.routed_scaling_factor for i, w in weights.items()}
        results.append((chosen, weights, scores))
    return results


def capacity_keep(chosen, scores, cfg: MoEConfig, batch_size: int):
    """Per token, the set of its chosen experts that survive capacity (R5)."""
    t_total, k = len(chosen), cfg.num_experts_per_tok
    if cfg.capacity_scope == "expert":
        unit_of, n_units = (lambda e: e), cfg.n_routed_experts
    else:
        unit_of, n_units = (lambda e: e // (cfg.n_routed_experts // cfg.n_devices)), cfg.n_devices
    capacity = math.ceil(cfg.capacity_factor * t_total * k / n_units)
    protected_tokens = math.floor(cfg.no_drop_fraction * batch_size) * (t_total // batch_size)
    slots = {u: [] for u in range(n_units)}
    for t in range(t_total):
        for j, e in enumerate(chosen[t]):
            priority = scores[t][e] if cfg.drop_policy == "probs" else -t
            if t < protected_tokens:
                priority = math.inf
            slots[unit_of(e)].append((-priority, t * k + j, t, e))
    kept = [set() for _ in range(t_total)]
    for unit_slots in slots.values():
        for rank, (neg_priority, _, t, e) in enumerate(sorted(unit_slots)):
            if rank < capacity or neg_priority == -math.inf:
                kept[t].add(e)
    return kept


def swiglu(x, w_gate, w_up, w_down):
    """x [H], w_gate/w_up [I, H], w_down [H, I]."""
    return w_down @ (torch.nn.functional.silu(w_gate @ x) * (w_up @ x))


def moe_forward(layer, x, kept=None, routes=None):
    """Layer output token by token: shared(x_t) + Σ_{i chosen, kept} g_i,t · expert_i(x_t)."""
    cfg = layer.config
    inter = cfg.moe_intermediate_size
    bias = layer.gate.e_score_correction_bias
    routes = routes or route(x, layer.gate.weight, bias, cfg)
    outs = []
    for t in range(x.shape[0]):
        out = torch.zeros(cfg.hidden_size, dtype=x.dtype)
        if layer.shared_experts is not None:
            s = layer.shared_experts
            out = out + swiglu(x[t], s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        chosen, _, _ = routes[t]
        for e in chosen:
            if kept is not None and e not in kept[t]:
                continue
            gate_up = layer.experts.gate_up_proj[e]
            g = _differentiable_gate(layer, x[t], e, chosen)
            out = out + g * swiglu(x[t], gate_up[:inter], gate_up[inter:], layer.experts.down_proj[e])
        outs.append(out)
    return torch.stack(outs)


def _differentiable_gate(layer, x_t, expert, chosen):
    """g_i,t recomputed with autograd (so router gradients can be compared)."""
    cfg = layer.config
    logits = layer.gate.weight.float() @ x_t.float()
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    g = scores[expert]
    if cfg.norm_topk_prob:
        g = g / (sum(scores[i] for i in chosen) + 1e-20)
    return g * cfg.routed_scaling_factor


# ---- losses, one expert / device / token at a time ----------------------------------------------
# B1–B3 take the affinities normalised per token (s / Σ_j s_j: softmax scores unchanged, sigmoid ones as V3's B4)
def normalised(scores):
    return [[v / sum(row) for v in row] for row in scores]


def expert_loss(scores, chosen, n, k):
    t_total = len(chosen)
    total = 0.0
    for i in range(n):
        f = n / (k * t_total) * sum(1 for t in range(t_total) if i in chosen[t])
        p = sum(scores[t][i] for t in range(t_total)) / t_total
        total += f * p
    return total


def device_loss(scores, chosen, n, k, d):
    t_total, per = len(chosen), n // d
    total = 0.0
    for dev in range(d):
        experts = range(dev * per, (dev + 1) * per)
        f = sum(n / (k * t_total) * sum(1 for t in range(t_total) if i in chosen[t]) for i in experts) / per
        p = sum(sum(scores[t][i] for t in range(t_total)) / t_total for i in experts)
        total += f * p
    return total


def communication_loss(scores, chosen, n, d, m):
    t_total, per = len(chosen), n // d
    total = 0.0
    for dev in range(d):
        experts = range(dev * per, (dev + 1) * per)
        f = d / (m * t_total) * sum(1 for t in range(t_total) if any(e // per == dev for e in chosen[t]))
        p = sum(sum(scores[t][i] for t in range(t_total)) / t_total for i in experts)
        total += f * p
    return total


def sequence_loss(scores, chosen, n, k, batch_size):
    seq_len = len(chosen) // batch_size
    losses = []
    for b in range(batch_size):
        tokens = range(b * seq_len, (b + 1) * seq_len)
        total = 0.0
        for i in range(n):
            f = n / (k * seq_len) * sum(1 for t in tokens if i in chosen[t])
            p = sum(scores[t][i] / sum(scores[t]) for t in tokens) / seq_len
            total += f * p
        losses.append(total)
    return sum(losses) / batch_size


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight_quant written out: per (bm × bn) block (edge blocks partial) scale = amax / 448 (1 for
    an all-zero block), q = w / scale in e4m3; returns (q, scale_inv) as V3's checkpoints store them."""
    m, n = w.shape
    bm, bn = block
    scale = torch.empty(math.ceil(m / bm), math.ceil(n / bn))
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            tile = w[r * bm : (r + 1) * bm, c * bn : (c + 1) * bn].float()
            amax = tile.abs().max()
            scale[r, c] = amax / 448.0 if amax > 0 else 1.0
            q[r * bm : (r + 1) * bm, c * bn : (c + 1) * bn] = (tile / scale[r, c]).to(torch.float8_e4m3fn)
    return q, scale


def transformers_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """The logits of transformers' DeepseekV3ForCausalLM (eager attention) loaded from the HF checkpoint `path`
    on `ids`, in float64 (its note that an MTP layer is "unexpected" silenced)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    with torch.no_grad():
        return theirs(ids).logits.double()


def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w = q · scale_inv of its block, a plain loop over the blocks, in float32."""
    out = torch.empty(q.shape)
    bm, bn = block
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            tile = (slice(r * bm, (r + 1) * bm), slice(c * bn, (c + 1) * bn))
            out[tile] = q[tile].float() * scale[r, c]
    return out


def randomise_parameters(module: torch.nn.Module, seed: int, bias_std: float | None = 0.1) -> None:
    """Weights far from any init's symmetry, so routing, selection and attention are uneven: norms near 1,
    embeddings N(0, 1), other matrices N(0, 1/fan_in), and (unless `bias_std` is None) the selection biases
    N(0, bias_std²)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in name:
                p.normal_()
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
        if bias_std is not None:
            for name, b in module.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(bias_std * torch.randn_like(b))


def transformers_model(path):
    """transformers' model of the checkpoint in `path` (eager attention, eval mode), loaded without its warning
    about an MTP layer it does not know."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
