"""MTP speculative decoding on a trained checkpoint: acceptance and speed against plain greedy decoding.

    python benchmarks/speculative.py runs/demo/step-300 [--new-tokens 64] [--rounds 5]

Each prompt is decoded greedily, plainly and drafting one token per step with the MTP module, alone (batch 1)
and all prompts together as one left-padded batch; the script checks that both give the same tokens. Plain
and speculative runs alternate round by round and each time is a median of --rounds (after a warm-up round).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer

from _common import interleaved_medians
from deepmoe import from_pretrained
from deepmoe.model.generate import generate, generate_speculative, left_padded
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
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    model = from_pretrained(args.checkpoint)
    tokenizer = Tokenizer.from_file(str(Path(args.checkpoint) / "tokenizer.json"))
    n = args.new_tokens
    inputs = {repr(p): (torch.tensor([tokenizer.encode(p).ids]), None) for p in PROMPTS}
    inputs[f"all {len(PROMPTS)} as one batch"] = left_padded([tokenizer.encode(p).ids for p in PROMPTS])

    results = {}

    def run(name: str, variant: str):
        decode = generate if variant == "greedy" else generate_speculative
        ids, mask = inputs[name]
        return lambda: results.__setitem__((name, variant), decode(model, ids, n, attention_mask=mask))

    cases = {name: {v: run(name, v) for v in ("greedy", "speculative")} for name in inputs}
    medians = interleaved_medians(cases, args.rounds)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.checkpoint}; {n} new tokens per row; "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print("| prompt | rows | drafts | accepted | acceptance | greedy ms | speculative ms | speed-up | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, (ids, _) in inputs.items():
        greedy = results[name, "greedy"]
        tokens, stats = results[name, "speculative"]
        t_greedy, t_spec = medians[name, "greedy"], medians[name, "speculative"]
        print(
            f"| {name} | {ids.shape[0]} | {stats.drafted} | {stats.accepted} | {stats.acceptance_rate:.0%} | "
            f"{t_greedy * 1e3:.0f} | {t_spec * 1e3:.0f} | {t_greedy / t_spec:.2f}× | {torch.equal(greedy, tokens)} |"
        )
    alone = [repr(p) for p in PROMPTS]
    t_greedy = sum(medians[name, "greedy"] for name in alone)
    t_spec = sum(medians[name, "speculative"] for name in alone)
    print(f"| the {len(PROMPTS)} prompts alone, summed | 1 | | | | {t_greedy * 1e3:.0f} | {t_spec * 1e3:.0f} | "
          f"{t_greedy / t_spec:.2f}× | |")  # fmt: skip


if __name__ == "__main__":
    main()
