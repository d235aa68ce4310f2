"""Training-step speed: deepmoe against transformers on the same weights with the same optimizer (issue 4),
and deepmoe's model FLOPs per token with the MFU they give (issue 19).

One optimizer step = forward, backward, gradient clipping and fused AdamW on [batch, seq] tokens, for a random
--model (small-v3, issue 19's V3-style shape, or tiny-v3; without MTP) or --checkpoint, loaded into deepmoe
and into transformers' DeepseekV3ForCausalLM on --device in --dtype (real bfloat16 weights with bfloat16);
steps are interleaved round by round and each figure is a median. On CUDA every step ends with a device
synchronisation, so the times are the device's. MFU = tokens/s × model FLOPs per token
(`deepmoe.model.parameters.training_flops_per_token`) over the device's dense bf16 peak
(`deepmoe.train.flops.device_peak_tflops`, or --peak-tflops), printed where a peak is known.

    python benchmarks/train.py [--model small-v3] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--batch 16] [--seq 256] [--rounds 5] [--bf16] [--peak-tflops T]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch

from _common import MODELS, interleaved_medians, load_pair, print_speed_table
from deepmoe.model.parameters import training_flops_per_token
from deepmoe.runtime import keep_freed_memory
from deepmoe.train.flops import device_peak_tflops, model_flops_utilisation


def optimizer_step(model, loss_of: Callable, autocast_bf16: bool, device: torch.device) -> Callable[[], None]:
    # fused AdamW for both: what deepmoe's trainer builds and transformers' Trainer defaults to (torch >= 2.8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        with autocast:
            loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the timer stops after the step's kernels, not after their launch

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="HF-format deepseek_v3 checkpoint (default: a random --model)")
    parser.add_argument("--model", default="small-v3", choices=list(MODELS), help="the random model (default small-v3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the weights' dtype")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both (over float32 weights)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: known GPUs)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    keep_freed_memory()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ours, theirs, label = load_pair(args.checkpoint, model=args.model, device=args.device, dtype=dtype)
    ours.train()
    theirs.train()
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), device=device)
    cases = {
        "training step": {
            "deepmoe": optimizer_step(ours, lambda m: m(ids, labels=ids).loss, args.bf16, device),
            "transformers": optimizer_step(theirs, lambda m: m(ids, labels=ids).loss, args.bf16, device),
        }
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    medians = interleaved_medians(cases, args.rounds)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {device_name}; model {label}; {args.dtype} weights; batch {args.batch} × "
        f"{args.seq} tokens; AdamW + clipping; bf16 autocast {args.bf16}; median of {args.rounds} rounds\n"
    )
    tokens = args.batch * args.seq
    print_speed_table(cases, medians, {"training step": tokens})

    flops = training_flops_per_token(ours.config, args.seq)
    peak = device_peak_tflops(device, args.peak_tflops)
    print(f"\nmodel FLOPs per token (deepmoe's count: 6·N_active + attention, seq {args.seq}): {flops / 1e6:,.1f} M")
    print("| variant | tokens/s | achieved TFLOP/s | MFU |")
    print("|---|---:|---:|---:|")
    for name in cases["training step"]:
        tokens_per_s = tokens / medians["training step", name]
        mfu = f"{model_flops_utilisation(tokens_per_s, flops, peak, 1):.1%}" if peak else "–"
        print(f"| {name} | {tokens_per_s:,.0f} | {tokens_per_s * flops / 1e12:.3f} | {mfu} |")
    if peak:
        print(f"\nMFU against a peak of {peak:g} TFLOP/s (dense bf16 unless --peak-tflops says otherwise)")
    else:
        print("\nno MFU: no known peak for this device (give --peak-tflops)")


if __name__ == "__main__":
    main()
