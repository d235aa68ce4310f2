"""The `deepmoe` command: one thin subcommand per job (parse, call, print)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from deepmoe.argtypes import non_negative_float, non_negative_int, positive_int, unit_interval
from deepmoe.runtime import keep_freed_memory

DEMO_PROMPTS = ("ROMEO:\n", "def fibonacci(n):\n")


def _demo(args: argparse.Namespace) -> int:
    """Train tiny-v3 on the bundled corpus (or continue that run), then report, plot and sample."""
    import json
    from pathlib import Path

    import torch

    from deepmoe.model import from_pretrained
    from deepmoe.model.generate import generate
    from deepmoe.report import summary_table
    from deepmoe.train.checkpoint import read_last
    from deepmoe.train.trainer import TrainConfig, resume, train

    out = Path(args.out)
    console = Console()
    last = read_last(out)
    if last is None:
        console.print(f"[bold]Training tiny-v3[/bold] ({args.steps} steps) on the bundled corpus → {out}")
        config = TrainConfig(
            preset="tiny-v3",
            steps=args.steps,
            out=str(out),
            bias_update_speed=0.01,
            eval_every=100,
            save_every=100,
            seed=args.seed,
        )
        result = train(config)
    else:
        console.print(f"[bold]Continuing the run in {out}[/bold] up to {args.steps} steps")
        result = resume(out, steps=args.steps)
        if result.step == int(last.name.removeprefix("step-")):  # nothing was left to train: show the report
            console.print(summary_table(json.loads((out / "report.json").read_text()), out))
    if result.interrupted:
        return 130
    console.print(f"plots: {out}/loss.png, {out}/expert_load.png; report: {out}/report.json")

    checkpoint = result.checkpoint
    model = from_pretrained(checkpoint)
    tokenizer = _load_tokenizer(str(checkpoint))
    generator = torch.Generator().manual_seed(args.seed)
    for prompt in DEMO_PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        tokens = generate(
            model, ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95, generator=generator
        )
        console.rule(f"sample from {prompt!r}")
        print(tokenizer.decode(tokens[0].tolist()))
    return 0


def _balance_demo(args: argparse.Namespace) -> int:
    from deepmoe.tools.balance_demo import run_balance_demo, tiny_v3_config

    config = tiny_v3_config(bias_update_speed=args.gamma)
    console = Console()
    console.print(
        f"[bold]Aux-loss-free balancing[/bold] on a tiny DeepSeek-V3-style layer: "
        f"{config.n_routed_experts} routed experts in {config.n_group} groups, top-"
        f"{config.num_experts_per_tok} of the best {config.topk_group} groups, sigmoid gate, "
        f"γ={config.bias_update_speed}; the router is skewed towards experts 0–{args.favoured - 1}."
    )
    run = run_balance_demo(config, steps=args.steps, n_tokens=args.tokens, n_favoured=args.favoured, seed=args.seed)
    table = Table(
        title=f"tokens per expert on a held-out batch of {args.tokens} tokens "
        f"(ideal {args.tokens * config.num_experts_per_tok // config.n_routed_experts})"
    )
    for column in ("expert", "group", "before", "after", "bias b_i"):
        table.add_column(column, justify="right")
    for i in range(config.n_routed_experts):
        table.add_row(
            str(i),
            str(i // config.experts_per_group),
            str(int(run.load_before[i])),
            str(int(run.load_after[i])),
            f"{float(run.bias[i]):+.3f}",
        )
    table.add_section()
    table.add_row("MaxVio", "", f"{run.max_vio_before:.3f}", f"{run.max_vio_after:.3f}", "")
    console.print(table)
    trace = ", ".join(f"{run.max_vio_per_step[s]:.2f}@{s}" for s in range(0, args.steps, max(1, args.steps // 6)))
    console.print(f"MaxVio of the training batches over the {args.steps} bias updates: {trace}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from deepmoe.tools.inspect import describe, resolve_config

    info = describe(resolve_config(args.model))
    if args.json:
        print(json.dumps(info))
        return 0
    table = Table(title=f"{args.model}", show_header=False)
    cache = info.pop("kv_cache_bytes_per_token_bf16")
    info.pop("kv_cache_bytes_per_token")
    for key, value in info.items():
        if "params" in key:
            value = f"{value / 1e9:.3f} B" if value >= 1e8 else f"{value / 1e6:.2f} M"
        table.add_row(key, str(value))
    table.add_section()
    for kind, size in cache.items():
        table.add_row(f"KV cache bytes/token ({kind}, bf16)", f"{size:,}")
    Console().print(table)
    return 0


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that would be ignored: top-k/top-p without sampling, sampling with --speculative."""
    given = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if args.speculative and (args.temperature > 0 or given):
        flags = ([f"--temperature {args.temperature:g}"] if args.temperature > 0 else []) + given
        raise ValueError(f"--speculative decodes greedily: drop {' and '.join(flags)} (or drop --speculative)")
    if given and args.temperature == 0:
        raise ValueError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only when sampling: set --temperature "
            "to a value > 0 (0 decodes greedily)"
        )


