"""MoE layer speed, measured side by side in one run (docs/design.md#e3-grouped-expert-compute, issue 2).

For each layer shape and dtype, times forward (no grad) and forward+backward of:
  - dense floor: one SwiGLU FFN of width (K_r + N_s)·I, the same active FLOPs per token;
  - deepmoe grouped: the layer as shipped (one grouped matrix product per projection);
  - deepmoe loop: the same layer with its per-expert-slice fallback;
  - DeepSeek loop: the per-expert loop of DeepSeek-V3's inference/model.py (torch.where per expert),
    routed by deepmoe's gate, on the same weights;
  - transformers DeepseekV3MoE, once per experts implementation it offers on this device.
Variants run interleaved, round by round, and each figure is a median; ratios are what to read. Under each
table: the forward+backward TFLOP/s of the deepmoe layer and of the dense floor (the experts' matrix products,
6·T·3·H·I per active expert, the router's small product left out) and their ratio. On CUDA every timing
synchronises the device before and after.

    python benchmarks/moe_layer.py [--tokens 4096] [--rounds 5] [--dtypes float32 bfloat16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepmoe import MoE, MoEConfig
from deepmoe.moe.experts import SwiGLU
from deepmoe.runtime import keep_freed_memory

SHAPES = {
    "V2-style softmax top-6": dict(scoring_func="softmax", topk_method="greedy"),
    "V3-style sigmoid, 8 groups/top-4": dict(
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        use_expert_bias=True,
    ),
}


def deepseek_loop_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 inference/model.py MoE.forward: one torch.where and one small FFN per expert."""
    shape = x.shape
    x = x.view(-1, shape[-1])
    routing = layer.gate(x)
    weights, indices = routing.topk_weight.to(x.dtype), routing.topk_idx
    y = torch.zeros_like(x)
    counts = torch.bincount(indices.flatten(), minlength=layer.config.n_routed_experts).tolist()
    inter = layer.config.moe_intermediate_size
    for i, count in enumerate(counts):
        if count == 0:
            continue
        idx, top = torch.where(indices == i)
        w13, w2 = layer.experts.gate_up_proj[i], layer.experts.down_proj[i]
        h = x[idx]
        expert_out = F.linear(F.silu(F.linear(h, w13[:inter])) * F.linear(h, w13[inter:]), w2)
        y[idx] += expert_out * weights[idx, top, None]
    return (y + layer.shared_experts(x)).view(shape)


def hf_moe(layer: MoE, implementation: str):
    """transformers' DeepseekV3MoE holding the same weights (None if transformers is missing)."""
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        return None
    c = layer.config
    config = DeepseekV3Config(
        hidden_size=c.hidden_size,
        moe_intermediate_size=c.moe_intermediate_size,
        n_routed_experts=c.n_routed_experts,
        n_shared_experts=c.n_shared_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        n_group=c.n_group,
        topk_group=c.topk_group,
        norm_topk_prob=c.norm_topk_prob,
        routed_scaling_factor=c.routed_scaling_factor,
    )
    config._experts_implementation = implementation
    module = DeepseekV3MoE(config)
    state = layer.state_dict()
    state.setdefault("gate.e_score_correction_bias", torch.zeros(c.n_routed_experts))
    module.load_state_dict(state)
    param = next(layer.parameters())
    return module.to(device=param.device, dtype=param.dtype)


def hf_implementations(device: str) -> list[str]:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    names = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    gpu_only = {"deepgemm", "sonicmoe"}
    return [n for n in names if device == "cuda" or n not in gpu_only]


def timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def make_config(overrides: dict, args) -> MoEConfig:
    return MoEConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.width,
        n_routed_experts=args.experts,
        n_shared_experts=args.shared,
        num_experts_per_tok=args.topk,
        **overrides,
    )


def active_training_flops(cfg: MoEConfig, tokens: int) -> float:
    """Forward+backward FLOPs of the experts' products: 3 matrices of H×I per active expert (K_r routed + N_s
    shared), 2 FLOPs per multiply-add, backward twice the forward; what the dense floor of equal width does too."""
    active = cfg.num_experts_per_tok + cfg.n_shared_experts
    return 6.0 * tokens * 3 * cfg.hidden_size * cfg.moe_intermediate_size * active


