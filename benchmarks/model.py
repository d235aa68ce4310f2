"""Whole-model speed: deepmoe against transformers on one checkpoint (SPEC §4, issue 3).

Saves a random tiny-v3 model (or loads --checkpoint), loads it into deepmoe and into transformers'
DeepseekV3ForCausalLM, and times, interleaved round by round (medians): a training step's forward
and forward+backward on [batch, seq] tokens, and cached greedy decoding tokens/s with MLA in its
naive and absorbed forms. Then prints the KV-cache bytes per token of the presets.

    python benchmarks/model.py [--batch 8] [--seq 256] [--new-tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, from_pretrained, get_preset
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
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            torch.manual_seed(0)
            path = tmp
            # transformers has no MTP modules: leave them out so both models do the same work
            config = DeepSeekConfig.from_dict({**get_preset("tiny-v3").to_dict(), "num_nextn_predict_layers": 0})
            DeepSeekForCausalLM(config).save_pretrained(path)
        ours = from_pretrained(path, dtype=torch.float32)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    prompt = torch.randint(0, vocab, (1, args.prompt))
    with torch.no_grad():
        diff = (ours(ids[:1]).logits - theirs(ids[:1]).logits).abs().max() / theirs(ids[:1]).logits.abs().max()

    def train_step(model, forward: Callable) -> Callable[[], None]:
        def step():
            forward(model).backward()
            model.zero_grad(set_to_none=True)

        return step

    ours_loss = lambda m: m(ids, labels=ids).lm_loss  # noqa: E731
    hf_loss = lambda m: m(ids, labels=ids).loss  # noqa: E731

    def decode_ours(absorb: bool) -> Callable[[], None]:
        def run():
            ours.set_absorbed_attention(absorb)
            generate(ours, prompt, max_new_tokens=args.new_tokens)

        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    cases = {
        "forward": {"deepmoe": no_grad(lambda: ours(ids)), "transformers": no_grad(lambda: theirs(ids))},
        "forward+backward": {"deepmoe": train_step(ours, ours_loss), "transformers": train_step(theirs, hf_loss)},
        "decode": {
            "deepmoe naive MLA": decode_ours(False),
            "deepmoe absorbed MLA": decode_ours(True),
            "transformers": lambda: hf_decode(theirs, prompt, args.new_tokens),
        },
    }
    ours.train(), theirs.train()
    times = {(c, v): [] for c, variants in cases.items() for v in variants}
    for r in range(args.rounds + 1):
        for case, variants in cases.items():
            for model in (ours, theirs):
                model.train(case == "forward+backward")
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                if r:
                    times[case, name].append(time.perf_counter() - start)
    ours.set_absorbed_attention(False)

    label = path if args.checkpoint else "tiny-v3 without MTP"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {label}"
        f"; logits max rel. diff deepmoe vs transformers {diff:.1e}; median of {args.rounds} interleaved rounds\n"
    )
    print("| case | variant | ms | tokens/s | speed-up vs transformers |")
    print("|---|---|---:|---:|---:|")
    for case, variants in cases.items():
        tokens = args.batch * args.seq if case != "decode" else args.new_tokens
        base = statistics.median(times[case, "transformers"])
        for name in variants:
            t = statistics.median(times[case, name])
            print(f"| {case} | {name} | {t * 1e3:.1f} | {tokens / t:,.0f} | {base / t:.2f}× |")

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
