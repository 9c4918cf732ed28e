"""The OpenAI-compatible endpoints, through the official openai client and httpx (the app in process)."""

from __future__ import annotations

import openai
import pytest

from tests.server.helpers import sse_events
from tests.server.inprocess import BASE_URL


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", http_client=app.client, api_key="unused", max_retries=0, timeout=60)


def test_completion(client, model_info):
    r = client.completions.create(model=model_info["base"], prompt="The chain rule says", max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason == "length" and isinstance(c.text, str)
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    colm = r.model_extra["colm"]
    assert colm["chains"] == model_info["n_chains"] and colm["reason"] == "default"
    assert colm["measured_latency_ms"] > 0 and colm["predicted_latency_ms"] >= 0


def test_greedy_is_deterministic_and_prompts_batch(client, model_info):
    """Greedy text repeats; a list of prompts gives one choice per prompt, in order, each equal to the
    prompt served alone."""
    base = dict(model=model_info["base"], max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt="Hello there", **base)
    assert client.completions.create(prompt="Hello there", **base).choices[0].text == a.choices[0].text
    many = client.completions.create(prompt=["Hello there", "Another prompt"], **base)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == a.choices[0].text
    assert many.usage.completion_tokens == 10


def test_completion_token_ids_and_echo(app, model_info):
    body = {"model": model_info["base"], "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "temperature": 0,
            "echo": True, "ignore_eos": True}
    r = app.client.post("/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["prompt_tokens"] == 5 and r["usage"]["completion_tokens"] == 6


def test_n_and_logprobs(client, model_info):
    r = client.completions.create(model=model_info["base"], prompt="Once", max_tokens=4, n=3, seed=7,
                                  temperature=1.0, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 4 == len(c.logprobs.token_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    again = client.completions.create(model=model_info["base"], prompt="Once", max_tokens=4, n=3, seed=7,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible


def test_completion_stream(client, model_info):
    stream = client.completions.create(model=model_info["base"], prompt="Stream this", max_tokens=8,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[0].model_extra["colm"]["reason"] == "default"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert usage.model_extra["colm"]["measured_latency_ms"] > 0
    whole = client.completions.create(model=model_info["base"], prompt="Stream this", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text  # the deltas add up to the non-streamed text


def test_stream_ends_with_done(app, model_info):
    body = {"model": model_info["base"], "prompt": "x", "max_tokens": 3, "stream": True}
    with app.client.stream("POST", "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-colm-chains"] == str(model_info["n_chains"])
        events = list(sse_events(r))
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert events[0]["colm"]["chains"] == model_info["n_chains"]


def test_chat(client, model_info):
    r = client.chat.completions.create(model=model_info["base"], max_tokens=5, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello!"}],
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.model_extra["colm"]["chains"] == model_info["n_chains"]


def test_chat_stream(client, model_info):
    kw = dict(model=f"{model_info['base']}:c1", max_tokens=6, temperature=0,
              messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["colm"] == {**chunks[0].model_extra["colm"], "chains": 1, "reason": "model"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
    whole = client.chat.completions.create(**kw)
    assert text == whole.choices[0].message.content


def test_chat_logprobs(client, model_info):
    r = client.chat.completions.create(model=model_info["base"], max_tokens=3, logprobs=True, top_logprobs=2,
                                       messages=[{"role": "user", "content": "Hi"}], extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_models(app, model_info):
    data = model_info["data"]
    n, base = model_info["n_chains"], model_info["base"]
    assert [m["id"] for m in data] == [base] + [f"{base}:c{k}" for k in range(1, n + 1)]
    params = [m["parameters"] for m in data[1:]]
    assert params == sorted(params) and len(set(params)) == n  # each chain adds parameters
    assert data[0]["parameters"] == params[-1]
    assert all(m["object"] == "model" and m["max_model_len"] > 0 for m in data)


def test_health_ready_docs(app):
    assert app.client.get("/health").json() == {"status": "ok"}
    assert app.client.get("/ready").status_code == 200
    assert app.client.get("/docs").status_code == 200
    spec = app.client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
            "/metrics"} <= set(spec["paths"])
