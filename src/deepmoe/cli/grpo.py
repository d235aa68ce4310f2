"""`deepmoe grpo`: parse, `deepmoe.tools.grpo.grpo` on the checkpoint, one line per step, save the policy."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepmoe.cli import common
from deepmoe.cli.argtypes import positive_int
from deepmoe.io.checkpoint import checkpoint_dir, read_last
from deepmoe.tools.grpo import TASKS, GRPOConfig, StepLog, grpo, read_run_config, task_from_spec

HELP = "GRPO on verifiable rewards, with MoE routing replay"
DESCRIPTION = (
    "Group Relative Policy Optimization (DeepSeekMath, DeepSeek-R1): sample --group completions per prompt with "
    "the KV cache, reward them, and optimise the clipped objective with a k3 KL penalty to the starting model. "
    "Routing replay (on by default) re-scores each completion through the experts that sampled it. Writes "
    "OUT/log.jsonl (reward, loss, KL, importance-ratio variance, share of tokens whose experts changed) and "
    "the trained model to OUT/final."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "model",
        metavar="CKPT",
        nargs="?",
        help="checkpoint directory (a run, a step or an HF folder) with tokenizer.json",
    )
    add(
        "--resume",
        metavar="DIR",
        help="continue the GRPO run in DIR (its options) from its newest checkpoint, up "
        "to --steps in total; give no CKPT",
    )
    add("--task", choices=sorted(TASKS), default="arithmetic", help="built-in task: prompts and exact checker")
    add("--operands-below", type=positive_int, default=50, help="arithmetic: a, b < this (default 50)")
    add("--reward", metavar="MODULE:FUNCTION", help="your reward(prompt, completion) -> number, on --task's prompts")
    add("--out", metavar="DIR", help="a new (or empty) directory for the run: log, checkpoints, final model")
    add("--steps", type=positive_int, help="rollout batches in total (default 200; with --resume, the run's)")
    add(
        "--save-every",
        type=int,
        default=0,
        help="a resumable checkpoint every N steps and after the last (default 0: only the final model)",
    )
    add("--prompts", type=positive_int, default=4, help="prompts per step (default 4)")
    add("--group", type=positive_int, default=8, help="completions per prompt, G (default 8)")
    add("--max-new-tokens", type=positive_int, default=8, help="completion length limit (default 8)")
    add("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    add("--clip-eps", type=float, default=0.2, help="ratio clip ε (default 0.2)")
    add("--kl-beta", type=float, default=0.04, help="KL penalty β (default 0.04)")
    add("--lr", type=float, default=1e-5, help="AdamW learning rate, constant (default 1e-5)")
    add("--updates-per-batch", type=positive_int, default=2, help="optimiser steps per rollout batch, μ (default 2)")
    add("--no-routing-replay", dest="routing_replay", action="store_false", help="re-score with the router's choice")
    add(
        "--stop-on-bad-reward",
        dest="skip_bad_rewards",
        action="store_false",
        help="stop at a reward that raises or is not a number (default: skip that completion, with a warning)",
    )
    add("--seed", type=int, default=0, help="prompts and sampling (default 0)")
    add("--tokenizer", metavar="PATH", help=common.TOKENIZER_HELP)


def run(args: argparse.Namespace) -> int:
    from deepmoe import from_pretrained

    if args.resume:
        if args.model or args.out:
            raise ValueError("--resume DIR continues that run: give neither CKPT nor --out")
        config = read_run_config(args.resume)
        if args.steps is not None:
            config.steps = args.steps
        out, source = Path(args.resume), None
        model = from_pretrained(out / "reference")
        tokenizer = common.load_tokenizer(str(read_last(out) or out / "reference"), args.tokenizer)
    else:
        if not args.model or not args.out:
            raise ValueError("give the checkpoint to start from (CKPT) and --out DIR, or --resume DIR")
        task_spec = {"task": args.task, "operands_below": args.operands_below, "reward": args.reward}
        config = GRPOConfig(
            steps=args.steps or 200, prompts_per_step=args.prompts, group=args.group,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, clip_eps=args.clip_eps,
            kl_beta=args.kl_beta, lr=args.lr, updates_per_batch=args.updates_per_batch,
            routing_replay=args.routing_replay, skip_bad_rewards=args.skip_bad_rewards, seed=args.seed,
            task=task_spec, save_every=args.save_every,
        )  # fmt: skip
        config.check()
        out, source = Path(args.out), checkpoint_dir(args.model)
        model = from_pretrained(source)
        tokenizer = common.load_tokenizer(str(source), args.tokenizer)
    task = task_from_spec(config.task)
    console = common.console()

    def show(entry: StepLog) -> None:
        console.print(
            f"step {entry.step + 1}/{config.steps}  reward {entry.reward:.3f}  loss {entry.loss:+.4f}  "
            f"kl {entry.kl:.4f}  ratio var {entry.ratio_variance:.2e}  changed routing {entry.changed_routing:.1%}"
        )

    grpo(model, tokenizer, task, config, out, source=source, on_step=show, resume=bool(args.resume),
         on_warning=lambda text: common.error_console().print(f"warning: {text}"))  # fmt: skip
    console.print(f"wrote {out / 'log.jsonl'} and the model to {out / 'final'}")
    return 0
