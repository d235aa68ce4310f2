"""Peak resident memory of `deepmoe export` of a distributed (DCP) training checkpoint against its largest
tensor and its total size, and of the naive conversion (load_checkpoint, then save_checkpoint) for comparison.
The layout and the export: docs/design.md#m5-hugging-face-checkpoints.

    python benchmarks/export_memory.py [--experts 32] [--hidden 1024] [--ranks 4] [--keep DIR]

A random bfloat16 model (the selection bias float32) is saved as a `--ranks`-rank DCP step (each rank's
file holding a slice of dim 0 of every tensor, as `dcp.save` with HuggingFaceStorageWriter writes them)
in a temporary directory; each conversion runs in a fresh Python process (Linux), which resets its peak
RSS after the imports and reports its RSS then and its peak (VmHWM) after the conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from _common import add_size_arguments, child_peak_rss, wide_config
from deepmoe.config import DeepSeekConfig
from deepmoe.io.distributed import DISTRIBUTED_DIR
from deepmoe.io.files import write_json
from deepmoe.io.hf import config_to_hf, expected_shapes

CHILD = r"""
import json, sys
import torch.distributed.checkpoint
from deepmoe.io.checkpoint import load_checkpoint, save_checkpoint
from deepmoe.tools.export import export_checkpoint
step, out, how = sys.argv[1:]
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
if how == "streaming":
    export_checkpoint(step, out, max_shard_size="100MB")
else:
    config, state = load_checkpoint(step)
    save_checkpoint(state, config, out, max_shard_size="100MB")
after = status("VmHWM")
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


def distributed_step(config: DeepSeekConfig, step: Path, ranks: int, seed: int = 0) -> tuple[int, int]:
    """Write random weights of `config` as a `ranks`-rank DCP step at `step`, one tensor at a time;
    returns (total bytes, bytes of the largest tensor)."""
    g = torch.Generator().manual_seed(seed)
    (step / DISTRIBUTED_DIR).mkdir(parents=True)
    write_json(step / "config.json", config_to_hf(config))
    shapes = expected_shapes(config)
    total = largest = 0
    for rank in range(ranks):
        pieces, offsets = {}, {}
        for name, shape in shapes.items():
            r0, r1 = rank * shape[0] // ranks, (rank + 1) * shape[0] // ranks
            if r1 > r0:
                dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
                pieces["model." + name] = torch.randn((r1 - r0, *shape[1:]), generator=g).mul_(0.02).to(dtype)
                offsets["model." + name] = {"saved_offsets": [r0] + [0] * (len(shape) - 1)}
        metadata = {"format": "pt", "DCP_SHARDING_INFO": json.dumps(offsets)}
        save_file(
            pieces, str(step / DISTRIBUTED_DIR / f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"), metadata
        )
        for name, shape in shapes.items():
            size = math.prod(shape) * (4 if name.endswith("e_score_correction_bias") else 2)
            largest = max(largest, size)
            total += size if rank == 0 else 0
    return total, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--ranks", type=int, default=4, help="ranks that wrote the checkpoint (default 4)")
    args = parser.parse_args()
    config = wide_config(args.experts, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        size, largest = distributed_step(config, root / "run" / "step-1", args.ranks)
        print(f"random bfloat16 DCP checkpoint of {size / 1e6:.0f} MB in {args.ranks} rank files "
              f"({args.experts} experts, H={args.hidden}); largest tensor {largest / 1e6:.1f} MB")  # fmt: skip
        print("| conversion | RSS after imports (MB) | peak RSS (MB) | increase (MB) | / largest tensor | / total |")
        print("|---|---:|---:|---:|---:|---:|")
        for how in ("streaming", "naive"):
            before, after = child_peak_rss(CHILD, str(root / "run" / "step-1"), str(root / f"out-{how}"), how)
            label = "deepmoe export (streaming)" if how == "streaming" else "naive (load_checkpoint, save_checkpoint)"
            up = after - before
            print(f"| {label} | {before / 1e6:.0f} | {after / 1e6:.0f} | {up / 1e6:.0f} | {up / largest:.2f} | "
                  f"{up / size:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
