"""`deepmoe data prepare` throughput and memory: a JSON Lines file of about --size-mb MB built from the bundled
corpus (Shakespeare and the standard library's sources, documents of 2-8 KB each given a different numbered
header so no two are identical), tokenized with a byte-level BPE of 8192 tokens trained on the bundled corpus,
with 1 and 2 worker processes. Each run is a fresh Python process; its peak RSS (the main process, and the
largest worker) is measured; the goal is < 500 MB.

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

CHILD = """  # like _common.child_peak_rss, with the seconds and the largest worker's peak
import json, resource, sys, time
from deepmoe.cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
status = main(sys.argv[1:])
seconds = time.perf_counter() - start
assert status == 0
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kib": workers, "seconds": seconds}))
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


if __name__ == "__main__":
    main()