def run_shape(name: str, overrides: dict, dtype: torch.dtype, args) -> list[tuple[str, float, float, str]]:
    cfg = make_config(overrides, args)
    torch.manual_seed(0)
    layer = MoE(cfg).to(device=args.device, dtype=dtype)
    active_width = (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
    dense = SwiGLU(cfg.hidden_size, active_width).to(device=args.device, dtype=dtype)
    x = torch.randn(args.tokens, cfg.hidden_size, device=args.device, dtype=dtype)

    def deepmoe_with(implementation: str):
        def forward(inp):
            layer.experts.implementation = implementation
            return layer(inp).hidden_states

        return forward

    variants: dict[str, tuple[Callable, list[torch.nn.Parameter]]] = {
        "dense SwiGLU (floor)": (dense, list(dense.parameters())),
        "deepmoe grouped_mm": (deepmoe_with("grouped_mm"), list(layer.parameters())),
        "deepmoe loop fallback": (deepmoe_with("loop"), list(layer.parameters())),
        "DeepSeek reference loop": (lambda inp: deepseek_loop_forward(layer, inp), list(layer.parameters())),
    }
    notes = {}
    reference_out = layer(x).hidden_states.float()
    for implementation in hf_implementations(args.device):
        label = f"transformers {implementation}"
        if implementation == "batched_mm":
            copy_bytes = args.tokens * cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size
            copy_gib = copy_bytes * x.element_size() / 2**30
            if copy_gib > args.max_batched_gib:
                notes[label] = f"skipped: copies expert weights per slot ({copy_gib:.0f} GiB)"
                continue
        module = hf_moe(layer, implementation)
        try:
            with torch.no_grad():
                out = module(x.unsqueeze(0)).squeeze(0).float()
        except Exception as error:  # an implementation this device/torch cannot run
            notes[label] = f"skipped: {type(error).__name__}: {str(error)[:60]}"
            continue
        if cfg.scoring_func == "sigmoid":  # HF's gate is V3's: same function, so same output
            err = ((out - reference_out).abs().max() / reference_out.abs().max()).item()
            notes[label] = f"max rel. diff to deepmoe {err:.1e}"
        else:
            notes[label] = "sigmoid gate (HF V3 has no softmax gate): same compute, other routing"
        variants[label] = (lambda inp, m=module: m(inp.unsqueeze(0)), list(module.parameters()))

    fwd = {k: [] for k in variants}
    train = {k: [] for k in variants}
    grad_out = torch.randn_like(x)
    for r in range(args.rounds + 1):  # round 0 warms up
        for label, (fn, params) in variants.items():
            with torch.no_grad():
                t_fwd = timed(lambda fn=fn: fn(x), args.device)
            t_train = timed(lambda fn=fn: fn(x).view_as(grad_out).backward(grad_out), args.device)
            for p in params:
                p.grad = None
            if r:
                fwd[label].append(t_fwd)
                train[label].append(t_train)
    rows = []
    for label in variants:
        rows.append((label, statistics.median(fwd[label]), statistics.median(train[label]), notes.get(label, "")))
    for label, note in notes.items():
        if label not in variants:
            rows.append((label, float("nan"), float("nan"), note))
    return rows


def print_table(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    floor_fwd, floor_train = rows[0][1], rows[0][2]
    ours_train = rows[1][2]
    print(f"\n### {title}\n")
    print("| variant | fwd ms | fwd / dense | fwd+bwd ms | fwd+bwd / dense | deepmoe speed-up (fwd+bwd) | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, t_fwd, t_train, note in rows:
        if t_fwd != t_fwd:  # nan: skipped
            print(f"| {label} | – | – | – | – | – | {note} |")
            continue
        print(
            f"| {label} | {t_fwd * 1e3:.1f} | {t_fwd / floor_fwd:.2f} | {t_train * 1e3:.1f} | "
            f"{t_train / floor_train:.2f} | {t_train / ours_train:.2f}× | {note} |"
        )


def print_tflops(rows: list[tuple[str, float, float, str]], flops: float) -> None:
    """The deepmoe layer's and the dense floor's achieved forward+backward TFLOP/s, and their ratio."""
    floor_train, ours_train = rows[0][2], rows[1][2]
    ours, floor = flops / ours_train / 1e12, flops / floor_train / 1e12
    print(
        f"\nforward+backward, {flops / 1e9:.1f} GFLOP of expert products: deepmoe grouped_mm {ours:.3g} TFLOP/s, "
        f"dense SwiGLU floor {floor:.3g} TFLOP/s, deepmoe / dense {ours / floor:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=256, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--shared", type=int, default=2)
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--max-batched-gib",
        type=float,
        default=8.0,
        help="skip transformers' batched_mm when its per-slot weight copy exceeds this",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    # Page faults from glibc returning memory to the OS would otherwise dominate (all variants alike).
    malloc_tuned = keep_freed_memory()
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(
        f"torch {torch.__version__}, transformers {hf_version}, device {device_name}, "
        f"{torch.get_num_threads()} threads; T={args.tokens}, H={args.hidden}, {args.experts} experts of width "
        f"{args.width}, top-{args.topk}, {args.shared} shared; median of {args.rounds} interleaved rounds; "
        f"glibc keeps freed memory: {malloc_tuned}"
    )
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes:
            rows = run_shape(shape, SHAPES[shape], dtype, args)
            print_table(f"{shape}, {dtype_name}", rows)
            print_tflops(rows, active_training_flops(make_config(SHAPES[shape], args), args.tokens))


if __name__ == "__main__":
    main()
