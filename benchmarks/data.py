"""`deepmoe data prepare` throughput and memory, and the loader against training: a JSON Lines file of about
--size-mb MB built from the bundled corpus (Shakespeare and the standard library's sources, documents of 2-8 KB
each given a different numbered header so no two are identical), tokenized with a byte-level BPE of 8192 tokens
trained on the bundled corpus, with 1 and 2 worker processes. Each run is a fresh Python process; its peak RSS
(the main process, and the largest worker) is measured; the goal is < 500 MB.

Then, on the prepared directory: the training loader's batches/s (`PreparedCorpus.batches`, memory-mapped
shards, tiny-v3's default batch of 16 × 256) against tiny-v3's optimizer steps/s on the same batches (AdamW,
forward + backward, one process), measured in turns in one run; the goal is a loader at least 20× faster. And
`deepmoe train --data DIR --steps 20` in a fresh process, with its peak RSS beside the size of the shards.

    python benchmarks/data.py --size-mb 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from deepmoe.data import TextSource, bundled_corpus, get_tokenizer
from deepmoe.data.sources import _code_sources

CHILD = """  # peak RSS from /proc (ru_maxrss would carry the parent's peak across exec), seconds, largest worker
import json, resource, sys, time
from deepmoe.cli import main
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
before = kib("VmRSS:")
start = time.perf_counter()
status = main(sys.argv[1:])
seconds = time.perf_counter() - start
assert status == 0
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": kib("VmHWM:"), "workers_kib": workers, "seconds": seconds}))
"""


def corpus() -> list[TextSource]:
    try:
        return bundled_corpus()
    except ValueError:  # no Shakespeare package: the standard library alone
        return _code_sources()


def build_jsonl(path: Path, size_mb: float) -> int:
    """Write documents cut from the corpus texts (with a numbered header) until the file has `size_mb` MB."""
    texts = [s.text for s in corpus()]
    target, written, documents = size_mb * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for text in texts:
                step = 2000 + (documents * 997) % 6000
                for start in range(0, len(text), step):
                    line = json.dumps({"text": f"# document {documents}, line {start}\n" + text[start : start + step]})
                    f.write(line + "\n")
                    written += len(line) + 1
                    documents += 1
                    if written >= target:
                        return documents
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200, help="size of the JSON Lines input (default 200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)")
    parser.add_argument("--steps", type=int, default=10, help="turns of the loader/training comparison (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "input.jsonl"
        documents = build_jsonl(data, args.size_mb)
        get_tokenizer(corpus(), 8192).save(str(tmp / "tokenizer.json"))
        size = data.stat().st_size
        print(f"input: {size / 1e6:.0f} MB of JSON Lines, {documents:,} documents; tokenizer: byte-level BPE, 8192")
        print("| workers | tokens | seconds | tokens/s | MB/s of input | RSS after imports (MB) | peak RSS main (MB) "
              "| peak RSS worker (MB) |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for workers in args.workers:
            out = tmp / f"out-{workers}"
            argv = ["data", "prepare", str(data), "--out", str(out), "--tokenizer", str(tmp / "tokenizer.json"),
                    "--workers", str(workers), "--no-progress"]  # fmt: skip
            result = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
            rss = json.loads(result.stdout.strip().splitlines()[-1])
            index = json.loads((out / "index.json").read_text())
            tokens = sum(s["tokens"] for s in index["splits"].values())
            peak = rss["after_kib"] * 1024
            cells = [
                f"{tokens:,}",
                f"{rss['seconds']:.1f}",
                f"{tokens / rss['seconds']:,.0f}",
                f"{size / 1e6 / rss['seconds']:.2f}",
                f"{rss['before_kib'] / 1024:.0f}",
                f"{peak / 2**20:.0f}",
                f"{rss['workers_kib'] / 1024:.0f}",
            ]
            print(f"| {workers} | " + " | ".join(cells) + " |")
        loader_against_training(tmp / f"out-{args.workers[0]}", args.steps)


def loader_against_training(prepared: Path, steps: int, batch_size: int = 16, seq_len: int = 256) -> None:
    """Batches/s of the loader against optimizer steps/s of tiny-v3 on them, then a real `deepmoe train` run."""
    import time

    import torch

    from deepmoe import DeepSeekForCausalLM
    from deepmoe.data import PreparedCorpus
    from deepmoe.train.config import TrainConfig, build_model_config, build_optimizer

    corpus = PreparedCorpus([(str(prepared), 1.0)])
    loader = corpus.batches(batch_size, seq_len, seed=0)
    config = TrainConfig(out=str(prepared.parent / "unused"))
    model = DeepSeekForCausalLM(build_model_config(config, corpus.vocab_size, corpus.eot_id)).train()
    optimizer = build_optimizer(model, config)
    loader_s, train_s = [], []
    for _ in range(steps):  # in turns: the machine's load falls on both alike
        start = time.perf_counter()
        batches = [next(loader) for _ in range(20)]
        loader_s.append((time.perf_counter() - start) / 20)
        start = time.perf_counter()
        optimizer.zero_grad()
        model(batches[0], labels=batches[0]).loss.backward()
        optimizer.step()
        train_s.append(time.perf_counter() - start)
    loader_s, train_s = sorted(loader_s)[len(loader_s) // 2], sorted(train_s)[len(train_s) // 2]
    print(f"\nloader against training, tiny-v3, batch {batch_size} x {seq_len}, {torch.get_num_threads()} threads "
          f"(medians of {steps} turns)")  # fmt: skip
    print("| what | per batch (ms) | batches/s | loader / training |")
    print("|---|---:|---:|---:|")
    ratio = train_s / loader_s
    print(f"| loader (memory-mapped shards) | {loader_s * 1e3:.2f} | {1 / loader_s:,.0f} | {ratio:,.0f}x |")
    print(f"| training step (forward + backward + AdamW) | {train_s * 1e3:.0f} | {1 / train_s:.2f} | 1x |")
    shards = sum(p.stat().st_size for p in prepared.glob("*.bin"))
    argv = ["train", "--data", str(prepared), "--steps", "20", "--out", str(prepared.parent / "run"), "--no-progress",
            "--warmup-steps", "2", "--eval-every", "0", "--final-eval-batches", "2"]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((prepared.parent / "run" / "report.json").read_text())
    print(f"\ndeepmoe train --data DIR --steps 20 (tiny-v3, 16 x 256): {rss['seconds']:.0f} s, final train loss "
          f"{report['final_train_lm_loss']:.3f}, held-out loss {report['heldout_loss']:.3f}; peak RSS "
          f"{rss['after_kib'] / 1024:.0f} MB (after imports {rss['before_kib'] / 1024:.0f} MB) with "
          f"{shards / 1e6:.0f} MB of shards")  # fmt: skip


if __name__ == "__main__":
    main()
