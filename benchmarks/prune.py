"""Expert pruning: held-out loss against the fraction of routed experts kept, for each scoring method.

    python benchmarks/prune.py [--checkpoint runs/demo/step-300] [--tokens 32768] [--random-seeds 3]

The checkpoint (by default the demo model: tiny-v3, 16 routed experts per layer in 4 groups, top-2 groups,
top-4, trained 300 steps on the bundled corpus) is scored once on `--tokens` tokens of the bundled corpus's
training split (`deepmoe.tools.prune.collect_expert_stats`, the MTP block included), then for every kept
count that group-limited routing allows (the same number per group, topk_group × per-group >= top-k, >= 2
per group for noaux_tc) and every method (`reap`, `frequency`, `gate`, and a random choice per group averaged
over `--random-seeds` seeds) the pruned model (`prune_model`, what `deepmoe prune` writes) is evaluated on the
whole held-out split (the documents the trainer held out, 5%): mean next-token loss in nats. One thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from deepmoe.data import heldout_batches, load_tokenizer, prepare_corpus
from deepmoe.evaluate import heldout_loss
from deepmoe.model import from_pretrained
from deepmoe.runtime import keep_freed_memory
from deepmoe.tools.prune import METHODS, collect_expert_stats, expert_scores, kept_count, prune_model, select_kept
from deepmoe.tools.routing import fixed_batches


def allowed_counts(model) -> list[int]:
    """The kept counts, largest first, that every MoE layer's routing allows (at most N_r)."""
    n = min(layer.config.n_routed_experts for layer in model.moe_layers().values())
    counts = []
    for count in range(n, 0, -1):
        try:
            kept_count(model.config, n, count)
        except ValueError:
            continue
        counts.append(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/step-300")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens from the training split")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    start = time.perf_counter()

    model = from_pretrained(args.checkpoint, device="cpu")
    corpus = prepare_corpus(None, tokenizer=load_tokenizer(args.checkpoint))
    calibration = fixed_batches(corpus.train, args.seq_len, args.batch_size, args.tokens)
    held = heldout_batches(corpus.heldout, args.batch_size, args.seq_len)
    stats = collect_expert_stats(model, calibration)
    n = model.config.moe.n_routed_experts
    full = heldout_loss(model, held)

    counts = [c for c in allowed_counts(model) if c < n]
    rows: dict[str, list[float]] = {}
    for method in METHODS:
        scores = expert_scores(stats, method)
        rows[method] = [heldout_loss(prune_model(model, select_kept(model.config, scores, c)), held) for c in counts]
    random_losses = []
    for seed in range(args.random_seeds):
        g = torch.Generator().manual_seed(seed)
        scores = {idx: torch.rand(layer.config.n_routed_experts, generator=g, dtype=torch.float64)
                  for idx, layer in model.moe_layers().items()}  # fmt: skip
        random_losses.append(
            [heldout_loss(prune_model(model, select_kept(model.config, scores, c)), held) for c in counts]
        )
    rows[f"random (mean of {args.random_seeds} seeds)"] = [
        sum(r[i] for r in random_losses) / len(random_losses) for i in range(len(counts))
    ]
    spread = [(min(r[i] for r in random_losses), max(r[i] for r in random_losses)) for i in range(len(counts))]

    held_tokens = sum(b.numel() for b in held)
    calibration_tokens = sum(b.numel() for b in calibration)
    moe = model.config.moe
    print(
        f"{args.checkpoint}: {n} routed experts per layer (n_group={moe.n_group}, topk_group={moe.topk_group}, "
        f"top-{moe.num_experts_per_tok}); calibration {calibration_tokens:,} training-split tokens, held-out loss "
        f"on {held_tokens:,} tokens"
    )
    header = ["method", f"{n}/{n} (unpruned)"] + [f"{c}/{n} ({c / n:.0%})" for c in counts]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for method, losses in rows.items():
        print("| " + " | ".join([method, f"{full:.4f}"] + [f"{v:.4f}" for v in losses]) + " |")
    print("| random: min - max | - | " + " | ".join(f"{lo:.4f} - {hi:.4f}" for lo, hi in spread) + " |")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
