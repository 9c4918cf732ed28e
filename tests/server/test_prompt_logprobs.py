"""Prompt logprobs over HTTP (echo + logprobs as lm-evaluation-harness sends it, max_tokens 0, vLLM's
prompt_logprobs on completions and chat), their errors, and /tokenize and /detokenize."""

from __future__ import annotations

from functools import lru_cache

import pytest

from colm_runtime.checkpoint import load_model
from colm_runtime.training.evaluate import token_logprobs
from tests.server.helpers import assert_error, post, sse_events

TEXT = "The list type is a mutable sequence of items."


@lru_cache(maxsize=1)
def reference_model(model_dir):
    import torch

    return load_model(model_dir, device="cpu", dtype=torch.float32)


def tokenize(app, text: str) -> list[int]:
    return post(app, path="/tokenize", body={"prompt": text}).json()["tokens"]


def test_echo_with_logprobs_is_what_lm_eval_reads(app, model_info, model_dir):
    """lm-eval's request: token ids, max_tokens 1, logprobs 1, echo, temperature 0. Every prompt token
    gets its logprob (the first null) equal to the full-forward reference, then the generated token."""
    ids = tokenize(app, TEXT)
    model = reference_model(model_dir)
    for k in range(1, model_info["n_chains"] + 1):
        body = {"model": f"{model_info['base']}:c{k}", "prompt": [ids, ids[:5]], "max_tokens": 1, "logprobs": 1,
                "echo": True, "temperature": 0}
        r = post(app, path="/v1/completions", body=body).json()
        for choice, p in zip(r["choices"], (ids, ids[:5])):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(p) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            for got, want in zip(lp["token_logprobs"][1 : len(p)], token_logprobs(model, p, k)):
                assert abs(got - want) < 1e-4
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
            assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
            assert choice["text"].startswith("".join(lp["tokens"][: len(p)]))


def test_max_tokens_zero_scores_the_prompt_only(app, model_info):
    body = {"model": model_info["base"], "prompt": TEXT, "max_tokens": 0, "logprobs": 2, "echo": True}
    r = post(app, path="/v1/completions", body=body).json()
    c = r["choices"][0]
    assert c["text"] == TEXT and c["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 0 and len(c["logprobs"]["tokens"]) == r["usage"]["prompt_tokens"]
    assert all(len(t) == 2 for t in c["logprobs"]["top_logprobs"][1:])


def test_vllm_prompt_logprobs_on_completions_and_chat(app, model_info):
    r = post(app, path="/v1/completions", body={"model": model_info["base"], "prompt": TEXT, "max_tokens": 2,
                                         "prompt_logprobs": 2, "n": 2, "seed": 1}).json()
    ids = tokenize(app, TEXT)
    for c in r["choices"]:
        pl = c["prompt_logprobs"]
        assert pl[0] is None and len(pl) == len(ids)
        for t, entry in zip(ids[1:], pl[1:]):
            mine = entry[str(t)]  # the prompt token itself, then the top 2 (itself, if it is one of them)
            assert mine["logprob"] <= 0 and len(entry) == 2 + (mine["rank"] > 2)
            assert {v["rank"] for v in entry.values()} == {1, 2, mine["rank"]}
    assert r["choices"][0]["prompt_logprobs"] == r["choices"][1]["prompt_logprobs"]
    chat = post(app, path="/v1/chat/completions", body={"model": model_info["base"], "max_tokens": 1, "prompt_logprobs": 0,
                                                         "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])


def test_stream_with_echo_and_logprobs_puts_the_prompt_in_the_first_chunk(app, model_info):
    body = {"model": model_info["base"], "prompt": TEXT, "max_tokens": 3, "logprobs": 0, "echo": True,
            "stream": True, "temperature": 0, "ignore_eos": True}
    with app.client.stream("POST", "/v1/completions", json=body, timeout=60) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    first = events[0]["choices"][0]
    n_prompt = len(tokenize(app, TEXT))
    assert first["text"].startswith(TEXT) and len(first["logprobs"]["tokens"]) == n_prompt + 1
    assert first["logprobs"]["token_logprobs"][0] is None
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events) == n_prompt + 3


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21, "echo": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "prompt_logprobs": 1, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1,
                              "stream": True}, "prompt_logprobs"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
def test_what_cannot_be_done_is_a_400(app, model_info, path, body, param):
    assert_error(post(app, path=path, body={"model": model_info["base"], **body}), 400, param=param)
    assert app.client.get("/health").status_code == 200


def test_tokenize_and_detokenize_round_trip(app, model_info):
    r = post(app, path="/tokenize", body={"model": model_info["base"], "prompt": TEXT,
                                         "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == model_info["max_model_len"]
    detok = post(app, path="/detokenize", body={"model": model_info["base"], "tokens": r["tokens"]}).json()
    assert detok == {"prompt": TEXT}
    usage = post(app, path="/v1/completions", body={"model": model_info["base"], "prompt": TEXT,
                                                    "max_tokens": 1}).json()
    assert usage["usage"]["prompt_tokens"] == r["count"]
    messages = [{"role": "user", "content": "Hello"}]
    chat = post(app, path="/tokenize", body={"messages": messages}).json()
    reply = post(app, path="/v1/chat/completions", body={"model": model_info["base"], "messages": messages,
                                                  "max_tokens": 1}).json()
    assert chat["count"] == reply["usage"]["prompt_tokens"] and chat["token_strs"] is None
    assert_error(post(app, path="/tokenize", body={"model": "nope", "prompt": "x"}), 404)
