"""Serving under load (loopback only, bounded): N concurrent clients against `deepmoe serve`'s app on a free
port, each sending the same number of greedy completions; every request must complete. Prints, per batch size,
the requests' median and p90 latency and the generated tokens per second of the whole server.

    .venv/bin/python benchmarks/serve.py runs/demo --clients 1 4 8 --requests 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from deepmoe.data import load_tokenizer
from deepmoe.model import from_pretrained
from deepmoe.tools.serve import Engine, chat_renderer, create_app

PROMPTS = ["The king", "To be, or not", "My lord, I", "What is the", "Good morrow", "O, she", "Then", "Now is the"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                response = http.post(url + "/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code != 200:
                        errors.append(response.text)
                    else:
                        latencies.append(elapsed)
                        tokens[0] += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors or len(latencies) != clients * requests:
        sys.exit(f"{len(errors)} requests failed: {errors[:1]}")
    return latencies, tokens[0], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint or run directory with tokenizer.json")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = from_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    print(f"model {Path(args.model).resolve().name}, {torch.get_num_threads()} torch threads, CPU, "
          f"{args.requests} requests per client of {args.max_tokens} new tokens, greedy")  # fmt: skip
    print("| clients (= max batch) | requests | median latency s | p90 latency s | tokens/s | peak batch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        engine = Engine(model, max_batch=clients, eos_token_id=[])
        app = create_app(engine, tokenizer=tokenizer, chat=chat_renderer(args.model, tokenizer), model_name="bench")
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        _load(f"http://127.0.0.1:{port}", 1, 1, 4)  # warm-up
        latencies, tokens, wall = _load(f"http://127.0.0.1:{port}", clients, args.requests, args.max_tokens)
        server.should_exit = True
        thread.join()
        p90 = statistics.quantiles(latencies, n=10)[-1] if len(latencies) > 1 else latencies[0]
        print(f"| {clients} | {len(latencies)} | {statistics.median(latencies):.2f} | {p90:.2f} | "
              f"{tokens / wall:.1f} | {engine.stats.peak_batch} |")  # fmt: skip


if __name__ == "__main__":
    main()
