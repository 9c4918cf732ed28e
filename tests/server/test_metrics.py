"""/metrics: every documented series appears and moves (the app in process); a client that disconnects
(streaming or not) has its request aborted and its KV blocks freed, as the engine's own gauges show (a
`colm serve` subprocess: the disconnect is the point)."""

from __future__ import annotations

import time

import httpx

from tests.server.helpers import metric, scrape, sse_events

REQUIRED = [
    "colm_requests_running", "colm_requests_waiting", "colm_kv_cache_usage_ratio",
    "colm_time_to_first_token_seconds_count", "colm_time_per_output_token_seconds_count",
    "colm_e2e_request_latency_seconds_count", "colm_request_queue_time_seconds_count",
    "colm_prompt_tokens_total", "colm_generation_tokens_total", "colm_requests_total",
    "colm_chain_downgrades_total", "colm_latency_budget_misses_total", "colm_preemptions_total",
    "colm_rejected_requests_total", "colm_http_requests_total", "colm_http_request_duration_seconds_count",
    "colm_kv_cache_free_blocks", "colm_kv_cache_total_blocks", "colm_chain_shrinks_total",
    "colm_routed_requests_total", "colm_engine_steps_total",
]


def test_metrics_appear_and_move(app, model_info):
    base = model_info["base"]
    before = scrape(app.client)
    body = {"model": f"{base}:c2", "prompt": [1, 2, 3, 4, 5], "max_tokens": 5, "ignore_eos": True}
    assert app.client.post("/v1/completions", json=body).status_code == 200
    tight = {"model": base, "prompt": "hi", "max_tokens": 3, "latency_budget_ms": 0.001}
    assert app.client.post("/v1/completions", json=tight).status_code == 200
    assert app.client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    after = scrape(app.client)
    present = {name for name, _ in after}
    assert not [n for n in REQUIRED if n not in present]

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("colm_requests_total", chains=2, finish_reason="length") == 1
    assert moved("colm_generation_tokens_total", chains=2) == 5
    assert moved("colm_prompt_tokens_total", chains=2) == 5
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert moved(f"colm_{hist}_count", chains=2) == 1, hist
        assert moved(f"colm_{hist}_sum", chains=2) > 0, hist
    assert moved("colm_routed_requests_total", reason="model", chains=2) == 1
    assert moved("colm_routed_requests_total", reason="budget", chains=1) == 1
    assert moved("colm_latency_budget_misses_total") == 1  # a 0.001 ms budget is always missed
    assert moved("colm_rejected_requests_total", reason="not_found") == 1
    assert moved("colm_http_requests_total", route="/v1/completions", method="POST", status="200") == 2
    assert moved("colm_http_requests_total", route="/v1/completions", method="POST", status="404") == 1
    assert moved("colm_engine_steps_total") >= 8
    free, total = _pools(after)
    assert free == total and all(t > 0 for t in total)  # nothing running: every block free


def _pools(samples: dict) -> tuple[list[float], list[float]]:
    """Free and total blocks of each KV pool (one per chain; CoLM-Air: one)."""
    chains = sorted(dict(labels)["chain"] for name, labels in samples if name == "colm_kv_cache_total_blocks")
    free = [metric(samples, "colm_kv_cache_free_blocks", chain=c) for c in chains]
    total = [metric(samples, "colm_kv_cache_total_blocks", chain=c) for c in chains]
    return free, total


def _wait_all_free(url: str, aborts_before: float, chains: int, expect_aborts: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        s = scrape(url)
        free, total = _pools(s)
        aborted = metric(s, "colm_requests_total", chains=chains, finish_reason="abort") - aborts_before
        if (free == total and aborted >= expect_aborts) or time.monotonic() > deadline:
            assert free == total, (free, total)
            assert aborted == expect_aborts
            assert metric(s, "colm_requests_running") == 0
            return
        time.sleep(0.1)


def test_disconnected_stream_frees_kv(server, model_info):
    n, base = model_info["n_chains"], model_info["base"]
    aborts = metric(scrape(server.url), "colm_requests_total", chains=n, finish_reason="abort")
    body = {"model": base, "prompt": "keep going", "max_tokens": model_info["max_model_len"] - 16,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        events = sse_events(r)
        for _ in range(3):
            next(events)
        free, total = _pools(scrape(server.url))
        assert all(f < t for f, t in zip(free, total))  # it holds blocks in every pool
    _wait_all_free(server.url, aborts, n, 1)  # leaving the block closes the connection


def test_disconnected_request_frees_kv(server, model_info):
    """A non-streaming client that gives up (read timeout) has its request aborted too."""
    base = model_info["base"]
    aborts = metric(scrape(server.url), "colm_requests_total", chains=1, finish_reason="abort")
    body = {"model": f"{base}:c1", "prompt": "keep going", "max_tokens": model_info["max_model_len"] - 16,
            "ignore_eos": True, "n": 4}
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("the request finished before the client gave up; make it longer")
    _wait_all_free(server.url, aborts, 1, 4)  # one abort per completion
