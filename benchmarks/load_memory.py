"""Peak resident memory of `from_pretrained(path, dtype=torch.bfloat16)` against the checkpoint size, and of the
old way to load (an eager, randomly initialised float32 model, then the checkpoint's tensors assigned) for
comparison.

    python benchmarks/load_memory.py [--experts 32] [--hidden 1024] [--layers 4] [--keep DIR]

A random bfloat16 checkpoint of a few hundred MB (V3 routing, in 100 MB shards) is written to a temporary
directory; each load runs in a fresh Python process (Linux), which resets its peak RSS after the imports
(/proc/self/clear_refs) and reports its RSS then and its peak (VmHWM) after the load: the difference is what
the load itself needed. The model stays alive when the peak is read, so at least the checkpoint's size is needed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import add_size_arguments, child_peak_rss, random_checkpoint, wide_config

CHILD = r"""
import json, sys
import torch
from deepmoe.io.checkpoint import load_checkpoint
from deepmoe.model import DeepSeekForCausalLM
path, how = sys.argv[1:]
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
if how == "meta":
    model = DeepSeekForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
else:  # the way from_pretrained loaded before it built on the meta device
    config, state = load_checkpoint(path, dtype=torch.bfloat16)
    model = DeepSeekForCausalLM(config)
    model.load_state_dict(state, assign=True)
    del state
after = status("VmHWM")
assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
print(json.dumps({"before_kib": before, "after_kib": after}))
"""

LABELS = {
    "meta": "from_pretrained(dtype=bfloat16) (meta build, tensors assigned)",
    "eager": "eager float32 build, then load_state_dict(assign=True) (before)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    args = parser.parse_args()
    config = wide_config(args.experts, args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        size = random_checkpoint(config, root / "ckpt")
        print(f"a random bfloat16 checkpoint of {size / 1e6:.0f} MB ({args.layers} layers, {args.experts} experts, "
              f"H={args.hidden})")  # fmt: skip
        print("| load | checkpoint (MB) | RSS after imports (MB) | peak RSS increase (MB) | ratio |")
        print("|---|---:|---:|---:|---:|")
        for how in ("meta", "eager"):
            before, after = child_peak_rss(CHILD, str(root / "ckpt"), how)
            up = after - before
            print(f"| {LABELS[how]} | {size / 1e6:.0f} | {before / 1e6:.0f} | {up / 1e6:.0f} | {up / size:.2f} |")


if __name__ == "__main__":
    main()
