"""Prefix caching over HTTP (the app in process): a repeated prompt is served from the cache (the
per-pool counters move by the cached tokens) with the same answer; a different cache_salt shares
nothing; both endpoints take cache_salt; `--no-enable-prefix-caching` turns it off."""

from __future__ import annotations

import random

from tests.server.helpers import assert_error, metric, post, scrape
from tests.server.test_settings import settings_from


def _complete(app, body: dict) -> dict:
    r = post(app, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeated_prompt_hits_the_cache_in_each_pool_it_uses_and_salts_isolate(app, model_info):
    base = model_info["base"]
    ids = [random.Random(16).randrange(1, 4000) for _ in range(40)]  # 2 full blocks of 16 before the last token
    body = {"model": f"{base}:c2", "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "cache_salt": "tenant-a"}
    first = _complete(app, body)
    before = scrape(app.client)
    again = _complete(app, body)
    other = _complete(app, {**body, "cache_salt": "tenant-b"})
    after = scrape(app.client)

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


def test_chat_takes_cache_salt_and_an_empty_salt_is_refused(app, model_info):
    body = {"model": model_info["base"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "cache_salt": "tenant-a"}
    assert post(app, body, path="/v1/chat/completions").status_code == 200
    assert_error(post(app, {**body, "cache_salt": ""}, path="/v1/chat/completions"), 400, param="cache_salt")


def test_prefix_caching_flags(model_dir):
    from server.app import engine_config

    assert settings_from(["--model", str(model_dir)]).enable_prefix_caching
    off = settings_from(["--model", str(model_dir), "--no-enable-prefix-caching"])
    assert not off.enable_prefix_caching and not engine_config(off).enable_prefix_caching
    assert settings_from(["--model", str(model_dir), "--enable-prefix-caching"]).enable_prefix_caching
