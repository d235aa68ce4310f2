"""The serving engine: continuous batching gives each request the tokens it gets alone (and `generate`'s), a
finished row is reused by a waiting request, a full queue refuses, a cancelled request frees its row."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from deepmoe.model.generate import generate
from deepmoe.tools.serve import Engine, GenerationRequest, QueueFull, Steering
from deepmoe.tools.serve.engine import Finished, TokenInfo, wait_idle
from serving import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [20, 21, 22, 23], [40, 41]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=97)


def _alone(model, prompt, n):
    return generate(model, torch.tensor([prompt]), n, eos_token_id=[])[0, len(prompt) :].tolist()


def test_concurrent_greedy_equals_each_alone(model):
    """Five requests of different lengths through 3 rows (so rows are reused mid-flight) get exactly the tokens
    each gets alone, and `generate`'s."""
    engine = Engine(model, max_batch=3, eos_token_id=[]).start()
    try:
        lengths = [6, 11, 4, 9, 7]
        alone = [
            [t.id for t in engine.generate(prompt=p, max_tokens=n)[1]] for p, n in zip(PROMPTS, lengths, strict=True)
        ]
        results: list = [None] * len(PROMPTS)

        def run(i: int) -> None:
            results[i] = [t.id for t in engine.generate(prompt=PROMPTS[i], max_tokens=lengths[i])[1]]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == alone
        assert alone == [_alone(model, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
        assert engine.stats.peak_batch == 3
    finally:
        engine.stop()


def test_a_finished_row_is_reused_while_others_decode(model):
    """max_batch 2: a short request queued behind a long one takes the row the first short one freed, and
    finishes while the long one is still decoding."""
    engine = Engine(model, max_batch=2, eos_token_id=[]).start()
    order: list[str] = []
    done = threading.Semaphore(0)

    def request(name: str, n: int) -> GenerationRequest:
        def emit(event) -> None:
            if isinstance(event, Finished):
                order.append(name)
                done.release()

        return GenerationRequest(prompt=[3, 4, 5], emit=emit, max_tokens=n)

    try:
        gate = threading.Event()
        blocker = GenerationRequest(prompt=[1], emit=lambda e: gate.wait(), max_tokens=1)
        engine.submit(blocker)  # holds the engine until all three are queued
        for name, n in (("short-1", 2), ("long", 40), ("short-2", 2)):
            engine.submit(request(name, n))
        gate.set()
        for _ in range(3):
            assert done.acquire(timeout=30)
        assert order == ["short-1", "short-2", "long"]
        assert engine.stats.peak_batch == 2
        assert wait_idle(engine)
    finally:
        engine.stop()


def test_full_queue_refuses_and_cancel_frees_the_row(model):
    engine = Engine(model, max_batch=1, max_queue=1, eos_token_id=[]).start()
    try:
        gate = threading.Event()
        finished = threading.Event()
        tokens: list[int] = []

        def emit(event) -> None:
            gate.wait()
            if isinstance(event, TokenInfo):
                tokens.append(event.id)
            if isinstance(event, Finished):
                finished.set()

        running = GenerationRequest(prompt=[1, 2], emit=emit, max_tokens=100)
        engine.submit(running)
        while engine.waiting:  # the engine took it, and waits in its emit
            time.sleep(0.01)
        engine.submit(GenerationRequest(prompt=[1], emit=lambda e: None, max_tokens=1))
        with pytest.raises(QueueFull, match="--max-queue 1"):
            engine.submit(GenerationRequest(prompt=[1], emit=lambda e: None, max_tokens=1))
        running.cancel()
        gate.set()
        assert finished.wait(30)
        assert len(tokens) < 100
        assert wait_idle(engine)
    finally:
        gate.set()
        engine.stop()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": []}, "prompt: is empty"),
        ({"prompt": [1, 97]}, "prompt: token id 97"),
        ({"prompt": list(range(60)) * 2}, "prompt: 120 tokens is longer than the context of 64"),
        ({"prompt": [1] * 60, "max_tokens": 10}, "max_tokens: .* exceed the context of 64"),
    ],
)
def test_bad_requests_are_refused(model, fields, message):
    engine = Engine(model, max_context=64)
    with pytest.raises(ValueError, match=message):
        engine.check(GenerationRequest(emit=lambda e: None, **fields))


def test_steering_applies_to_its_row_only(model):
    """A steered request batched with unsteered ones gets the tokens of the model with that global mask; the
    others get the unmasked model's; the returned routing never names a disabled expert."""
    layer = max(model.moe_layers().keys() & set(range(model.config.num_hidden_layers)))
    gate = model.moe_layers()[layer].gate
    engine = Engine(model, max_batch=4, eos_token_id=[]).start()
    try:
        plain = [_alone(model, p, 8) for p in PROMPTS[:3]]
        first_choice = engine.generate(prompt=PROMPTS[1], max_tokens=8, return_routing=True)[1]
        disabled = sorted({t.routing[engine.moe_layers.index(layer)][0] for t in first_choice})  # what it used
        gate.set_expert_mask(disabled=disabled)
        try:
            steered = _alone(model, PROMPTS[1], 8)
        finally:
            gate.clear_expert_mask()
        assert steered != plain[1]
        results: list = [None] * 3

        def run(i: int) -> None:
            extra = {"steering": Steering(disabled={layer: disabled}), "return_routing": True} if i == 1 else {}
            results[i] = engine.generate(prompt=PROMPTS[i], max_tokens=8, **extra)[1]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [[t.id for t in r] for r in results] == [plain[0], steered, plain[2]]
        used = {e for t in results[1] for e in t.routing[engine.moe_layers.index(layer)]}
        assert not used & set(disabled)
        assert all(len(t.routing) == len(engine.moe_layers) for t in results[1])
    finally:
        engine.stop()


def test_bad_steering_is_refused(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="steering names layers \\[0\\]"):
        engine.check(GenerationRequest(prompt=[1], emit=print, steering=Steering(disabled={0: [1]})))
    with pytest.raises(ValueError, match="layer 1: disabled experts .* out of range"):
        engine.check(GenerationRequest(prompt=[1], emit=print, steering=Steering(disabled={1: [99]})))


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-deepseek-moe", "tiny-v32"])
def test_batching_equals_generate_for_other_attention(preset):
    """MLA without the V3 routing, plain multi-head attention's (k, v) cache, and DSA's indexer keys: the
    engine pads and merges every cached tensor of a layer alike."""
    model = tiny_model(vocab_size=97, name=preset, num_hidden_layers=2, max_position_embeddings=64)
    engine = Engine(model, max_batch=2, eos_token_id=[]).start()
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = [t.id for t in engine.generate(prompt=PROMPTS[i], max_tokens=8)[1]]

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.stop()
    assert results == [_alone(model, p, 8) for p in PROMPTS[:4]]
