"""Structured outputs, logit_bias and best_of through the real app (in process) and the official openai
client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from colm_runtime.tokenizer import Tokenizer
from tests.server.helpers import metric, scrape
from tests.server.inprocess import BASE_URL

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user"]},
    "langs": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
                "required": ["zip"], "additionalProperties": False}},
    "required": ["name", "age", "role", "langs", "address"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user", "content": "Give a JSON object"}]


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", http_client=app.client, api_key="unused", max_retries=0, timeout=120)


def _models(model_info) -> list[str]:
    return [f"{model_info['base']}:c{k}" for k in range(1, model_info["n_chains"] + 1)]


def _chat(client, model, stream=False, **kw):
    if not stream:
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=120, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=120, temperature=0,
                                                 stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_object_and_schema_at_every_chain_count(client, model_info, stream):
    for model in _models(model_info):
        text, finish = _chat(client, model, stream, response_format={"type": "json_object"})
        assert finish == "stop" and isinstance(json.loads(text), dict), (model, text)
        text, finish = _chat(client, model, stream, response_format=JSON_SCHEMA)
        assert finish == "stop", (model, text)
        jsonschema.validate(json.loads(text), PERSON)
        free, _ = _chat(client, model, stream)
        assert not free.lstrip().startswith("{")  # constrained decoding made the difference


@pytest.mark.parametrize("stream", [False, True])
def test_completions_guided_json_regex_choice(client, model_info, stream):
    for model in _models(model_info):
        for extra, check in [
            ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
            ({"structured_outputs": {"json": json.dumps(PERSON)}}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
            ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict) or 1 / 0),
            ({"guided_regex": "[0-9]{3}-[a-z]{2,4}"}, lambda t: __import__("re").fullmatch("[0-9]{3}-[a-z]{2,4}", t) or 1 / 0),
            ({"guided_choice": ["list", "tuple", "dict"]}, lambda t: t in ("list", "tuple", "dict") or 1 / 0),
            ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no") or 1 / 0),
        ]:
            kw = dict(model=model, prompt="Return a JSON object:", max_tokens=120, temperature=0, extra_body=extra)
            if stream:
                chunks = list(client.completions.create(stream=True, **kw))
                text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
            else:
                r = client.completions.create(**kw)
                text, finish = r.choices[0].text, r.choices[0].finish_reason
            assert finish == "stop", (model, extra, text)
            check(text)


def test_mixed_batch_leaves_unconstrained_requests_unchanged(client, model_info):
    """Unconstrained requests give the same text alone and sharing batches with constrained ones."""
    model = model_info["base"]
    free = [dict(prompt=p, max_tokens=24, temperature=t, seed=5, extra_body={"ignore_eos": True})
            for p in ("The list type", "Dictionaries are") for t in (0, 1.0)]
    bound = [dict(prompt="Return a JSON object:", max_tokens=120, temperature=t, seed=9,
                  extra_body={"guided_json": PERSON}) for t in (0, 0.9) for _ in range(3)]
    alone = [client.completions.create(model=model, **kw).choices[0].text for kw in free]
    with ThreadPoolExecutor(len(free) + len(bound)) as pool:
        futures = [pool.submit(client.completions.create, model=model, **kw) for kw in bound + free]
        results = [f.result().choices[0] for f in futures]
    assert [c.text for c in results[len(bound):]] == alone
    for c in results[: len(bound)]:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)


def test_schema_errors_name_the_reason(app, model_info):
    body = {"model": model_info["base"], "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "integr"}}}}}}  # a typo
    r = app.client.post("/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["code"] == "invalid_grammar"
    assert "does not compile" in err["message"] and "integr" in err["message"]
    assert app.client.get("/health").status_code == 200


def test_logit_bias_removes_and_forces_a_token(client, model_info, model_dir):
    kw = dict(model=f"{model_info['base']}:c2", prompt="The list type", max_tokens=8, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0].logprobs.tokens
    tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    first = tok.encode(base[0])
    assert len(first) == 1
    banned = client.completions.create(logit_bias={str(first[0]): -100}, **kw).choices[0].logprobs.tokens
    assert base[0] not in banned and banned != base
    forced = tok.encode(" JSON")
    r = client.completions.create(logit_bias={str(forced[0]): 100}, **{**kw, "temperature": 1.0, "seed": 1})
    assert r.choices[0].text == " JSON" * 8


def test_best_of_returns_the_highest_scoring_candidates(client, model_info):
    kw = dict(model=model_info["base"], prompt="The list type", max_tokens=8, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    every = client.completions.create(n=5, logprobs=0, **kw).choices
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in every}
    best = client.completions.create(n=2, best_of=5, **kw)
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert [c.text for c in best.choices] == ranked[:2]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 5 * 8  # every candidate was generated (and is billed, as OpenAI does)


def test_structured_metrics(app, client, model_info):
    before = scrape(app.client)
    choices = ["alpha", "beta", f"gamma-{metric(before, 'colm_structured_requests_total', kind='choice')}"]
    for _ in range(2):  # a new spec: compiled once, then served from the cache
        client.completions.create(model=model_info["base"], prompt="x", max_tokens=4,
                                  extra_body={"guided_choice": choices})
    after = scrape(app.client)
    for name, labels, delta in [("colm_structured_requests_total", {"kind": "choice"}, 2),
                                ("colm_grammar_compile_seconds_count", {}, 1)]:
        assert metric(after, name, **labels) - metric(before, name, **labels) == delta
