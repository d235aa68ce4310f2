"""Peak resident memory of inference and analysis on a checkpoint of several GB, loaded with
`from_pretrained(path, mmap=True)` (weights memory-mapped, experts stacked layer by layer) and as today (the
whole state dict in memory), against the checkpoint's size.

    python benchmarks/big_model.py [--experts 128] [--hidden 1024] [--layers 8] [--fp8] [--keep DIR]

A random bfloat16 checkpoint (V3 routing, DeepSeek's per-expert layout, 1 GB shards; with --fp8 every 2-D
projection block-quantised to FP8 as DeepSeek ships V3) is written to a temporary directory (check
`df -h /tmp`: about the checkpoint's size is needed). Each case runs in a fresh Python process (Linux), which
resets its peak RSS after the imports (/proc/self/clear_refs) and reports its peak (VmHWM) after the work:
`load` (from_pretrained), `forward` (load + one forward pass on a 16-token prompt), `analyze` (load +
`deepmoe.tools.analyze.analyze` of 2 sources × 2 batches of 4 × 64 tokens). The peak counts the mapped file
pages the process touched (clean pages, which the OS may drop and re-read) as well as its own memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from _common import wide_config
from deepmoe.io.checkpoint import SafetensorsCheckpoint, save_checkpoint
from deepmoe.io.hf import expected_shapes

CHILD = r"""
import json, sys, time
import torch
from deepmoe.model import DeepSeekForCausalLM
from deepmoe.tools.analyze import analyze
path, case, how = sys.argv[1:]
torch.set_num_threads(2)
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
start = time.perf_counter()
model = DeepSeekForCausalLM.from_pretrained(path, dtype=torch.bfloat16, mmap=how == "mmap")
g = torch.Generator().manual_seed(0)
V = model.config.vocab_size
with torch.no_grad():
    if case == "forward":
        model(torch.randint(0, V, (1, 16), generator=g))
    elif case == "analyze":
        batches = {s: [torch.randint(0, V, (4, 64), generator=g) for _ in range(2)] for s in ("a", "b")}
        analyze(model, batches)
seconds = time.perf_counter() - start
after = status("VmHWM")
print(json.dumps({"before_kib": before, "after_kib": after, "seconds": seconds}))
"""


class RandomWeights(Mapping):
    """Random weights of a config read one tensor at a time (a `LazyTensors` for `save_checkpoint`: shapes and
    dtypes known without building anything), bfloat16 (the selection bias float32, as DeepSeek ships it)."""

    def __init__(self, config):
        self.shapes = expected_shapes(config)
        self._last: tuple[str, torch.Tensor] | None = None

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:  # save_checkpoint asks again for each expert's piece
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            self._last = (name, torch.randn(self.shapes[name], generator=g).mul_(0.02).to(self.dtype(name)))
        return self._last[1]


def write_checkpoint(config, path: Path) -> int:
    """A random checkpoint of `config` at `path`; returns the bytes of its safetensors files."""
    save_checkpoint(RandomWeights(config), config, path, max_shard_size="1GB", check_finite=False)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_child(path: Path, case: str, how: str) -> tuple[int, float]:
    """(peak RSS increase in bytes, seconds) of one case in a fresh process."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), case, how], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{case} ({how}) failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return (out["after_kib"] - out["before_kib"]) * 1024, out["seconds"]


def _quantize_files(path: Path) -> None:
    """Rewrite each shard with its 2-D projections as FP8 + `_scale_inv` (128 × 128 blocks), as V3 ships."""
    from safetensors.torch import save_file

    from deepmoe.io.fp8_blocks import quantize_fp8

    with SafetensorsCheckpoint(path) as ckpt:
        by_file: dict[str, list[str]] = {}
        for name, file in ckpt.weight_map.items():
            by_file.setdefault(file, []).append(name)
        index = {}
        for file, names in by_file.items():
            out = {}
            for name in names:
                t = ckpt.get(name)
                if t.dim() == 2 and "proj" in name and "embed" not in name:
                    out[name], out[name + "_scale_inv"] = quantize_fp8(t.float(), (128, 128))
                    index[name + "_scale_inv"] = file
                else:
                    out[name] = t.clone()
                index[name] = file
            tmp = path / (file + ".tmp")
            save_file(out, str(tmp), metadata={"format": "pt"})
            del out
            (path / file).unlink()
            tmp.rename(path / file)
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        data = json.loads(index_file.read_text())
        data["weight_map"] = index
        index_file.write_text(json.dumps(data))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128, help="routed experts per MoE layer (default 128)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--fp8", action="store_true", help="also an FP8 block-quantised copy of the checkpoint")
    parser.add_argument("--keep", default=None, help="write the checkpoints here instead of a temporary directory")
    args = parser.parse_args()
    config = wide_config(args.experts, args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        checkpoints = {"bf16": root / "bf16"}
        sizes = {"bf16": write_checkpoint(config, checkpoints["bf16"])}
        if args.fp8:
            checkpoints["fp8"] = root / "fp8"
            shutil.copytree(checkpoints["bf16"], checkpoints["fp8"])
            _quantize_files(checkpoints["fp8"])
            sizes["fp8"] = sum(f.stat().st_size for f in checkpoints["fp8"].glob("*.safetensors"))
        print(f"random checkpoints written in {time.perf_counter() - start:.0f} s: "
              + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items())
              + f" ({args.layers} layers, {args.experts} experts of width 512, H={args.hidden}; "
              f"bf16 in memory: {sizes['bf16'] / 1e9:.2f} GB)")  # fmt: skip
        print("| checkpoint | case | load | peak RSS increase (GB) | / checkpoint size | seconds |")
        print("|---|---|---|---:|---:|---:|")
        for kind, path in checkpoints.items():
            for case in ("load", "forward", "analyze"):
                for how in ("mmap", "copy"):
                    up, seconds = run_child(path, case, how)
                    print(f"| {kind} | {case} | {how} | {up / 1e9:.2f} | {up / sizes[kind]:.2f} | {seconds:.1f} |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
