"""The OpenAI-compatible API, through the official `openai` client against a live uvicorn server (completions,
chat, streaming, logprobs and echo), and its errors through FastAPI's TestClient."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from deepmoe.data.readers import ChatRenderer
from deepmoe.model.generate import generate
from deepmoe.tools.serve import Engine, create_app
from deepmoe.tools.serve.engine import wait_idle
from serving import live_server, tiny_model, tiny_tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    engine = Engine(model, max_batch=4, max_context=96, eos_token_id=[])
    app = create_app(engine, tokenizer=tokenizer, chat=ChatRenderer(None, "", EOT), model_name="tiny")
    with live_server(app) as url:
        yield model, tokenizer, engine, app, url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[4] + "/v1", api_key="none", max_retries=0)


def _greedy(model, ids, n):
    return generate(model, torch.tensor([ids]), n, eos_token_id=[])[0, len(ids) :].tolist()


def test_completions_greedy_equals_generate(served, client):
    model, tokenizer, *_ = served
    prompt = "the quick brown fox"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    expected = _greedy(model, tokenizer.encode(prompt).ids, 8)
    assert out.choices[0].text == tokenizer.decode(expected)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    ids = client.completions.create(model="tiny", prompt=[[1, 2, 3], [7, 8]], max_tokens=5, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1]
    assert ids.choices[1].text == tokenizer.decode(_greedy(model, [7, 8], 5))


def test_concurrent_clients_get_their_own_tokens(served, client):
    model, tokenizer, *_ = served
    prompts = ["the cat", "a dog ran to the", "lazy", "the mat; the dog"]
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i, temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, prompt in enumerate(prompts):
        assert results[i].choices[0].text == tokenizer.decode(_greedy(model, tokenizer.encode(prompt).ids, 6 + i))


def test_streaming_equals_the_whole_response(client):
    kwargs = {"model": "tiny", "prompt": "the lazy dog", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(client):
    kwargs = {"model": "tiny", "prompt": "the", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_stop_strings_cut_the_text(served, client):
    model, tokenizer, *_ = served
    full = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    out = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_echo_logprobs_are_the_prompts_loglikelihood(served, client):
    """What lm-evaluation-harness's loglikelihood requests send: echo, max_tokens=0, logprobs."""
    model, tokenizer, *_ = served
    ids = tokenizer.encode("the quick brown fox jumps").ids
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    expected = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert out.choices[0].text == tokenizer.decode(ids)
    gen = client.completions.create(model="tiny", prompt="the", max_tokens=3, logprobs=3, temperature=0)
    glp = gen.choices[0].logprobs
    assert len(glp.tokens) == 3 and all(v <= 0 for v in glp.token_logprobs)
    assert all(
        max(top.values()) == pytest.approx(v, abs=1e-5)
        for top, v in zip(glp.top_logprobs, glp.token_logprobs, strict=True)
    )


def test_chat_and_chat_streaming(served, client):
    model, tokenizer, *_ = served
    messages = [{"role": "user", "content": "the quick brown fox"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)  # fmt: skip
    ids = tokenizer.encode(ChatRenderer(None, "", EOT).render(messages, add_generation_prompt=True)).ids
    assert out.choices[0].message.content == tokenizer.decode(_greedy(model, ids, 6))
    assert out.choices[0].message.role == "assistant"
    assert len(out.choices[0].logprobs.content) == 6
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(served[4] + "/health").json()["status"] == "ok"


def test_a_client_leaving_mid_stream_frees_its_row(served, client):
    engine, url = served[2], served[4]
    body = {"prompt": "the", "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    assert wait_idle(engine, timeout=20)
    assert client.completions.create(model="tiny", prompt="the", max_tokens=2, temperature=0).choices[0].text


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"prompt": "the " * 200, "max_tokens": 1}, 400, "prompt"),
        ("/v1/completions", {"prompt": "the", "max_tokens": 95}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "the", "bogus": 1}, 400, "bogus"),
        ("/v1/completions", {"prompt": "the", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "the", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "the", "logprobs": 50}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "the", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"prompt": [1, 5000]}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {}, 400, "prompt"),
        ("/v1/completions", {"prompt": "the", "model": "other"}, 404, "model"),
        ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "the", "seed": 2**70}, 400, "seed"),
        ("/v1/completions", {"prompt": "the", "stream": "yes"}, 400, "stream"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/completions", {"prompt": "the", "deepmoe": {"colour": 1}}, 400, "deepmoe.colour"),
    ],
)
def test_errors_in_openai_shape(served, path, body, status, param):
    response = TestClient(served[3]).post(path, json=body)  # no lifespan: the live server's engine keeps running
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_and_unknown_routes(served):
    http = TestClient(served[3])
    response = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert http.get("/v1/nothing").status_code == 404
    assert http.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "temperature": 0}).status_code == 200


