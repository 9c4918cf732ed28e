"""Chain schedules and self-speculative decoding through the real app (in process, with
num_speculative_tokens), with the official openai client where the fields allow it."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.helpers import assert_error, metric, post, scrape
from tests.server.inprocess import BASE_URL, InProcessServer


@pytest.fixture(scope="module")
def spec_server(model_dir):
    s = InProcessServer(model_dir, num_speculative_tokens=3, warmup=False)
    yield s
    s.stop()


def complete(server: InProcessServer, **body) -> httpx.Response:
    body = {"model": "x", "prompt": "def parse(path):", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            **body}
    return post(server.client, body)


def base_model(server: InProcessServer) -> str:
    return server.client.get("/v1/models").json()["data"][0]["id"]


def test_speculative_greedy_completions_equal_plain_ones_and_are_counted(spec_server):
    client = openai.OpenAI(base_url=f"{BASE_URL}/v1", http_client=spec_server.client, api_key="none")
    model = base_model(spec_server)
    before = scrape(spec_server.client)
    texts = {}
    for spec in (True, False):
        r = client.completions.create(model=model, prompt="import os\n", max_tokens=16, temperature=0,
                                      extra_body={"speculative": spec, "ignore_eos": True, "chains": 4})
        texts[spec] = r.choices[0].text
    assert texts[True] == texts[False]
    after = scrape(spec_server.client)
    proposed = metric(after, "colm_spec_decode_proposed_tokens_total") - \
        metric(before, "colm_spec_decode_proposed_tokens_total")
    accepted = metric(after, "colm_spec_decode_accepted_tokens_total") - \
        metric(before, "colm_spec_decode_accepted_tokens_total")
    assert proposed > 0 and 0 <= accepted <= proposed


def test_a_chain_schedule_switches_chains_and_is_counted(spec_server):
    model = base_model(spec_server)
    before = scrape(spec_server.client)
    r = complete(spec_server, model=model, chain_schedule=[[0, 4], [4, 2]])
    assert r.status_code == 200, r.text
    assert r.json()["colm"]["final_chains"] == 2 and r.json()["usage"]["completion_tokens"] == 12
    r = complete(spec_server, model=model, chain_schedule=[[0, 1], [3, 4]], speculative=False)
    assert r.status_code == 200 and r.json()["colm"]["final_chains"] == 4
    after = scrape(spec_server.client)
    for d in ("down", "up"):
        key = ("colm_chain_switches_total", {"direction": d, "reason": "schedule"})
        assert metric(after, key[0], **key[1]) - metric(before, key[0], **key[1]) == 1
    # the served model is plain CoLM: going up recomputes the tokens so far (prompt + 3 generated)
    recomputed = metric(after, "colm_chain_switch_recomputed_tokens_total") - \
        metric(before, "colm_chain_switch_recomputed_tokens_total")
    assert recomputed >= 3


@pytest.mark.parametrize("schedule", [[[1, 4]], [[0, 4], [5, 2], [5, 3]], [[0, 4], [3, 0]], [], [[0]], "4"])
def test_invalid_chain_schedules_are_400(spec_server, schedule):
    err = assert_error(complete(spec_server, model=base_model(spec_server), chain_schedule=schedule), 400)
    assert "chain_schedule" in err["message"] or "chain_schedule" in (err["param"] or "")


def test_schedule_chain_counts_are_checked_against_the_model_and_chains(spec_server):
    model = base_model(spec_server)
    err = assert_error(complete(spec_server, model=model, chain_schedule=[[0, 4], [3, 99]]), 400)
    assert "chain_schedule" in err["message"]
    err = assert_error(complete(spec_server, model=model, chains=2, chain_schedule=[[0, 4]]), 400)
    assert "disagree" in err["message"]


def test_speculative_requests_need_a_server_that_has_it(app):
    err = assert_error(complete(app, model=base_model(app), speculative=True), 400, param="speculative")
    assert "speculative" in err["message"]
    assert complete(app, model=base_model(app), speculative=False).status_code == 200
