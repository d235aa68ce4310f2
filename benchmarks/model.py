"""Whole-model speed: deepmoe against transformers on one checkpoint (issues 3 and 19; results in docs/benchmarks.md).

Saves a random --model (default small-v3: issue 19's V3-style model of 4 layers, hidden 512, 64 routed experts of
width 256; or --checkpoint), loads it into deepmoe and into transformers' DeepseekV3ForCausalLM on --device in
--dtype, and times, interleaved round by round (medians): a training step's forward and forward+backward on
[batch, seq] tokens; cached greedy decoding of --new-tokens after a --context-token prompt at batch 1 and
--decode-batch, with MLA in its naive and absorbed forms; and the same decoding at batch 1 over a range of
contexts (--contexts), where the absorbed form's cache of d_c + d_r values per token pays off against the
naive form's decompression of every cached token. Decode rows report new tokens per second of the whole
`generate` call (prompt included, as a user waits for it), and the decode-only rate: the new tokens after the
first over (time − the time of a 1-token `generate` of the same prompt). Then prints the KV-cache bytes per
token of the presets.

    python benchmarks/model.py [--model small-v3] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--batch 8] [--seq 256] [--context 512] [--decode-batch 8] [--new-tokens 32] [--contexts 64 256 1024]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from _common import MODELS, interleaved_medians, load_pair, print_speed_table
from deepmoe import get_preset
from deepmoe.model.generate import generate
from deepmoe.presets import PRESETS
from deepmoe.runtime import keep_freed_memory
from deepmoe.tools.inspect import kv_cache_bytes_per_token


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """fn under no_grad, ending with a device synchronisation on CUDA (the timer stops after the kernels)."""

    def run():
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="HF-format deepseek_v3 checkpoint (default: a random --model)")
    parser.add_argument("--model", default="small-v3", choices=list(MODELS), help="the random model (default small-v3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8, help="training batch (rows of --seq tokens)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    parser.add_argument("--decode-batch", type=int, default=8, help="the batched decoding rows (besides batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--contexts", type=int, nargs="*", default=[64, 256, 1024], help="the batch-1 context sweep")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    keep_freed_memory()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ours, theirs, label = load_pair(args.checkpoint, args.model, device=args.device, dtype=dtype)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    with torch.no_grad():
        want = theirs(ids[:1]).logits.float()
        diff = ((ours(ids[:1]).logits.float() - want).abs().max() / want.abs().max()).item()

    def fwd_bwd(model, loss_of: Callable) -> Callable[[], None]:
        def step():
            loss_of(model).backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return step

    def decoders(prompt: torch.Tensor, new_tokens: int) -> dict[str, Callable[[], None]]:
        def ours_decode(absorb: bool) -> Callable[[], None]:
            def run():
                ours.set_absorbed_attention(absorb)
                generate(ours, prompt, max_new_tokens=new_tokens, eos_token_id=[])

            return synchronised(run, device)

        def hf_decode():
            theirs.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        return {
            "deepmoe naive MLA": ours_decode(False),
            "deepmoe absorbed MLA": ours_decode(True),
            "transformers": synchronised(hf_decode, device),
        }

    prompts = {
        f"decode, batch {b}, context {args.context}": torch.randint(0, vocab, (b, args.context), device=device)
        for b in (1, args.decode_batch)
    }
    prompts |= {
        f"decode, batch 1, context {c}": torch.randint(0, vocab, (1, c), device=device)
        for c in args.contexts
        if c != args.context
    }
    cases = {
        "forward": {
            "deepmoe": synchronised(lambda: ours(ids), device),
            "transformers": synchronised(lambda: theirs(ids), device),
        },
        "forward+backward": {
            "deepmoe": fwd_bwd(ours, lambda m: m(ids, labels=ids).lm_loss),
            "transformers": fwd_bwd(theirs, lambda m: m(ids, labels=ids).loss),
        },
    }
    for name, prompt in prompts.items():
        cases[name] = decoders(prompt, args.new_tokens)
        cases[f"{name}: 1-token call"] = decoders(prompt, 1)

    def set_mode(case: str) -> None:
        ours.train(case == "forward+backward")
        theirs.train(case == "forward+backward")

    medians = interleaved_medians(cases, args.rounds, set_mode)
    ours.set_absorbed_attention(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}; model {label}; "
        f"logits max rel. diff deepmoe vs transformers {diff:.1e}; training batch {args.batch} × {args.seq} tokens; "
        f"decoding {args.new_tokens} new tokens; median of {args.rounds} interleaved rounds\n"
    )
    training = {c: cases[c] for c in ("forward", "forward+backward")}
    print_speed_table(training, medians, {c: args.batch * args.seq for c in training})

    print("\n| case | variant | generate ms | new tokens/s | speed-up | decode-only tokens/s | decode speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, prompt in prompts.items():
        rows = prompt.shape[0]
        base = medians[name, "transformers"]
        base_decode = base - medians[f"{name}: 1-token call", "transformers"]
        for variant in cases[name]:
            t = medians[name, variant]
            decode = t - medians[f"{name}: 1-token call", variant]
            print(
                f"| {name} | {variant} | {t * 1e3:.0f} | {rows * args.new_tokens / t:,.1f} | {base / t:.2f}× | "
                f"{rows * (args.new_tokens - 1) / decode:,.1f} | {base_decode / decode:.2f}× |"
            )
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
