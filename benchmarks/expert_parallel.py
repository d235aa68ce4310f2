"""Expert parallelism (issue 8): bytes moved per token with device-limited routing, and wall time
per step with 1, 2, 4 processes — gloo processes on this machine's CPUs, launched by this script.
The scheme: docs/design.md#d1-expert-parallelism.

1. Bytes per token on D ranks: one V2-style MoE layer (softmax, K_r = 6 of N_r = 32 experts, H = 256), a
   forward + backward on each rank's tokens, for device-limited routing with M = 1..D (group_limited_greedy,
   n_group = D: group d = rank d's experts) and for unlimited top-K. The dispatcher counts what each rank
   sends to the others: each token once per remote rank it reaches (hidden row + K gate weights + K int32
   expert ids), the results coming back, and the two gradients in backward. The router is random, so the
   loads are near uniform: the figures show what the bound on ranks buys, not a trained model's routing.
2. Wall time of one forward + backward of the same layer on a fixed global batch, split over P = 1, 2, 4
   processes (P = 1: the ordinary single-process layer), one torch thread each; medians over rounds.
   Read the ratio against the number of cores: processes beyond it only share them.

    python benchmarks/expert_parallel.py [--ranks 4] [--tokens 2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepmoe import MoE, MoEConfig
from deepmoe.parallel import apply_expert_parallel

LAYER = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=6)


def layer_config(ranks: int, m: int | None) -> MoEConfig:
    """Device-limited to M of `ranks` groups (one per rank), or unlimited top-K when m is None."""
    limit = {} if m is None else dict(topk_method="group_limited_greedy", n_group=ranks, topk_group=m)
    return MoEConfig(**LAYER, n_devices=ranks, **limit)


def build(config: MoEConfig, parallel: bool) -> MoE:
    torch.manual_seed(0)  # the same weights on every rank
    layer = MoE(config).train()
    if parallel:
        apply_expert_parallel(layer)
    return layer


def step(layer: MoE, x: torch.Tensor) -> None:
    out = layer(x)
    out.hidden_states.sum().backward()


def measure_bytes(rank: int, ranks: int, tokens: int) -> dict:
    torch.manual_seed(100 + rank)
    x = torch.randn(tokens, LAYER["hidden_size"])
    result = {}
    for m in [None, *range(1, ranks + 1)]:
        layer = build(layer_config(ranks, m), parallel=True)
        out = layer(x)
        out.hidden_states.sum().backward()
        reached = torch.zeros(tokens, ranks, dtype=torch.bool)
        reached.scatter_(1, out.routing.topk_idx // layer.dispatcher.n_local, True)
        t = layer.dispatcher.traffic
        result["unlimited" if m is None else f"M={m}"] = {
            "ranks_per_token": float(reached.sum(1).float().mean()),
            "rows_sent": t.rows_sent,
            "forward_bytes": t.forward_bytes,
            "total_bytes": t.total_bytes,
            "tokens": tokens,
        }
    return result


def measure_time(rank: int, ranks: int, tokens: int, rounds: int) -> dict:
    torch.manual_seed(100 + rank)
    x = torch.randn(tokens // ranks, LAYER["hidden_size"])
    layer = build(layer_config(ranks, None), parallel=ranks > 1)
    times = []
    for r in range(rounds + 1):
        if ranks > 1:
            dist.barrier()
        start = time.perf_counter()
        step(layer, x)
        layer.zero_grad(set_to_none=True)
        if ranks > 1:
            dist.barrier()
        if r:  # round 0 warms up
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times)}


def worker(rank: int, ranks: int, port: int, task: str, tokens: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    if ranks > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    if task == "bytes":
        result = measure_bytes(rank, ranks, tokens)
    else:
        result = measure_time(rank, ranks, tokens, rounds)
    Path(out, f"{task}{ranks}-{rank}.json").write_text(json.dumps(result))
    if ranks > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(task: str, ranks: int, tokens: int, rounds: int, out: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(ranks, port, task, tokens, rounds, out), nprocs=ranks)
    return [json.loads(Path(out, f"{task}{ranks}-{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4, help="D of the bytes table (default 4)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (bytes), global batch (time)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    c = LAYER
    with tempfile.TemporaryDirectory() as out:
        per_rank = run("bytes", args.ranks, args.tokens, args.rounds, out)
        print(
            f"\nBytes sent to other ranks per token, D = {args.ranks} ranks, N_r = {c['n_routed_experts']}, "
            f"K_r = {c['num_experts_per_tok']}, H = {c['hidden_size']}, float32, {args.tokens} tokens per rank\n"
        )
        print("| routing | ranks reached per token | remote rows per token | forward B/token | fwd+bwd B/token "
              "| vs unlimited |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
        total = {name: sum(r[name]["total_bytes"] for r in per_rank) for name in per_rank[0]}
        n = sum(r["unlimited"]["tokens"] for r in per_rank)
        for name in per_rank[0]:
            reached = statistics.mean(r[name]["ranks_per_token"] for r in per_rank)
            rows = sum(r[name]["rows_sent"] for r in per_rank) / n
            forward = sum(r[name]["forward_bytes"] for r in per_rank) / n
            print(
                f"| {name} | {reached:.2f} | {rows:.2f} | {forward:,.0f} | {total[name] / n:,.0f} "
                f"| {total[name] / total['unlimited']:.2f}× |"
            )

        print(f"\nWall time per forward + backward, global batch {args.tokens} tokens, unlimited top-K, "
              f"{os.cpu_count()} CPU cores, one thread per process\n")  # fmt: skip
        print("| processes | ms per step | vs 1 process |")
        print("|---:|---:|---:|")
        base = None
        for ranks in (1, 2, 4):
            seconds = max(r["seconds"] for r in run("time", ranks, args.tokens, args.rounds, out))
            base = base or seconds
            print(f"| {ranks} | {seconds * 1e3:.1f} | {seconds / base:.2f}× |")


if __name__ == "__main__":
    main()
