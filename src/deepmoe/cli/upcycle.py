"""`deepmoe upcycle`: call `deepmoe.tools.upcycle.upcycle` (or `upcycle_pesc` with --pesc), print the experts and
the step-0 check."""

from __future__ import annotations

import argparse

from deepmoe.tools.upcycle import trained_parameters, upcycle, upcycle_pesc

HELP = "turn a dense checkpoint into a fine-grained MoE with the same function"
DESCRIPTION = (
    "Split each dense FFN of a deepmoe or Llama-style checkpoint into M experts of width I/M (K of them "
    "shared), with a router and gates that make the MoE model compute the dense one at step 0 (top-k = "
    "all routed experts); a smaller --top-k gives a sparse model to train further. With --pesc, keep each FFN "
    "whole, shared and frozen, and make E experts that are bottleneck adapters of rank r on its output (PESC): "
    "the model computes the dense one at step 0 for any top-k, and training updates the adapters and routers only."
)

# the options of each construction, refused with the other one
_SLICING = {"experts_per_ffn": "--experts-per-ffn", "shared": "--shared", "replicas": "--replicas", "noise": "--noise"}
_PESC = {"experts": "--experts", "adapter_rank": "--adapter-rank"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe upcycle DENSE --experts-per-ffn M [--shared K] --out DIR` and of
    `deepmoe upcycle DENSE --pesc --experts E --top-k K --adapter-rank R --out DIR`."""
    add = parser.add_argument
    add("dense", metavar="DENSE", help="dense checkpoint: deepmoe (no MoE layers) or Hugging Face Llama-style")
    add("--experts-per-ffn", type=int, default=None, metavar="M", help="slices of each FFN (width I/M each)")
    add("--shared", type=int, default=None, metavar="K", help="slices that form the shared expert (default 0)")
    add("--out", required=True, metavar="DIR", help="output checkpoint directory")
    add("--top-k", type=int, default=None, help="routed experts per token (default: all, which keeps the function)")
    add("--replicas", type=int, default=None, metavar="R", help="copies of each routed slice (default 1)")
    add("--noise", type=float, default=None, metavar="SIGMA", help="relative noise on the copies (default 0)")
    add("--keep-dense", type=int, default=0, metavar="K", help="leave the first K layers dense (default 0)")
    add("--pesc", action="store_true", help="PESC: adapter experts on the shared, frozen dense FFN (deepmoe only)")
    add("--experts", type=int, default=None, metavar="E", help="--pesc: adapter experts per layer")
    add("--adapter-rank", type=int, default=None, metavar="R", help="--pesc: bottleneck width r of each adapter")
    add("--seed", type=int, default=0)


def _check_options(args: argparse.Namespace) -> None:
    """One error for a missing option or an option of the other construction."""
    needed, refused = (_PESC, _SLICING) if args.pesc else ({"experts_per_ffn": "--experts-per-ffn"}, _PESC)
    for field, flag in needed.items():
        if getattr(args, field) is None:
            raise ValueError(f"{flag} is required{' with --pesc' if args.pesc else ''}")
    for field, flag in refused.items():
        if getattr(args, field) is not None:
            raise ValueError(f"{flag} is invalid {'with' if args.pesc else 'without'} --pesc")
    if args.pesc and args.top_k is None:
        raise ValueError("--top-k is required with --pesc")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    if args.pesc:
        result = upcycle_pesc(args.dense, args.out, args.experts, args.top_k, args.adapter_rank,
                              keep_dense=args.keep_dense, seed=args.seed)  # fmt: skip
        moe = result.config.moe
        print(
            f"upcycled {args.dense} -> {result.out} (PESC): {moe.n_routed_experts} adapter experts of rank "
            f"{moe.expert_adapter_rank} (top-{moe.num_experts_per_tok}) on each shared FFN of width "
            f"{moe.moe_intermediate_size}; training updates the adapters and routers only "
            f"({trained_parameters(result.config):,} parameters)"
        )
    else:
        result = upcycle(
            args.dense, args.out, args.experts_per_ffn, shared=args.shared or 0, top_k=args.top_k,
            replicas=1 if args.replicas is None else args.replicas, noise=args.noise or 0.0,
            keep_dense=args.keep_dense, seed=args.seed,
        )  # fmt: skip
        moe = result.config.moe
        print(
            f"upcycled {args.dense} -> {result.out}: {moe.n_routed_experts} routed experts "
            f"(top-{moe.num_experts_per_tok}) + {moe.n_shared_experts} shared slice(s) of width "
            f"{moe.moe_intermediate_size} per FFN"
        )
    verdict = "equals the dense model" if result.function_preserved else "does NOT compute the dense function"
    print(f"at step 0 the MoE model {verdict}: relative logit error {result.relative_error:.2e}")
    if not result.function_preserved:
        print("(only top-k = all routed experts without noise preserves it; train the upcycled model)")
    return 0
