"""Whole-model speed: deepmoe against transformers on one checkpoint (issue 3; results in docs/benchmarks.md).

Saves a random tiny-v3 model (or loads --checkpoint), loads it into deepmoe and into transformers'
DeepseekV3ForCausalLM, and times, interleaved round by round (medians): a training step's forward
and forward+backward on [batch, seq] tokens, and cached greedy decoding tokens/s with MLA in its
naive and absorbed forms. Then prints the KV-cache bytes per token of the presets.

    python benchmarks/model.py [--batch 8] [--seq 256] [--new-tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from _common import interleaved_medians, load_pair, print_speed_table
from deepmoe import get_preset
from deepmoe.model.generate import generate
from deepmoe.presets import PRESETS
from deepmoe.runtime import keep_freed_memory
from deepmoe.tools.inspect import kv_cache_bytes_per_token


def hf_decode(model, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="HF-format deepseek_v3 checkpoint (default: a random tiny-v3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length for decoding")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    ours, theirs, label = load_pair(args.checkpoint)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    prompt = torch.randint(0, vocab, (1, args.prompt))
    with torch.no_grad():
        want = theirs(ids[:1]).logits
        diff = ((ours(ids[:1]).logits - want).abs().max() / want.abs().max()).item()

    def fwd_bwd(model, loss_of: Callable) -> Callable[[], None]:
        def step():
            loss_of(model).backward()
            model.zero_grad(set_to_none=True)

        return step

    def decode_ours(absorb: bool) -> Callable[[], None]:
        def run():
            ours.set_absorbed_attention(absorb)
            generate(ours, prompt, max_new_tokens=args.new_tokens)

        return run

    def no_grad(fn: Callable[[], object]) -> Callable[[], None]:
        def run():
            with torch.no_grad():
                fn()

        return run

    cases = {
        "forward": {"deepmoe": no_grad(lambda: ours(ids)), "transformers": no_grad(lambda: theirs(ids))},
        "forward+backward": {
            "deepmoe": fwd_bwd(ours, lambda m: m(ids, labels=ids).lm_loss),
            "transformers": fwd_bwd(theirs, lambda m: m(ids, labels=ids).loss),
        },
        "decode": {
            "deepmoe naive MLA": decode_ours(False),
            "deepmoe absorbed MLA": decode_ours(True),
            "transformers": lambda: hf_decode(theirs, prompt, args.new_tokens),
        },
    }

    def set_mode(case: str) -> None:
        ours.train(case == "forward+backward")
        theirs.train(case == "forward+backward")

    medians = interleaved_medians(cases, args.rounds, set_mode)
    ours.set_absorbed_attention(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {label}; logits max rel. diff "
        f"deepmoe vs transformers {diff:.1e}; batch {args.batch} × {args.seq} tokens, decode {args.new_tokens} "
        f"tokens after a {args.prompt}-token prompt; median of {args.rounds} interleaved rounds\n"
    )
    tokens = {"forward": args.batch * args.seq, "forward+backward": args.batch * args.seq, "decode": args.new_tokens}
    print_speed_table(cases, medians, tokens)

    print("\n| preset | MLA/MHA cache bytes/token (bf16) | MHA equivalent | GQA-8 equivalent | MHA / this |")
    print("|---|---:|---:|---:|---:|")
    for name in PRESETS:
        sizes = kv_cache_bytes_per_token(get_preset(name))
        print(
            f"| {name} | {sizes['model']:,} | {sizes['mha']:,} | {sizes['gqa8']:,} | "
            f"{sizes['mha'] / sizes['model']:.1f}× |"
        )


if __name__ == "__main__":
    main()
