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


def small_v3_config() -> DeepSeekConfig:
    """A V3-style model of the size issue 19 measures: 4 layers (the first dense), hidden 512, MLA with 8 heads
    (q_lora 192, kv_lora 128, nope/rope/v 64/32/64), 64 routed experts of width 256 in 8 groups (top-4 groups,
    top-8 experts, sigmoid, bias), one shared expert, vocabulary 8192, no MTP."""
    fields = get_preset("tiny-v3").to_dict()
    fields.update(
        hidden_size=512, intermediate_size=1024, vocab_size=8192, max_position_embeddings=4096,
        num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, num_nextn_predict_layers=0,
    )  # fmt: skip
    fields["moe"].update(
        hidden_size=512, n_routed_experts=64, moe_intermediate_size=256, num_experts_per_tok=8, n_group=8,
        topk_group=4,
    )  # fmt: skip
    return DeepSeekConfig.from_dict(fields)


MODELS = {"small-v3": small_v3_config, "tiny-v3": lambda: get_preset("tiny-v3")}
"""The random models the model-level benchmarks take with --model (small-v3: issue 19's V3-style shape)."""


def load_pair(checkpoint: str | None, model: str = "small-v3", device: str = "cpu", dtype=torch.float32):
    """(deepmoe model, transformers model, description) holding the same weights, on `device` in `dtype`.

    Without a checkpoint, a random `model` (a name in MODELS) without MTP modules (transformers has none) is
    saved and loaded by both.
    """
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint
        if path is None:
            torch.manual_seed(0)
            config = DeepSeekConfig.from_dict({**MODELS[model]().to_dict(), "num_nextn_predict_layers": 0})
            DeepSeekForCausalLM(config).save_pretrained(tmp)
            path = tmp
        ours = from_pretrained(path, dtype=dtype, device=device)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return ours, theirs, checkpoint or f"random {model} without MTP"


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
