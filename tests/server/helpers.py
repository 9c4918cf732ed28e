"""Helpers the server tests share: EngineStats snapshots for the admission objects, and one way to
post a request (to a subprocess server's URL or an in-process client)."""

from __future__ import annotations

import httpx

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
