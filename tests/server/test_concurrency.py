"""Many clients at once: mixed chain counts, streamed and not, some hanging up early. No 5xx, every
KV block free afterwards, and each finished greedy answer equals the same request served alone."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.server.helpers import metric, scrape


async def _one(client: httpx.AsyncClient, body: dict, hang_up: bool) -> tuple[int, str | None]:
    if not body.get("stream"):
        try:
            r = await client.post("/v1/completions", json=body,
                                  timeout=httpx.Timeout(30, read=0.05) if hang_up else 120)
        except httpx.ReadTimeout:
            return 0, None  # gave up: the server must abort it
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if hang_up and text:
                return 0, None
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"] if '"choices":[{' in line else ""
        return r.status_code, text


def test_mixed_concurrent_clients(server, model_info):
    base, n = model_info["base"], model_info["n_chains"]
    rng = random.Random(0)
    bodies = [{"model": f"{base}:c{rng.randint(1, n)}", "prompt": f"Request number {i} says",
               "max_tokens": rng.randint(4, 24), "temperature": 0, "ignore_eos": True, "stream": i % 2 == 0}
              for i in range(24)]
    hang = [i % 3 == 0 for i in range(24)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            together = await asyncio.gather(*(_one(client, b, h) for b, h in zip(bodies, hang)))
            alone = [await _one(client, b, False) if not h else (0, None) for b, h in zip(bodies, hang)]
        return together, alone

    together, alone = asyncio.run(main())
    for (status, text), (_, solo), h in zip(together, alone, hang):
        if not h:
            assert status == 200 and text == solo  # batch-invariant greedy output
        else:
            assert status in (0, 200)
    deadline = time.monotonic() + 15
    while True:
        s = scrape(server.url)
        if metric(s, "colm_requests_running") == 0 and metric(s, "colm_requests_waiting") == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    chains = sorted(dict(lab)["chain"] for name, lab in s if name == "colm_kv_cache_total_blocks")
    for c in chains:
        assert metric(s, "colm_kv_cache_free_blocks", chain=c) == metric(s, "colm_kv_cache_total_blocks", chain=c)
    assert not [k for k, v in s.items() if k[0] == "colm_http_requests_total" and dict(k[1])["status"].startswith("5")
                and v > 0]
