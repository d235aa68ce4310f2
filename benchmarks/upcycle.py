"""Upcycling against training from scratch, and PESC against full upcycling, on the bundled corpus.

    python benchmarks/upcycle.py [--preset tiny-deepseek-moe] [--dense-steps 150] [--steps 50] [--keep DIR]

1. A dense model (the preset with every MoE layer dense, `model_overrides={"moe": None}`) trains
   `--dense-steps` steps on the bundled corpus.
2. `deepmoe.tools.upcycle.upcycle` splits each dense FFN into `--experts-per-ffn` slices, `--shared` of
   them the shared expert and the rest routed experts, with top-`--top-k` routing.
3. The upcycled model trains `--steps` more steps (`init_from`: its config, weights and tokenizer).
4. The same MoE config trains `--steps` steps from a random initialisation (the preset with the
   upcycled config as `model_overrides`), on the same tokens, seed and optimizer settings.
5. PESC (`deepmoe.tools.upcycle.upcycle_pesc`): each dense FFN whole and frozen as the shared expert of
   `--pesc-experts` adapter experts of rank `--adapter-rank`, top-`--top-k`, trains `--steps` steps with the same
   settings, updating only its adapters and routers.
6. The dense model itself trains `--steps` more steps (`init_from`, every parameter), the same settings: how much
   of the upcycled models' gain more training alone gives.

Every run: AdamW with the trainer's defaults (lr 2e-3 → 2e-4 cosine), `--warmup-steps` 10, seed 0, one
thread, the final evaluation on the whole held-out split. It prints the held-out loss (mean next-token
loss in nats) of the dense model, of the upcycled model after its steps, of the model trained from
scratch, of the PESC model and of the dense model after their steps, the parameters each run trains, and the
wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from deepmoe.io.checkpoint import load_config
from deepmoe.runtime import keep_freed_memory
from deepmoe.tools.upcycle import trained_parameters, upcycle, upcycle_pesc
from deepmoe.train.trainer import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-deepseek-moe")
    parser.add_argument("--dense-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=50, help="steps of the upcycled and of the scratch run")
    parser.add_argument("--experts-per-ffn", type=int, default=8)
    parser.add_argument("--shared", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--pesc-experts", type=int, default=8, help="PESC: adapter experts per layer")
    parser.add_argument("--adapter-rank", type=int, default=16, help="PESC: bottleneck width of each adapter")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="write the runs under this directory instead of a temporary one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=args.warmup_steps, eval_every=0,
                  save_every=0, progress=False, device="cpu")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        dense = train(TrainConfig(**common, preset=args.preset, steps=args.dense_steps,
                                  model_overrides={"moe": None}, out=str(root / "dense")))  # fmt: skip
        upcycle(dense.checkpoint, root / "upcycled", experts_per_ffn=args.experts_per_ffn, shared=args.shared,
                top_k=args.top_k)  # fmt: skip
        config = load_config(root / "upcycled")
        after = train(TrainConfig(**common, steps=args.steps, init_from=str(root / "upcycled"),
                                  out=str(root / "upcycled-run")))  # fmt: skip
        overrides = {k: v for k, v in config.to_dict().items() if k not in ("vocab_size", "eos_token_id")}
        scratch = train(TrainConfig(**common, preset=args.preset, steps=args.steps, model_overrides=overrides,
                                    out=str(root / "scratch")))  # fmt: skip
        assert load_config(scratch.checkpoint) == load_config(after.checkpoint) == config  # the same MoE model
        pesc_start = upcycle_pesc(dense.checkpoint, root / "pesc", experts=args.pesc_experts, top_k=args.top_k,
                                  adapter_rank=args.adapter_rank)  # fmt: skip
        pesc = train(TrainConfig(**common, steps=args.steps, init_from=str(root / "pesc"), out=str(root / "pesc-run")))
        dense_more = train(TrainConfig(**common, steps=args.steps, init_from=dense.checkpoint,
                                       out=str(root / "dense-run")))  # fmt: skip
        moe, pesc_config = config.moe, pesc_start.config
        results = {
            "preset": args.preset,
            "moe": f"top-{moe.num_experts_per_tok} of {moe.n_routed_experts} routed + {moe.n_shared_experts} shared "
            f"experts of width {moe.moe_intermediate_size}",
            "dense_steps": args.dense_steps,
            "steps": args.steps,
            "dense_heldout_loss": dense.report["heldout_loss"],
            "upcycled_heldout_loss": after.report["heldout_loss"],
            "scratch_heldout_loss": scratch.report["heldout_loss"],
            "pesc": f"top-{args.top_k} of {args.pesc_experts} adapter experts of rank {args.adapter_rank} on the "
            f"frozen FFN of width {pesc_config.moe.moe_intermediate_size}",
            "pesc_step0_relative_logit_error": pesc_start.relative_error,
            "pesc_heldout_loss": pesc.report["heldout_loss"],
            "dense_more_heldout_loss": dense_more.report["heldout_loss"],
            "dense_parameters": trained_parameters(load_config(dense.checkpoint)),
            "upcycled_trained_parameters": trained_parameters(config),
            "pesc_trained_parameters": trained_parameters(pesc_config),
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(results, indent=2))
    print("| model | steps | trained parameters | held-out loss |")
    print("|---|---:|---:|---:|")
    print(f"| dense {args.preset} | {args.dense_steps} | {results['dense_parameters']:,} | "
          f"{results['dense_heldout_loss']:.2f} |")  # fmt: skip
    print(f"| dense, trained further | +{args.steps} | {results['dense_parameters']:,} | "
          f"{results['dense_more_heldout_loss']:.2f} |")  # fmt: skip
    print(f"| upcycled to {results['moe']}, then trained | +{args.steps} | "
          f"{results['upcycled_trained_parameters']:,} | {results['upcycled_heldout_loss']:.2f} |")  # fmt: skip
    print(f"| same MoE from scratch | {args.steps} | {results['upcycled_trained_parameters']:,} | "
          f"{results['scratch_heldout_loss']:.2f} |")  # fmt: skip
    print(f"| PESC: {results['pesc']}, then trained | +{args.steps} | {results['pesc_trained_parameters']:,} | "
          f"{results['pesc_heldout_loss']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
