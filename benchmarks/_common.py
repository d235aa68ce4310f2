"""Shared by the model-level benchmarks: one checkpoint loaded into deepmoe and transformers, and
interleaved timing (every variant once per round, medians) so the ratios come from one run."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, from_pretrained, get_preset
from deepmoe.io.checkpoint import save_checkpoint
from deepmoe.io.hf import expected_shapes


def add_size_arguments(parser) -> None:
    """--experts, --hidden and --keep of the memory benchmarks (`wide_config` reads the first two)."""
    parser.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer (default 32)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--keep", default=None, help="write the checkpoints here instead of a temporary directory")


def wide_config(experts: int, hidden: int, layers: int | None = None) -> DeepSeekConfig:
    """tiny-v3 widened to `hidden` with `experts` routed experts of width 512 and no MTP: a checkpoint of a few
    hundred MB whose largest tensors are the fused experts (`layers`: the preset's when None)."""
    fields = get_preset("tiny-v3").to_dict()
    fields.update(hidden_size=hidden, num_nextn_predict_layers=0)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    fields["moe"].update(hidden_size=hidden, n_routed_experts=experts, moe_intermediate_size=512)
    return DeepSeekConfig.from_dict(fields)


def load_pair(checkpoint: str | None, preset: str = "tiny-v3"):
    """(deepmoe model, transformers model, description) holding the same float32 weights.

    Without a checkpoint, a random `preset` model without MTP modules (transformers has none) is saved
    and loaded by both.
    """
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint
        if path is None:
            torch.manual_seed(0)
            config = DeepSeekConfig.from_dict({**get_preset(preset).to_dict(), "num_nextn_predict_layers": 0})
            DeepSeekForCausalLM(config).save_pretrained(tmp)
            path = tmp
        ours = from_pretrained(path, dtype=torch.float32)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ours, theirs, checkpoint or f"random {preset} without MTP"


def interleaved_medians(
    cases: dict[str, dict[str, Callable[[], None]]], rounds: int, before_case: Callable[[str], None] = lambda case: None
) -> dict[tuple[str, str], float]:
    """Median seconds of every (case, variant); round 0 warms up and is discarded."""
    times: dict[tuple[str, str], list[float]] = {(c, v): [] for c, variants in cases.items() for v in variants}
    for r in range(rounds + 1):
        for case, variants in cases.items():
            before_case(case)
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                if r:
                    times[case, name].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def print_speed_table(
    cases: dict[str, dict[str, Callable]],
    medians: dict[tuple[str, str], float],
    tokens: dict[str, int],
    baseline: str = "transformers",
) -> None:
    print("| case | variant | ms | tokens/s | speed-up vs transformers |")
    print("|---|---|---:|---:|---:|")
    for case, variants in cases.items():
        base = medians[case, baseline]
        for name in variants:
            t = medians[case, name]
            print(f"| {case} | {name} | {t * 1e3:.1f} | {tokens[case] / t:,.0f} | {base / t:.2f}× |")


def child_peak_rss(code: str, *args: str) -> tuple[int, int]:
    """(RSS after the imports, peak RSS during the work) of `code` run in a fresh Python process, in bytes;
    `code` prints, as its last line, a JSON object with `before_kib` and `after_kib`."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    return rss["before_kib"] * 1024, rss["after_kib"] * 1024


def random_checkpoint(config: DeepSeekConfig, path: str | os.PathLike, seed: int = 0) -> int:
    """Write random bfloat16 weights of `config` to `path` (the selection bias float32, as DeepSeek ships it);
    returns the bytes of the weights."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=g).mul_(0.02)
        state[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    save_checkpoint(state, config, path, max_shard_size="100MB")
    return sum(t.numel() * t.element_size() for t in state.values())
