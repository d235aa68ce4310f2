"""The bare grouped kernel against one dense product of the same FLOPs, forward + backward.

    python benchmarks/grouped_mm_kernel.py [--rounds 5] [--threads 2]

`torch._grouped_mm` on 24 576 rows × 1024 → 512 in 64 equal groups (the gate/up product of the MoE
layer in `benchmarks/moe_layer.py`: 4096 tokens × 6 experts, expert width 256) against one `F.linear`
of 4096 rows × 1024 → 3072 (the dense SwiGLU's gate/up product at the same active FLOPs), each forward
and backward (input and weight gradients), in float32 and bfloat16. Every round runs each variant once
(interleaved); round 0 warms up; the figures are medians. Freed memory stays in the heap
(`deepmoe.runtime.keep_freed_memory`), as in `benchmarks/moe_layer.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from deepmoe.runtime import keep_freed_memory

GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def measure(dtype: torch.dtype, rounds: int, tokens: int, hidden: int, out: int, groups: int, k: int):
    """Median seconds of (grouped_mm, F.linear), forward + backward, interleaved round by round."""
    rows = tokens * k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(groups, hidden, out, generator=g) * 0.02).to(dtype).requires_grad_()
    offsets = torch.arange(1, groups + 1, dtype=torch.int32) * (rows // groups)
    xd = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    wd = (torch.randn(out * k, hidden, generator=g) * 0.02).to(dtype).requires_grad_()

    def grouped():
        y = GROUPED_MM(x, w, offs=offsets)
        y.backward(torch.ones_like(y))

    def dense():
        y = F.linear(xd, wd)
        y.backward(torch.ones_like(y))

    times: dict[str, list[float]] = {"grouped": [], "dense": []}
    for r in range(rounds + 1):
        for name, fn in (("grouped", grouped), ("dense", dense)):
            x.grad = w.grad = xd.grad = wd.grad = None
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["grouped"]), statistics.median(times["dense"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as benchmarks/moe_layer.py: the heap keeps freed buffers (no page faults per use)
    if GROUPED_MM is None:
        raise SystemExit("this torch build has no grouped_mm")
    tokens, hidden, out, groups, k = 4096, 1024, 512, 64, 6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print("| dtype | grouped_mm fwd+bwd ms | F.linear fwd+bwd ms | grouped / dense |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        gm, dm = measure(dtype, args.rounds, tokens, hidden, out, groups, k)
        print(f"| {str(dtype).removeprefix('torch.')} | {gm * 1e3:.0f} | {dm * 1e3:.0f} | {gm / dm:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
