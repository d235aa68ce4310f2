"""GRPO on integer addition, with and without routing replay (issue 24; results in docs/grpo.md).

1. Writes an addition corpus ("a+b=c" lines, a and b below --high, 16 times over) and trains tiny-v3 on it briefly with
   `deepmoe train` (--sft-steps), so that the model answers some prompts right: GRPO needs rewards that differ
   within a group.
2. Runs `deepmoe grpo --task arithmetic` from that checkpoint twice, with routing replay and without, on the same
   prompts and seeds (--steps each).
3. Prints, per run, the reward over the first and the last --window steps, the variance of the importance ratio
   ρ = π_θ/π_θold over the completion tokens (ρ = 1 exactly at each batch's first update; the second update, μ = 2,
   is where the re-scoring network matters), the share of (token, layer) pairs whose experts the router, after
   the step's updates, would choose differently from the sampler, and the wall time.

    python benchmarks/grpo.py [--high 20] [--sft-steps 150] [--steps 100] [--window 10] [--out runs/grpo-bench]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def deepmoe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "deepmoe", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--high", type=int, default=20, help="operands below this (default 20)")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps per run (default 100)")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--lr", default="3e-5")
    parser.add_argument("--out", default="runs/grpo-bench", help="a new directory for everything written")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    rng = random.Random(0)
    lines = [f"{a}+{b}={a + b}" for a in range(args.high) for b in range(args.high)]
    corpus = out / "addition.txt"
    corpus.write_text("\n".join(rng.sample(lines, len(lines)) * 16) + "\n")

    start = time.perf_counter()
    deepmoe("train", "--preset", "tiny-v3", "--data", str(corpus), "--vocab-size", "300", "--seq-len", "64",
            "--batch-size", "16", "--steps", str(args.sft_steps), "--warmup-steps", "20", "--eval-every", "0",
            "--out", str(out / "sft"), "--no-progress")  # fmt: skip
    sft_time = time.perf_counter() - start
    print(f"{corpus}: {len(lines)} sums × 16; tiny-v3 trained {args.sft_steps} steps in {sft_time:.0f} s\n")

    runs = {}
    for name, extra in (("routing replay", []), ("no replay", ["--no-routing-replay"])):
        target = out / name.replace(" ", "-")
        start = time.perf_counter()
        deepmoe("grpo", str(out / "sft"), "--task", "arithmetic", "--out", str(target), "--steps", str(args.steps),
                "--prompts", "8", "--group", "8", "--max-new-tokens", "4", "--lr", args.lr,
                "--operands-below", str(args.high), *extra)  # fmt: skip
        logs = [json.loads(line) for line in (target / "log.jsonl").read_text().splitlines()]
        runs[name] = (logs, time.perf_counter() - start)

    w = args.window
    print(f"| run | reward, first {w} steps | reward, last {w} steps | ratio variance (mean) | changed routing | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (logs, seconds) in runs.items():
        rewards = [entry["reward"] for entry in logs]
        print(
            f"| {name} | {statistics.mean(rewards[:w]):.3f} | {statistics.mean(rewards[-w:]):.3f} | "
            f"{statistics.mean(e['ratio_variance'] for e in logs):.2e} | "
            f"{statistics.mean(e['changed_routing'] for e in logs):.1%} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