def test_a_full_queue_answers_503(served):
    model, tokenizer = served[0], served[1]
    engine = Engine(model, max_batch=1, max_queue=1, eos_token_id=[])
    app = create_app(engine, tokenizer=tokenizer, model_name="tiny")
    entered, gate = threading.Event(), threading.Event()
    original = engine._advance

    def held(*args):  # hold the engine on the first request's first token
        entered.set()
        gate.wait()
        return original(*args)

    engine._advance = held
    results = []

    def post(prompt: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.append(http.post("/v1/completions", json={"prompt": prompt})))
        thread.start()
        return thread

    try:
        with TestClient(app) as http:
            first = post("a")
            assert entered.wait(20)
            second = post("b")
            while engine.waiting < 1:
                time.sleep(0.01)
            response = http.post("/v1/completions", json={"prompt": "c"})
            assert response.status_code == 503
            assert "--max-queue 1" in response.json()["error"]["message"]
            gate.set()
            first.join()
            second.join()
            assert [r.status_code for r in results] == [200, 200]
    finally:
        gate.set()


def test_per_request_steering_and_routing(served, client, tmp_path):
    """`deepmoe.disabled` and a steer.json file steer that request only; `return_routing` gives each new token's
    experts per MoE layer."""
    engine = served[2]
    layer = engine.moe_layers[-1]
    kwargs = {"model": "tiny", "prompt": "the quick", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(**kwargs, extra_body={"deepmoe": {"return_routing": True}})
    routed = plain.choices[0].model_extra["deepmoe"]
    assert routed["layers"] == engine.moe_layers and len(routed["routing"]) == 6
    used = sorted({token[-1][0] for token in routed["routing"]})
    steer = {"deepmoe": {"disabled": {str(layer): used}, "return_routing": True}}
    steered = client.completions.create(**kwargs, extra_body=steer)
    experts = {e for token in steered.choices[0].model_extra["deepmoe"]["routing"] for e in token[-1]}
    assert not experts & set(used)
    assert steered.choices[0].text != plain.choices[0].text
    path = tmp_path / "steer.json"
    path.write_text(json.dumps({"format": "deepmoe-steering", "version": 1, "action": "disable",
                                "layers": {str(layer): used}}))  # fmt: skip
    from_file = client.completions.create(**kwargs, extra_body={"deepmoe": {"steer": str(path)}})
    assert from_file.choices[0].text == steered.choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == plain.choices[0].text  # nothing left behind
    bad = TestClient(served[3]).post("/v1/completions", json={"prompt": "a", "deepmoe": {"disabled": {"0": [1]}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "deepmoe"
    missing = TestClient(served[3]).post("/v1/completions", json={"prompt": "a", "deepmoe": {"steer": "/nope.json"}})
    assert missing.status_code == 400 and "deepmoe.steer" in missing.json()["error"]["message"]


def test_a_client_leaving_before_the_response_frees_its_row(served):
    model, tokenizer = served[0], served[1]
    engine = Engine(model, max_batch=2, eos_token_id=[])
    original = engine._advance

    def slow(*args):  # 20 ms a token: the request would take ~2.4 s
        time.sleep(0.02)
        return original(*args)

    engine._advance = slow
    with live_server(create_app(engine, tokenizer=tokenizer, model_name="tiny")) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 120}, timeout=0.3)
        start = time.monotonic()
        assert wait_idle(engine, timeout=5)
        assert time.monotonic() - start < 1.2  # cancelled, not run to its end
