"""The bad-input catalogue (issue 9, item 2): every entry gets a clear 4xx in OpenAI's error shape,
and afterwards the server is unharmed (a good request succeeds, every KV block is free, no 5xx)."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.conftest import assert_healthy, auth, count_5xx
from tests.server.helpers import assert_error

C, CHAT = "/v1/completions", "/v1/chat/completions"
M = "{model}"  # replaced by the served base model id
LONG = "word " * 5000  # far beyond the context (1024 tokens)


def _body(**kw) -> dict:
    return {"model": M, "prompt": "hi", "max_tokens": 4, **kw}


# (id, path, JSON body or raw bytes, expected status, expected error param or None)
CATALOGUE = [
    ("malformed-json", C, b'{"model": "m", "prompt": ', 400, None),
    ("not-an-object", C, b'[1, 2, 3]', 400, None),
    ("json-nan-literal", C, b'{"model": "{model}", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("deeply-nested", C, b'{"model": "m", "prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}", 400, None),
    ("oversized-body", C, b'{"model": "m", "prompt": "' + b"a" * (2 << 20) + b'"}', 413, None),
    ("invalid-utf8", C, b'{"model": "{model}", "prompt": "\xff\xfe bad"}', 400, None),
    ("lone-surrogate", C, b'{"model": "{model}", "prompt": "\\ud800 x"}', 400, "prompt"),
    ("wrong-type-prompt", C, _body(prompt=12.5), 400, "prompt"),
    ("wrong-type-max-tokens", C, _body(max_tokens="ten"), 400, "max_tokens"),
    ("wrong-type-stream", C, _body(stream="yes please"), 400, "stream"),
    ("missing-model", C, {"prompt": "x"}, 400, "model"),
    ("empty-prompt", C, _body(prompt=""), 400, "prompt"),
    ("empty-prompt-list", C, _body(prompt=[]), 400, "prompt"),
    ("empty-token-list", C, _body(prompt=[[]]), 400, "prompt"),
    ("token-id-too-big", C, _body(prompt=[1, 2, 10**6]), 400, "prompt"),
    ("token-id-negative", C, _body(prompt=[-1, 5]), 400, "prompt"),
    ("token-id-huge-int", C, _body(prompt=[2**70]), 400, "prompt"),
    ("max-tokens-beyond-context", C, _body(max_tokens=100_000), 400, "max_tokens"),
    ("prompt-beyond-context", C, _body(prompt=LONG), 400, "prompt"),
    ("max-tokens-zero", C, _body(max_tokens=0), 400, "max_tokens"),
    ("huge-n", C, _body(n=10_000), 400, "n"),
    ("n-over-max-num-seqs", C, _body(n=16, best_of=16, max_tokens=1), 200, None),  # 16 = the limit: fine
    ("huge-logprobs", C, _body(logprobs=1000), 400, "logprobs"),
    ("huge-top-logprobs", CHAT, {"model": M, "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                 "top_logprobs": 500}, 400, "top_logprobs"),
    ("negative-temperature", C, _body(temperature=-1), 400, "temperature"),
    ("negative-top-p", C, _body(top_p=-0.5), 400, "top_p"),
    ("top-p-over-one", C, _body(top_p=1.5), 400, "top_p"),
    ("nan-temperature-string", C, _body(temperature="NaN"), 400, "temperature"),
    ("inf-presence-penalty", C, _body(presence_penalty="Infinity"), 400, "presence_penalty"),
    ("negative-repetition-penalty", C, _body(repetition_penalty=-2), 400, "repetition_penalty"),
    ("min-p-over-one", C, _body(min_p=3), 400, "min_p"),
    ("negative-stop-token-id", C, _body(stop_token_ids=[-4]), 400, "stop_token_ids"),
    ("unknown-model", C, _body(model="gpt-4"), 404, "model"),
    ("model-as-path", C, _body(model="/etc/passwd"), 404, "model"),
    ("model-as-relative-path", C, _body(model="../models/colm-tiny"), 404, "model"),
    ("unknown-chain-suffix", C, _body(model=M + ":c99"), 404, "model"),
    ("chains-zero", C, _body(chains=0), 400, "chains"),
    ("chains-too-many", C, _body(chains=99), 400, "chains"),
    ("chains-wrong-type", C, _body(chains="four"), 400, "chains"),
    ("unknown-tier", C, _body(tier="platinum-plus"), 400, "tier"),
    ("negative-latency-budget", C, _body(latency_budget_ms=-5), 400, "latency_budget_ms"),
    ("too-many-stops", C, _body(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("empty-stop", C, _body(stop=[""]), 400, "stop"),
    ("too-many-stop-token-ids", C, _body(stop_token_ids=list(range(100))), 400, "stop_token_ids"),
    ("logit-bias-unknown-token", C, _body(logit_bias={"999999": 100}), 400, "logit_bias"),
    ("logit-bias-out-of-range", C, _body(logit_bias={"5": 1e9}), 400, "logit_bias"),
    ("schema-that-does-not-compile", C, _body(guided_json={"type": "object", "properties": {"a": {"type": 7}}}),
     400, "guided_json"),
    ("response-format-without-schema", CHAT, {"model": M, "messages": [{"role": "user", "content": "x"}],
                                              "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("chat-no-messages", CHAT, {"model": M, "messages": []}, 400, "messages"),
    ("chat-bad-role", CHAT, {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("chat-content-wrong-type", CHAT, {"model": M, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("chat-tools", CHAT, {"model": M, "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("bad-chains-header", C, _body(), 400, None),  # sent with X-CoLM-Chains: lots
]


def _send(client: httpx.Client, path: str, body, model: str, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, bytes):
        raw = body.replace(b"{model}", model.encode())
        return client.post(path, content=raw, headers={"content-type": "application/json", **(headers or {})})
    import json

    text = json.dumps(body).replace('"{model}', '"' + model)
    return client.post(path, content=text.encode(), headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("name,path,body,status,param", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_a_clear_4xx(client, base_model, name, path, body, status, param):
    headers = {"X-CoLM-Chains": "lots"} if name == "bad-chains-header" else None
    r = _send(client, path, body, base_model, headers)
    if status == 200:
        assert r.status_code == 200, r.text
        return
    err = assert_error(r, status, param=param)
    assert len(err["message"]) < 2000 and "Traceback" not in err["message"]


def test_server_unharmed_after_the_catalogue(hardened, client, base_model):
    before = count_5xx(hardened.url, auth())
    for name, path, body, _, _ in CATALOGUE:  # the whole catalogue again, back to back
        _send(client, path, body, base_model, {"X-CoLM-Chains": "lots"} if name == "bad-chains-header" else None)
    assert_healthy(hardened.url, auth(), base_model)
    assert count_5xx(hardened.url, auth()) == before


def test_unauthenticated_bad_input_is_401_before_parsing(hardened):
    r = httpx.post(f"{hardened.url}{C}", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 401)  # either way a 4xx in OpenAI's shape, never a 5xx
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
