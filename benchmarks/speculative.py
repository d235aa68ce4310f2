"""MTP speculative decoding on a trained checkpoint: acceptance rate and speed against plain greedy.

    python benchmarks/speculative.py runs/demo/step-300 [--new-tokens 64]

Each prompt is decoded greedily twice, plainly and drafting one token with the MTP module; the script
checks that both give the same tokens and prints the share of drafts the main model accepted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from deepmoe import from_pretrained
from deepmoe.model.generate import generate, generate_speculative
from deepmoe.runtime import keep_freed_memory

PROMPTS = [
    "ROMEO:\n",
    "KING HENRY.\nNow, lords, ",
    "To be, or not to be, ",
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Queue:\n    def __init__(self):\n",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory with an MTP module and tokenizer.json")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    keep_freed_memory()
    model = from_pretrained(args.checkpoint)
    tokenizer = Tokenizer.from_file(str(Path(args.checkpoint) / "tokenizer.json"))
    print("| prompt | drafts | accepted | acceptance | greedy ms | speculative ms | speed-up | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    totals = [0, 0, 0.0, 0.0]
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        start = time.perf_counter()
        greedy = generate(model, ids, max_new_tokens=args.new_tokens)
        t_greedy = time.perf_counter() - start
        start = time.perf_counter()
        speculative, stats = generate_speculative(model, ids, max_new_tokens=args.new_tokens)
        t_spec = time.perf_counter() - start
        same = torch.equal(greedy, speculative)
        totals = [totals[0] + stats.drafted, totals[1] + stats.accepted, totals[2] + t_greedy, totals[3] + t_spec]
        print(
            f"| {prompt!r} | {stats.drafted} | {stats.accepted} | {stats.acceptance_rate:.0%} | "
            f"{t_greedy * 1e3:.0f} | {t_spec * 1e3:.0f} | {t_greedy / t_spec:.2f}× | {same} |"
        )
    drafted, accepted, t_greedy, t_spec = totals
    print(
        f"| all | {drafted} | {accepted} | {accepted / drafted:.0%} | {t_greedy * 1e3:.0f} | {t_spec * 1e3:.0f} | "
        f"{t_greedy / t_spec:.2f}× | |"
    )


if __name__ == "__main__":
    main()