def _generate(args: argparse.Namespace) -> int:
    _check_sampling_flags(args)

    import torch

    from deepmoe.model import from_pretrained
    from deepmoe.model.generate import TextStreamer, generate, generate_speculative

    tokenizer = _load_tokenizer(args.model) if args.prompt is not None else None
    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype), delta=args.delta).eval()
    if args.steer is not None:
        from deepmoe.tools.steer import apply_steering

        apply_steering(model, args.steer)
    ids = tokenizer.encode(args.prompt).ids if tokenizer is not None else args.ids
    if not ids:
        raise ValueError("the prompt is empty: give --prompt TEXT or --ids ID [ID ...]")
    input_ids = torch.tensor([ids], dtype=torch.long)
    eos = [] if args.no_eos else args.eos  # None: the checkpoint's eos_token_id

    if tokenizer is not None:  # print whole characters only: one may span several tokens
        streamer = TextStreamer(tokenizer)
        stream, finish = streamer, streamer.end
    else:

        def stream(token: torch.Tensor) -> None:
            print(f" {int(token[0])}", end="", flush=True)

        def finish() -> None:
            pass

    if args.speculative:
        _, stats = generate_speculative(model, input_ids, args.max_new_tokens, eos_token_id=eos, streamer=stream)
        finish()
        print(f"\n[MTP drafts accepted: {stats.accepted}/{stats.drafted} = {stats.acceptance_rate:.0%}]")
        return 0
    generate(
        model,
        input_ids,
        args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos,
        generator=torch.Generator().manual_seed(args.seed),
        streamer=stream,
    )
    finish()
    print()
    return 0


