"""Peak resident memory of `deepmoe merge` (streaming) against the checkpoint size, and of the
naive merge (load both state dicts, average, save) for comparison. The merge: docs/design.md#s4-assembly-of-experts.

    python benchmarks/merge_memory.py [--experts 32] [--hidden 1024] [--keep DIR]

Two random bfloat16 checkpoints of one architecture (a few hundred MB each, in 100 MB shards) are
written to a temporary directory; each merge runs in a fresh Python process (Linux), which resets its
peak RSS after the imports (/proc/self/clear_refs) and reports its RSS then and its peak (VmHWM) after
the merge: the difference is what the merge itself needed.

The FP8 case: both checkpoints quantised as DeepSeek-V3 is published (linear weights e4m3 with a float32
`_scale_inv` per 128x128 block, quantization_config in config.json), merged back into FP8 (dequantised a
row block at a time, requantised block row by block row), against the size of one FP8 parent.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from _common import add_size_arguments, child_peak_rss, random_checkpoint, wide_config
from deepmoe.io.hf import expected_hf_shapes

CHILD = r"""
import json, sys
import torch
from deepmoe.io.checkpoint import load_checkpoint, save_checkpoint
from deepmoe.tools.merge import merge_checkpoints
a, b, out, how = sys.argv[1:]
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
if how == "fp8":
    merge_checkpoints([a, b], [0.5, 0.5], out, class_weights={"routed_experts": [0.2, 0.8]}, max_shard_size="100MB",
                      dtype="fp8")
elif how == "streaming":
    merge_checkpoints([a, b], [0.5, 0.5], out, class_weights={"routed_experts": [0.2, 0.8]}, max_shard_size="100MB")
else:
    config, wa = load_checkpoint(a)
    _, wb = load_checkpoint(b)
    save_checkpoint({n: (0.5 * wa[n].float() + 0.5 * wb[n].float()).to(wa[n].dtype) for n in wa}, config, out,
                    max_shard_size="100MB")
after = status("VmHWM")
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


def fp8_copy(source: Path, target: Path) -> int:
    """`source` with its linear weights quantised as DeepSeek-V3 publishes them (shard by shard); its bytes."""
    from deepmoe.io.fp8_blocks import quantize_fp8

    target.mkdir(parents=True)
    raw = json.loads((source / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}  # fmt: skip
    (target / "config.json").write_text(json.dumps(raw))
    index = source / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    total = 0
    for file in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
        out = {}
        for name, t in load_file(str(source / file)).items():
            if t.dim() == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight")):
                out[name], out[name + "_scale_inv"] = quantize_fp8(t)
                if weight_map:
                    weight_map[name + "_scale_inv"] = file
            else:
                out[name] = t
        save_file(out, str(target / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
    if weight_map:
        (target / index.name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    args = parser.parse_args()
    config = wide_config(args.experts, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        size = random_checkpoint(config, root / "a", 0)
        random_checkpoint(config, root / "b", 1)
        print(f"two random bfloat16 checkpoints of {size / 1e6:.0f} MB each ({args.experts} experts, H={args.hidden})")
        largest = max(math.prod(s) for s in expected_hf_shapes(config, set()).values()) * 2
        print(f"largest tensor on disk: {largest / 1e6:.1f} MB")
        print("| merge | RSS after imports (MB) | peak RSS in the merge (MB) | increase (MB) | / one checkpoint |")
        print("|---|---:|---:|---:|---:|")
        for how in ("streaming", "naive"):
            before, after = child_peak_rss(CHILD, str(root / "a"), str(root / "b"), str(root / f"out-{how}"), how)
            label = "deepmoe merge (streaming)" if how == "streaming" else "naive (load both, average, save)"
            up = after - before
            print(f"| {label} | {before / 1e6:.0f} | {after / 1e6:.0f} | {up / 1e6:.0f} | {up / size:.2f} |")
        fp8_size = fp8_copy(root / "a", root / "a8")
        fp8_copy(root / "b", root / "b8")
        shutil.rmtree(root / "out-streaming", ignore_errors=True)
        before, after = child_peak_rss(CHILD, str(root / "a8"), str(root / "b8"), str(root / "out-fp8"), "fp8")
        up = after - before
        print(
            f"| deepmoe merge, FP8 parents -> FP8 (streaming; / one FP8 parent of {fp8_size / 1e6:.0f} MB) | "
            f"{before / 1e6:.0f} | {after / 1e6:.0f} | {up / 1e6:.0f} | {up / fp8_size:.2f} |"
        )


if __name__ == "__main__":
    main()
