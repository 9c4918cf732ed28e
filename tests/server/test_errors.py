"""Every error case: its status, OpenAI's error shape, and that none of them is a 500."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEYS
from tests.server.helpers import assert_error, post
from tests.server.inprocess import BASE_URL


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 1000), ("max_tokens", 0),
    ("logprobs", 50), ("presence_penalty", 3), ("repetition_penalty", 0), ("min_p", 2), ("top_k", -2),
    ("stop", ["x"] * 100), ("prompt", 12), ("chains", "two"), ("latency_budget_ms", -5),
])
def test_invalid_parameter(app, model_info, field, value):
    body = {"model": model_info["base"], "prompt": "hi", "max_tokens": 2, field: value}
    err = assert_error(post(app, body), 400, "invalid_value")
    assert err["param"] == field and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"), ({"chains": 0}, "chains"), ({"chains": 99}, "chains"),
    ({"tier": "platinum"}, "tier"), ({"suffix": "x"}, "suffix"), ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"logit_bias": {"one": 5}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 2, "stream": True}, "best_of"), ({"stop": [""]}, "stop"),
    ({"response_format": {"type": "xml"}}, "response_format"), ({"guided_json": {"type": "foo"}}, "guided_json"),
    ({"guided_regex": "(a"}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
])
def test_invalid_request(app, model_info, body, param):
    full = {"model": model_info["base"], "prompt": "hi", "max_tokens": 2, **body}
    assert_error(post(app, full), 400, param=param)


@pytest.mark.parametrize("header,value,param", [
    ("X-CoLM-Chains", "abc", "X-CoLM-Chains"), ("X-CoLM-Chains", "0", "chains"),
    ("X-CoLM-Latency-Budget-Ms", "soon", "X-CoLM-Latency-Budget-Ms"),
    ("X-CoLM-Latency-Budget-Ms", "-1", "X-CoLM-Latency-Budget-Ms"), ("X-CoLM-Tier", "nope", "tier"),
])
def test_invalid_headers(app, model_info, header, value, param):
    """A header that is not a number names the header; a number or name out of range names the field
    it stands for."""
    assert_error(post(app, {"model": model_info["base"], "prompt": "hi"}, {header: value}), 400, param=param)


def test_chat_errors(app, model_info):
    base = model_info["base"]
    chat = dict(path="/v1/chat/completions")
    assert_error(post(app, {"model": base, "messages": []}, **chat), 400, param="messages")
    assert_error(post(app, {"model": base, "messages": [{"role": "wizard", "content": "x"}]}, **chat), 400,
                 param="messages")
    assert_error(post(app, {"model": base, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, **chat), 400, param="messages")
    msgs = [{"role": "user", "content": "x"}]
    assert_error(post(app, {"model": base, "messages": msgs, "tools": [{"type": "function"}]}, **chat),
                 400, param="tools")
    assert_error(post(app, {"model": base, "messages": msgs, "top_logprobs": 2}, **chat), 400, param="top_logprobs")


def test_too_long_names_the_limit(app, model_info):
    limit, base = model_info["max_model_len"], model_info["base"]
    err = assert_error(post(app, {"model": base, "prompt": [1] * limit, "max_tokens": 1}), 400,
                       "context_length_exceeded")
    assert str(limit) in err["message"]
    err = assert_error(post(app, {"model": base, "prompt": "hi", "max_tokens": limit}), 400,
                       "context_length_exceeded", param="max_tokens")
    assert str(limit) in err["message"]
    chat = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": limit}
    assert_error(post(app, chat, path="/v1/chat/completions"), 400, "context_length_exceeded")


def test_prompt_token_limit(auth_app):
    h = {"Authorization": f"Bearer {API_KEYS[0]}"}
    err = assert_error(post(auth_app, {"model": "x", "prompt": [1] * 65}, h), 400, "context_length_exceeded")
    assert "64" in err["message"]


def test_unknown_model_is_404(app, model_info):
    client = openai.OpenAI(base_url=f"{BASE_URL}/v1", http_client=app.client, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    assert_error(post(app, {"model": f"{model_info['base']}:c0", "prompt": "hi"}), 404, "model_not_found")
    assert_error(app.client.get("/v1/nothing-here"), 404)


def test_bad_json_and_method(app):
    r = app.client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_error(app.client.get("/v1/completions"), 405)
    assert_error(app.client.post("/v1/completions", json=[1, 2]), 400)


def test_body_limit(auth_app):
    h = {"Authorization": f"Bearer {API_KEYS[0]}"}
    big = {"model": "x", "prompt": "a" * 8000}
    assert_error(post(auth_app, big, h), 413, "request_too_large")

    def chunked():  # no Content-Length: the server counts the bytes as they arrive
        yield b'{"model": "x", "prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = auth_app.client.post("/v1/completions", content=chunked(), headers={**h, "content-type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_api_keys(auth_app):
    c = auth_app.client
    base = c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEYS[1]}"})
    assert base.status_code == 200  # the key from the file
    model = base.json()["data"][0]["id"]
    assert_error(c.get("/v1/models"), 401, "invalid_api_key")
    assert_error(post(c, {"model": model, "prompt": "hi"}, {"Authorization": "Bearer wrong"}), 401)
    assert_error(post(c, {"model": model, "prompt": "hi"}, {"Authorization": API_KEYS[0]}), 401)  # no scheme
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{BASE_URL}/v1", http_client=c, api_key="bad", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=f"{BASE_URL}/v1", http_client=c, api_key=API_KEYS[0], max_retries=0)
    assert ok.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    # probes stay open; /metrics is protected on this server
    assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    assert_error(c.get("/metrics"), 401)
    assert c.get("/metrics", headers={"Authorization": f"Bearer {API_KEYS[0]}"}).status_code == 200


def test_no_500_from_odd_input(app, model_info):
    base = model_info["base"]
    odd = [{"model": base, "prompt": "\udcff"}, {"model": base, "prompt": [[1], "x"]}, {"model": None},
           {"model": base, "prompt": "hi", "stream_options": {"include_usage": "maybe"}},
           {"model": base, "prompt": "hi", "stop": None, "seed": 2**80}, {"model": base, "prompt": {"a": 1}},
           {"model": base, "prompt": "hi", "temperature": float("nan")}]
    for body in odd:
        try:
            r = post(app, body)
        except (TypeError, ValueError):  # httpx refuses to encode it: nothing to send
            continue
        assert r.status_code < 500, (body, r.text)
    r = app.client.post("/v1/completions", content=b'{"model": "x", "prompt": "\xff\xfe"}',
                        headers={"content-type": "application/json"})
    assert r.status_code < 500
    r = app.client.post("/v1/completions", content=b'{"prompt": NaN, "model": "m"}',
                        headers={"content-type": "application/json"})
    assert r.status_code < 500


def test_logs_hold_no_prompts_or_keys(auth_server):
    """Structured access logs: one JSON line per request, without prompts, completions or keys."""
    h = {"Authorization": f"Bearer {API_KEYS[0]}"}
    model = httpx.get(f"{auth_server.url}/v1/models", headers=h).json()["data"][0]["id"]
    r = post(auth_server, {"model": model, "prompt": "SECRET-PROMPT-MARKER", "max_tokens": 2,
                           "unknown_field_marker": "SECRET-VALUE"}, h)
    assert r.status_code == 200
    post(auth_server, {"model": model, "prompt": "x"}, {"Authorization": "Bearer SECRET-WRONG-KEY"})
    time.sleep(0.2)
    log = auth_server.log()
    for secret in ("SECRET-PROMPT-MARKER", "SECRET-VALUE", "SECRET-WRONG-KEY", *API_KEYS):
        assert secret not in log, secret
    access = [json.loads(line.split("colm.access: ", 1)[1]) for line in log.splitlines() if "colm.access: " in line]
    assert any(a["status"] == 401 for a in access) and any(a.get("request_id") == r.json()["id"] for a in access)
    assert "unknown_field_marker" in log  # unknown field names are logged, their values never