def _load_tokenizer(model_dir: str):
    from tokenizers import Tokenizer

    from deepmoe.io.checkpoint import checkpoint_dir

    path = checkpoint_dir(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: give token ids with --ids instead of --prompt")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises its own Exception
        raise ValueError(f"{path} is not a readable tokenizer: {str(error).splitlines()[0]}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmoe", description="DeepSeek-style Mixture-of-Experts toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train the tiny model on the bundled corpus, report, plot, sample",
        description="The main job on a small built-in default: train tiny-v3 on the bundled corpus (continuing "
        "the run if OUT already holds one), print the report and generate samples.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    balance = sub.add_parser(
        "balance-demo",
        help="show aux-loss-free balancing fix a skewed router",
        description="Route skewed batches through a tiny DeepSeek-V3-style MoE layer, update "
        "the selection bias after each batch and print the load before/after.",
    )
    balance.add_argument("--steps", type=positive_int, default=300, help="bias updates (default 300)")
    balance.add_argument("--tokens", type=positive_int, default=16384, help="tokens per batch (default 16384)")
    balance.add_argument("--favoured", type=positive_int, default=4, help="experts the router is skewed towards")
    balance.add_argument("--gamma", type=float, default=0.001, help="bias update speed γ (default 0.001)")
    balance.add_argument("--seed", type=int, default=0)
    balance.set_defaults(func=_balance_demo)

    from deepmoe.tools.analyze import add_analyze_arguments, run_analyze
    from deepmoe.tools.esft import add_esft_arguments, run_esft
    from deepmoe.tools.merge import add_merge_arguments, run_merge
    from deepmoe.tools.steer import add_steer_arguments, run_steer
    from deepmoe.tools.study import add_study_arguments, run_study_from_args
    from deepmoe.tools.upcycle import add_upcycle_arguments, run_upcycle
    from deepmoe.train.trainer import add_train_arguments, run_from_args

    jobs = [  # (name, help, description, the module's argument builder, its runner)
        (
            "train",
            "train a model on the bundled corpus or your own text",
            "Train a DeepSeek-style MoE LM (AdamW, warmup + cosine/WSD, aux losses, bias balancing, MTP) "
            "with atomic, resumable checkpoints.",
            add_train_arguments,
            run_from_args,
        ),
        (
            "analyze",
            "routing analysis: load, entropy, domain specialisation, co-activation, vocabulary",
            "Run a checkpoint over text sources (files, folders or bundled:english / bundled:code) and "
            "report per layer load, MaxVio, entropy, dead/dominant experts, the JS divergence between the sources, "
            "source-specific experts, co-activation and each expert's preferred vocabulary (JSON, CSV, PNG).",
            add_analyze_arguments,
            run_analyze,
        ),
        (
            "esft",
            "expert-specialised fine-tuning: train only the experts a task uses, save a small delta",
            "Rank experts per layer on task data (average gate score or token selection ratio), keep the "
            "smallest set reaching share p, fine-tune only those expert slices and save them as a delta that "
            "from_pretrained(..., delta=DIR) applies on the base checkpoint.",
            add_esft_arguments,
            run_esft,
        ),
        (
            "steer",
            "find the experts behind behaviour A vs B and write a steering file",
            "Score every (layer, expert) by the difference of its activation frequency on A and B "
            "(SteerMoE), write a steering file that disables or forces the top experts of one side, and with "
            "--effect measure how held-out loss on A and B moves.",
            add_steer_arguments,
            run_steer,
        ),
        (
            "merge",
            "Assembly of Experts: merge checkpoints of one architecture tensor by tensor",
            "Build W = Σ_k λ_k W_k tensor by tensor from two or more checkpoints of one architecture (the first is "
            "the base), with separate λ for the routed experts (--expert-weights) or any tensor class, keeping the "
            "base tensor where the parents differ from it by less than δ (--threshold); streams tensor by tensor.",
            add_merge_arguments,
            run_merge,
        ),
        (
            "upcycle",
            "turn a dense checkpoint into a fine-grained MoE with the same function",
            "Split each dense FFN of a deepmoe or Llama-style checkpoint into M experts of width I/M (K of them "
            "shared), with a router and gates that make the MoE model compute the dense one at step 0 "
            "(top-k = all routed experts); a smaller --top-k gives a sparse model to train further.",
            add_upcycle_arguments,
            run_upcycle,
        ),
        (
            "study",
            "the architecture or balancing study: train the compared models, print the table",
            "architectures: dense, GShard top-2, Switch top-1, fine-grained, DeepSeekMoE, Pyramid- and "
            "Residual-MoE and a dense model of the MoE total, at equal active parameters, plus the DeepSeekMoE "
            "redundancy test; balancing: no balancing, aux losses, sequence-wise loss and aux-loss-free bias. "
            "Writes results.json, table.md and plots; rerun the same command to continue an interrupted study.",
            add_study_arguments,
            run_study_from_args,
        ),
    ]
    for name, help_text, description, add_arguments, run in jobs:
        job = sub.add_parser(name, help=help_text, description=description)
        add_arguments(job)
        job.set_defaults(func=run)

    inspect = sub.add_parser(
        "inspect",
        help="architecture, parameter counts and KV-cache size",
        description="Print a preset's or checkpoint's architecture, total and active "
        "parameters, and KV-cache bytes per token against MHA and GQA.",
    )
    inspect.add_argument("model", metavar="PRESET_OR_PATH")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=_inspect)

    gen = sub.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Generate from a Hugging Face-format DeepSeek checkpoint with the KV cache.",
    )
    gen.add_argument("model", metavar="PATH", help="checkpoint directory (config.json + safetensors)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    source.add_argument("--ids", type=int, nargs="+", help="prompt token ids")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32)
    gen.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="0 (default): greedy; > 0: sample at this temperature",
    )
    gen.add_argument(
        "--top-k", type=positive_int, default=None, help="sample among the k likeliest (with --temperature)"
    )
    gen.add_argument(
        "--top-p", type=unit_interval, default=None, help="nucleus sampling, p in (0, 1] (with --temperature)"
    )
    gen.add_argument(
        "--speculative", action="store_true", help="greedy, drafting with the MTP module (no sampling flags)"
    )
    eos = gen.add_mutually_exclusive_group()
    eos.add_argument(
        "--eos",
        type=non_negative_int,
        action="append",
        default=None,
        metavar="ID",
        help="stop at this token id (repeat for several; default: the checkpoint's eos_token_id)",
    )
    eos.add_argument("--no-eos", action="store_true", help="do not stop at the checkpoint's eos_token_id")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steer", metavar="FILE", default=None, help="steering file from `deepmoe steer`")
    gen.add_argument("--delta", metavar="DIR", default=None, help="expert delta from `deepmoe esft`")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        print(f"deepmoe {args.command}: error: {error}", file=sys.stderr)
        return 1
