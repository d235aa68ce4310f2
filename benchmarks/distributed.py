"""Distributed training (docs/design.md#d2-sharded-training): what each rank holds, what it sends, and the time per
step, for W = 1, 2, 4 processes, expert parallelism over E of them, FSDP2 or replicated data parallelism.

Each configuration is one short `deepmoe train` run (`torchrun --nproc-per-node W -m deepmoe train ...`, gloo on
the CPU; W = 1: `python -m deepmoe train`) in its own temporary directory, with OMP_NUM_THREADS=1 per rank; the
figures are read back from its log.jsonl and report.json:

- parameter / gradient / optimizer MB: what one rank holds after the first step (the largest over the ranks),
  and its ratio to the single process; "expected" is 1/W for fsdp, and for replicate the dense weights whole
  plus 1/E of the routed experts (counted on the model);
- all-to-all MB: bytes each rank sends to the others per step (forward + backward), mean over the steps;
- ms per step: median of tokens / tokens_per_s over the steps after the first, on rank 0.

All ranks of a run share the machine's cores: on a 2-core machine the time per step is no scaling figure.

    python benchmarks/distributed.py [--steps 6] [--quick] [--preset tiny-v3] [--seq-len 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepmoe import DeepSeekForCausalLM, get_preset

# (W, E, data-parallel); E divides W
CONFIGS = [
    (1, 1, "fsdp"),
    (2, 1, "fsdp"),
    (2, 2, "fsdp"),
    (4, 1, "fsdp"),
    (4, 2, "fsdp"),
    (4, 4, "fsdp"),
    (4, 1, "replicate"),
    (4, 2, "replicate"),
]
KINDS = ("parameter_bytes", "gradient_bytes", "optimizer_bytes")


def command(world: int, expert_parallel: int, data_parallel: str, out: Path, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable, "-m", "deepmoe"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                    "-m", "deepmoe"]  # fmt: skip
    train = [
        "train", "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--warmup-steps", "1", "--eval-every", "0", "--save-every", "0",
        "--keep-last", "1", "--final-eval-batches", "1", "--no-progress", "--device", "cpu",
        "--expert-parallel", str(expert_parallel), "--out", str(out),
    ]  # fmt: skip
    if world > 1:
        train += ["--data-parallel", data_parallel]
    return launcher + train


def run(world: int, expert_parallel: int, data_parallel: str, args: argparse.Namespace, tmp: str) -> dict:
    out = Path(tmp, f"w{world}-e{expert_parallel}-{data_parallel}")
    cmd = command(world, expert_parallel, data_parallel, out, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        # a rank's own message (the CLI's "error:" line or its exception), not torchrun's ChildFailedError after it
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        own = [line for line in lines if "error:" in line or ("Error" in line and "ChildFailedError" not in line)]
        error = own[0] if own else (lines[-1] if lines else "")
        return {"error": f"exit {proc.returncode}: {error[:200]}", "wall_s": wall}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    report = json.loads((out / "report.json").read_text())
    steps = [r for r in log if "tokens_per_s" in r]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps[1:]] or [steps[0]["tokens"] / steps[0]["tokens_per_s"]]
    comm = [r["comm_bytes_per_rank"] for r in steps if "comm_bytes_per_rank" in r]
    held = report.get("bytes_per_rank") or next(r for r in log if "parameter_bytes" in r)
    return {
        "ranks": report.get("ranks"),
        "expert_parallel": report.get("expert_parallel"),
        "data_parallel": report.get("data_parallel"),
        **{k: held[k] for k in KINDS},
        "comm_bytes": statistics.mean(comm) if comm else None,
        "step_s": statistics.median(seconds),
        "loss": steps[-1]["loss"],
        "wall_s": wall,
    }


def expected_ratio(world: int, expert_parallel: int, data_parallel: str, total: int, experts: int) -> float:
    """The fraction of the single process's parameters one rank should hold."""
    if data_parallel == "fsdp":
        return 1 / world
    return (total - experts + experts / expert_parallel) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    parser.add_argument("--quick", action="store_true", help="3 steps of 32-token sequences (a smoke run)")
    parser.add_argument("--preset", default="tiny-v3")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, divisible by 4 (default 8)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len = 3, 32
    if args.batch_size % 4:
        parser.error("--batch-size must be divisible by 4 (the largest W)")

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(get_preset(args.preset))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    del model

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="deepmoe-distributed-") as tmp:
        for config in CONFIGS:
            results[config] = run(*config, args, tmp)
            r = results[config]
            print(f"W={config[0]} E={config[1]} {config[2]}: "
                  f"{r.get('error') or 'ok'} ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    elapsed = time.perf_counter() - started

    base = results[CONFIGS[0]]
    if "error" in base:
        sys.exit(f"the single process failed: {base['error']}")
    print(
        f"\n{args.preset} ({total / 1e6:.2f} MB of float32 parameters, {experts / 1e6:.2f} MB of them routed experts), "
        f"{args.steps} steps of a global batch of {args.batch_size} × {args.seq_len} tokens, AdamW; "
        f"torch {torch.__version__}, gloo, OMP_NUM_THREADS=1 per rank\n"
    )
    print("| W | E | data parallel | param MB/rank | grad MB/rank | optim MB/rank | param / W=1 | grad / W=1 "
          "| optim / W=1 | expected | all-to-all MB/step/rank | ms/step | time / W=1 |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (world, e, dp), r in results.items():
        dp_name = dp if world > 1 else "–"
        if "error" in r:
            print(f"| {world} | {e} | {dp_name} | failed: {r['error']} |" + " |" * 9)
            continue
        mb = [f"{r[k] / 1e6:.2f}" for k in KINDS]
        ratio = [f"{r[k] / base[k]:.3f}" for k in KINDS]
        comm = f"{r['comm_bytes'] / 1e6:.2f}" if r["comm_bytes"] is not None else "–"
        print(
            f"| {world} | {e} | {dp_name} | {' | '.join(mb)} | {' | '.join(ratio)} "
            f"| {expected_ratio(world, e, dp, total, experts):.3f} | {comm} | {r['step_s'] * 1e3:.0f} "
            f"| {r['step_s'] / base['step_s']:.2f}× |"
        )
    losses = ", ".join(
        f"W{w}E{e}{'r' if dp == 'replicate' else ''} {r['loss']:.4f}"
        for (w, e, dp), r in results.items()
        if "error" not in r
    )
    print(
        f"\nAll ranks are gloo processes sharing this {os.cpu_count()}-core CPU machine (no GPUs): the time per step "
        f"is not a scaling figure here. Final training losses: {losses}. {datetime.date.today()}, {elapsed:.0f} s "
        f"for the {len(CONFIGS)} runs."
    )


if __name__ == "__main__":
    main()
