"""Overload: a bounded queue refuses pinned requests with 429 + Retry-After, while unpinned requests
are admitted with fewer chains (SLO-aware degradation), each downgrade counted with its reason.

The server runs one sequence at a time (--max-num-seqs 1) with a queue of 2, so three long requests
fill it: one running, two waiting. The capacity signal is off here (a huge utilization target), so
that the queue signal is the one that degrades.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.conftest import start_server
from tests.server.helpers import assert_error, metric, scrape


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, model_dir):
    s = start_server(tmp_path_factory, model_dir, "busy", args=["--max-num-seqs", "1", "--max-waiting", "2"],
                     env={"COLM_DEGRADED_QUEUE_HEADROOM": "1.0", "COLM_DEGRADE_QUEUE_FRACTION": "0.5",
                          "COLM_DEGRADE_UTILIZATION": "1000"})
    yield s
    s.stop()


def _wait_for(url: str, name: str, value: float, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(url)
        if metric(s, name) == value:
            return s
        assert time.monotonic() < deadline, f"{name} never reached {value} (is the model too fast?)"
        time.sleep(0.02)


def test_full_queue_refuses_pinned_and_degrades_unpinned(busy_server):
    url = busy_server.url
    models = httpx.get(f"{url}/v1/models").json()["data"]
    base, n, limit = models[0]["id"], models[0]["chains"], models[0]["max_model_len"]
    before = scrape(url)
    long = {"model": f"{base}:c{n}", "prompt": "fill the queue", "max_tokens": limit - 32, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=url, timeout=60) as http:
        holders = [http.send(http.build_request("POST", "/v1/completions", json=long), stream=True)
                   for _ in range(3)]
        try:
            assert all(h.status_code == 200 for h in holders)
            _wait_for(url, "colm_requests_waiting", 2)
            # pinned by model id or `chains`: refused, with Retry-After
            for body in ({"model": f"{base}:c{n}"}, {"model": base, "chains": 1}):
                r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, **body})
                assert_error(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
            # unpinned: admitted at fewer chains, and the report says why
            chat = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, timeout=60) as r:
                assert r.status_code == 200 and r.headers["x-colm-chains"] == "1"
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert '"reason":"degraded"' in first and '"degrade_reasons":["queue"]' in first
            assert f'"requested_chains":{n}' in first
        finally:
            for h in holders:
                h.close()
    after = scrape(url)
    assert metric(after, "colm_rejected_requests_total", reason="queue_full") - \
        metric(before, "colm_rejected_requests_total", reason="queue_full") == 2
    if n > 1:
        assert metric(after, "colm_chain_downgrades_total", reason="queue") - \
            metric(before, "colm_chain_downgrades_total", reason="queue") == 1
    _wait_for(url, "colm_requests_running", 0)


def test_n_above_max_num_seqs_is_400(busy_server):
    """n completions run side by side, so n above max_num_seqs could never be scheduled."""
    model = httpx.get(f"{busy_server.url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(f"{busy_server.url}/v1/completions", json={"model": model, "prompt": "x", "n": 2}, timeout=30)
    assert_error(r, 400, param="n")
