"""Shared by the serving tests: a tiny random model (a large init std, so greedy has no near-ties), a byte-level
BPE tokenizer for it, and a live uvicorn server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import torch

from configs import tiny_preset
from corpora import byte_level_bpe
from deepmoe.model.decoder import DeepSeekForCausalLM

TEXT = "the quick brown fox jumps over the lazy dog. a cat sat on the mat; the dog ran to the cat. " * 20


def tiny_model(vocab_size: int = 300, name: str = "tiny-v3", **overrides) -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    fields = {"num_hidden_layers": 3, "vocab_size": vocab_size, "initializer_range": 0.2,
              "max_position_embeddings": 128}  # fmt: skip
    return DeepSeekForCausalLM(tiny_preset(name, **{**fields, **overrides})).eval()


def tiny_tokenizer():
    return byte_level_bpe(TEXT, vocab_size=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Run `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
