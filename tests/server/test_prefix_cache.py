"""Prefix caching over HTTP: a repeated prompt is served from the cache (the per-pool counters move by
the cached tokens) with the same answer; a different cache_salt shares nothing; both endpoints take
cache_salt; `--no-enable-prefix-caching` turns it off."""

from __future__ import annotations

import random

import httpx

from tests.server.conftest import metric, scrape
from tests.server.test_settings import settings_from


def _complete(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeated_prompt_hits_the_cache_in_each_pool_it_uses_and_salts_isolate(server, model_info):
    base = model_info["base"]
    ids = [random.Random(16).randrange(1, 4000) for _ in range(40)]  # 2 full blocks of 16 before the last token
    body = {"model": f"{base}:c2", "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "cache_salt": "tenant-a"}
    first = _complete(server.url, body)
    before = scrape(server.url)
    again = _complete(server.url, body)
    other = _complete(server.url, {**body, "cache_salt": "tenant-b"})
    after = scrape(server.url)

    def moved(name, chain):
        return metric(after, name, chain=chain) - metric(before, name, chain=chain)

    assert again["choices"][0]["text"] == first["choices"][0]["text"] == other["choices"][0]["text"]
    for chain in (1, 2):  # the 2-chain requests look up pools 1 and 2, twice
        assert moved("colm_prefix_cache_queries_total", chain) == 2 * 40
        assert moved("colm_prefix_cache_hits_total", chain) == 32, "tenant-a hits 2 blocks, tenant-b none"
    assert moved("colm_prefix_cache_queries_total", 3) == 0
    for chain in (1, 2, 3, 4):  # idle: cached blocks count as free
        free = metric(after, "colm_kv_cache_free_blocks", chain=chain)
        assert free == metric(after, "colm_kv_cache_total_blocks", chain=chain) > 0
        assert 0 <= metric(after, "colm_kv_cache_cached_free_blocks", chain=chain) <= free


def test_chat_takes_cache_salt_and_an_empty_salt_is_refused(server, model_info):
    body = {"model": model_info["base"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "cache_salt": "tenant-a"}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "cache_salt": ""}, timeout=60)
    assert r.status_code == 400 and "cache_salt" in r.text


def test_prefix_caching_flags(model_dir):
    from server.app import engine_config

    assert settings_from(["--model", str(model_dir)]).enable_prefix_caching
    off = settings_from(["--model", str(model_dir), "--no-enable-prefix-caching"])
    assert not off.enable_prefix_caching and not engine_config(off).enable_prefix_caching
    assert settings_from(["--model", str(model_dir), "--enable-prefix-caching"]).enable_prefix_caching
