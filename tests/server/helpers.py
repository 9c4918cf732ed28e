"""Helpers the server tests share (and tests/reliability, through conftest): EngineStats snapshots for
the admission objects, one way to post a request (to a subprocess server's URL or an in-process app),
/metrics scrapes, SSE events and OpenAI's error shape."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from colm_runtime.engine.types import EngineStats

STEP = {1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04}  # seconds per decode step whose widest request has k chains


def engine_stats(waiting: int = 0, running: int = 0, kv: tuple[float, ...] = (0.0,) * 4,
                 decode: dict | None = None, prefill: dict | None = None) -> EngineStats:
    """An EngineStats snapshot of a 4-chain engine: step times STEP, 1 ms per prompt token at 4 chains."""
    return EngineStats(running=running, waiting=waiting, kv_usage=kv, kv_blocks_total=(100,) * 4,
                       kv_blocks_free=tuple(int(100 * (1 - u)) for u in kv),
                       step_time_per_chains=dict(STEP) if decode is None else decode,
                       prefill_time_per_token={4: 0.001} if prefill is None else prefill,
                       preemptions_total=0, shrinks_total=0, steps_total=10, alive=True)


def post(target, body: dict, headers: dict | None = None, path: str = "/v1/completions") -> httpx.Response:
    """POST a JSON body: to an in-process app (anything with a .client) or an httpx.Client, else to a
    subprocess server's .url."""
    client = getattr(target, "client", target)
    if isinstance(client, httpx.Client):
        return client.post(path, json=body, headers=headers or {})
    return httpx.post(f"{target.url}{path}", json=body, headers=headers or {}, timeout=60)


def scrape(target: str | httpx.Client, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics of a server (its URL, or a client) as {(sample name, sorted labels): value}."""
    if isinstance(target, httpx.Client):
        r = target.get("/metrics", headers=headers or {})
    else:
        r = httpx.get(f"{target}/metrics", headers=headers or {})
    r.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """The value of one series (0 when absent)."""
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def sse_events(response: httpx.Response):
    """Parsed `data:` payloads of a server-sent-event stream (the final [DONE] as the string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape with the expected status (and code/param when given)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]
