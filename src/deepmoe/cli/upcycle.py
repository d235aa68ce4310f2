"""`deepmoe upcycle`: call `deepmoe.tools.upcycle.upcycle`, print the experts and the step-0 check."""

from __future__ import annotations

import argparse

from deepmoe.tools.upcycle import upcycle

HELP = "turn a dense checkpoint into a fine-grained MoE with the same function"
DESCRIPTION = (
    "Split each dense FFN of a deepmoe or Llama-style checkpoint into M experts of width I/M (K of them "
    "shared), with a router and gates that make the MoE model compute the dense one at step 0 (top-k = "
    "all routed experts); a smaller --top-k gives a sparse model to train further."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepmoe upcycle DENSE --experts-per-ffn M [--shared K] --out DIR`."""
    add = parser.add_argument
    add("dense", metavar="DENSE", help="dense checkpoint: deepmoe (no MoE layers) or Hugging Face Llama-style")
    add("--experts-per-ffn", type=int, required=True, metavar="M", help="slices of each FFN (width I/M each)")
    add("--shared", type=int, default=0, metavar="K", help="slices that form the shared expert (default 0)")
    add("--out", required=True, metavar="DIR", help="output checkpoint directory")
    add("--top-k", type=int, default=None, help="routed experts per token (default: all, which keeps the function)")
    add("--replicas", type=int, default=1, metavar="R", help="copies of each routed slice (default 1)")
    add("--noise", type=float, default=0.0, metavar="SIGMA", help="relative noise on the copies (default 0)")
    add("--keep-dense", type=int, default=0, metavar="K", help="leave the first K layers dense (default 0)")
    add("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    result = upcycle(
        args.dense, args.out, args.experts_per_ffn, shared=args.shared, top_k=args.top_k, replicas=args.replicas,
        noise=args.noise, keep_dense=args.keep_dense, seed=args.seed,
    )  # fmt: skip
    moe = result.config.moe
    print(
        f"upcycled {args.dense} -> {result.out}: {moe.n_routed_experts} routed experts (top-{moe.num_experts_per_tok})"
        f" + {moe.n_shared_experts} shared slice(s) of width {moe.moe_intermediate_size} per FFN"
    )
    verdict = "equals the dense model" if result.function_preserved else "does NOT compute the dense function"
    print(f"at step 0 the MoE model {verdict}: relative logit error {result.relative_error:.2e}")
    if not result.function_preserved:
        print("(only top-k = all routed experts without noise preserves it; train the upcycled model)")
    return 0
