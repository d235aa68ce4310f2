"""Training-step speed: deepmoe against transformers on the same weights with the same optimizer (issue 4).

One optimizer step = forward, backward, gradient clipping and AdamW on [batch, seq] tokens, for
tiny-v3 (random, without MTP, or --checkpoint) loaded into deepmoe and into transformers'
DeepseekV3ForCausalLM; steps are interleaved round by round and each figure is a median.

    python benchmarks/train.py [--batch 16] [--seq 256] [--rounds 5] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch

from _common import interleaved_medians, load_pair, print_speed_table
from deepmoe.runtime import keep_freed_memory


def optimizer_step(model, loss_of: Callable, bf16: bool) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="HF-format deepseek_v3 checkpoint (default: a random tiny-v3)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both")
    args = parser.parse_args()
    keep_freed_memory()
    ours, theirs, label = load_pair(args.checkpoint)
    ours.train()
    theirs.train()
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
    cases = {
        "training step": {
            "deepmoe": optimizer_step(ours, lambda m: m(ids, labels=ids).loss, args.bf16),
            "transformers": optimizer_step(theirs, lambda m: m(ids, labels=ids).loss, args.bf16),
        }
    }
    medians = interleaved_medians(cases, args.rounds)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {label}; batch {args.batch} × "
        f"{args.seq} tokens; AdamW + clipping; bf16 autocast {args.bf16}; median of {args.rounds} rounds\n"
    )
    print_speed_table(cases, medians, {"training step": args.batch * args.seq})


if __name__ == "__main__":
    main()
