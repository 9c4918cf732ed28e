"""Chain schedules and self-speculative decoding through the real server (a `colm serve` subprocess
with --num-speculative-tokens), with the official openai client where the fields allow it."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import assert_error, metric, scrape, start_server


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, model_dir):
    s = start_server(tmp_path_factory, model_dir, "spec", args=["--num-speculative-tokens", "3", "--no-warmup"])
    yield s
    s.stop()


def complete(url: str, **body) -> httpx.Response:
    body = {"model": "x", "prompt": "def parse(path):", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def base_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def test_speculative_greedy_completions_equal_plain_ones_and_are_counted(spec_server):
    client = openai.OpenAI(base_url=f"{spec_server.url}/v1", api_key="none")
    model = base_model(spec_server.url)
    before = scrape(spec_server.url)
    texts = {}
    for spec in (True, False):
        r = client.completions.create(model=model, prompt="import os\n", max_tokens=16, temperature=0,
                                      extra_body={"speculative": spec, "ignore_eos": True, "chains": 4})
        texts[spec] = r.choices[0].text
    assert texts[True] == texts[False]
    after = scrape(spec_server.url)
    proposed = metric(after, "colm_spec_decode_proposed_tokens_total") - \
        metric(before, "colm_spec_decode_proposed_tokens_total")
    accepted = metric(after, "colm_spec_decode_accepted_tokens_total") - \
        metric(before, "colm_spec_decode_accepted_tokens_total")
    assert proposed > 0 and 0 <= accepted <= proposed


def test_a_chain_schedule_switches_chains_and_is_counted(spec_server):
    url, model = spec_server.url, base_model(spec_server.url)
    before = scrape(url)
    r = complete(url, model=model, chain_schedule=[[0, 4], [4, 2]])
    assert r.status_code == 200, r.text
    assert r.json()["colm"]["final_chains"] == 2 and r.json()["usage"]["completion_tokens"] == 12
    r = complete(url, model=model, chain_schedule=[[0, 1], [3, 4]], speculative=False)
    assert r.status_code == 200 and r.json()["colm"]["final_chains"] == 4
    after = scrape(url)
    for d in ("down", "up"):
        key = ("colm_chain_switches_total", {"direction": d, "reason": "schedule"})
        assert metric(after, key[0], **key[1]) - metric(before, key[0], **key[1]) == 1
    # the served model is plain CoLM: going up recomputes the tokens so far (prompt + 3 generated)
    recomputed = metric(after, "colm_chain_switch_recomputed_tokens_total") - \
        metric(before, "colm_chain_switch_recomputed_tokens_total")
    assert recomputed >= 3


@pytest.mark.parametrize("schedule", [[[1, 4]], [[0, 4], [5, 2], [5, 3]], [[0, 4], [3, 0]], [], [[0]], "4"])
def test_invalid_chain_schedules_are_400(spec_server, schedule):
    err = assert_error(complete(spec_server.url, model=base_model(spec_server.url), chain_schedule=schedule), 400)
    assert "chain_schedule" in err["message"] or "chain_schedule" in (err["param"] or "")


def test_schedule_chain_counts_are_checked_against_the_model_and_chains(spec_server):
    url, model = spec_server.url, base_model(spec_server.url)
    err = assert_error(complete(url, model=model, chain_schedule=[[0, 4], [3, 99]]), 400)
    assert "chain_schedule" in err["message"]
    err = assert_error(complete(url, model=model, chains=2, chain_schedule=[[0, 4]]), 400)
    assert "disagree" in err["message"]


def test_speculative_requests_need_a_server_that_has_it(tmp_path_factory, model_dir):
    s = start_server(tmp_path_factory, model_dir, "nospec", args=["--no-warmup"])
    try:
        err = assert_error(complete(s.url, model=base_model(s.url), speculative=True), 400)
        assert "speculative" in err["message"]
        assert complete(s.url, model=base_model(s.url), speculative=False).status_code == 200
    finally:
        s.stop()
