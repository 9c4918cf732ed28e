"""Limits (issue 9, item 4): per-API-key rate limits (requests and tokens per minute, sliding window,
429 + Retry-After), a bounded waiting queue (429 + Retry-After), and every limit a setting."""

from __future__ import annotations

import httpx
import pytest

from server.errors import InvalidRequest
from server.ratelimit import WINDOW_S, RateLimited, RateLimiter, RateLimits
from server.settings import ServerSettings
from tests.reliability.conftest import KEYS, RATE_RPM, RATE_TPM, auth
from tests.server.helpers import assert_error, metric, scrape


def test_requests_per_minute_window():
    t = 1000.0  # monotonic seconds
    rl = RateLimiter(RateLimits(requests_per_minute=3))
    for _ in range(3):
        rl.charge("k", 10, t)
        t += 10
    with pytest.raises(RateLimited) as e:
        rl.charge("k", 10, t)
    assert e.value.headers["Retry-After"] == "30"  # the first request leaves the window at t0 + 60
    rl.charge("other-key", 10, t)  # per key
    t += 30
    rl.charge("k", 10, t)  # the first one expired


def test_tokens_per_minute_window():
    t = 1000.0  # monotonic seconds
    rl = RateLimiter(RateLimits(tokens_per_minute=100))
    rl.charge("k", 60, t)
    t += 20
    rl.charge("k", 30, t)
    with pytest.raises(RateLimited) as e:
        rl.charge("k", 20, t)
    assert e.value.headers["Retry-After"] == "40" and e.value.status == 429
    with pytest.raises(InvalidRequest):
        rl.charge("k", 101, t)  # could never pass: 400, not 429
    t += 40
    rl.charge("k", 20, t)
    t += WINDOW_S
    rl.charge("k", 100, t)


def test_no_keys_no_limits():
    """Without API keys (key None) nothing is limited or recorded; the same limits bind a key, and no
    limits at all let a key through."""
    rl, t = RateLimiter(RateLimits(requests_per_minute=1, tokens_per_minute=100)), 0.0
    for _ in range(5):
        rl.charge(None, 10**6, t)  # neither limit applies
    assert rl._windows == {}  # and nothing was recorded against anyone
    rl.charge("k", 10, t)
    with pytest.raises(RateLimited):
        rl.charge("k", 10, t)  # the second request of a minute for a key
    with pytest.raises(InvalidRequest):
        rl.charge("k", 10**6, t)
    unlimited = RateLimiter(RateLimits())
    for _ in range(5):
        unlimited.charge("k", 10**6, t)
    assert unlimited._windows == {}


def test_rate_limits_live(tight):
    """RATE_RPM requests a minute for one key: the next is 429 rate_limit_exceeded with Retry-After;
    another key is unaffected; a request over the token limit alone is 400."""
    url, h = tight.url, auth(KEYS[1])
    model = httpx.get(f"{url}/v1/models", headers=h).json()["data"][0]["id"]
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": RATE_TPM}, headers=h),
                 400, param="max_tokens")
    codes = [httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60).status_code
             for _ in range(RATE_RPM)]
    assert codes == [200] * RATE_RPM
    r = httpx.post(f"{url}/v1/completions", json=body, headers=h)
    assert_error(r, 429, "rate_limit_exceeded")
    assert r.json()["error"]["type"] == "rate_limit_error" and 1 <= int(r.headers["retry-after"]) <= 60
    assert httpx.post(f"{url}/v1/completions", json=body, headers=auth(KEYS[0]), timeout=60).status_code == 200
    assert metric(scrape(url, h), "colm_rejected_requests_total", reason="rate_limited") >= 1


def test_every_limit_is_a_setting():
    """Each limit of docs/reliability.md is a ServerSettings field (so a flag and a COLM_* variable)."""
    fields = ServerSettings.model_fields
    for name in ("max_waiting", "max_num_seqs", "max_num_batched_tokens", "max_body_bytes", "max_prompt_tokens",
                 "max_model_len", "max_stream_buffer", "rate_limit_rpm", "rate_limit_tpm", "drain_timeout",
                 "kv_cache_memory"):
        assert name in fields, name
    from server.cli import _FLAGS

    assert {"max_stream_buffer", "rate_limit_rpm", "rate_limit_tpm"} <= {v[0] for v in _FLAGS.values()}
