"""Faults (issue 9, item 3) against real servers: clients that disconnect at random points, a client
that stops reading its stream, an exception inside one request, KV exhaustion, SIGTERM with requests in
flight. (A missing, corrupt or mismatched model directory at start-up: test_startup.py.)"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.reliability.conftest import (FAULT_MARKER, KEYS, assert_healthy, auth, count_5xx, start,
                                        wait_idle)
from tests.server.helpers import metric, scrape, sse_events


def _completion(url: str, model: str, headers: dict, **kw) -> httpx.Response:
    body = {"model": model, "prompt": "The engine keeps going", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)


def _stream(url: str, model: str, headers: dict, **kw) -> list:
    body = {"model": model, "prompt": "The engine keeps going", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True, **kw}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        return list(sse_events(r))


def test_random_disconnects(hardened, base_model):
    """Streams dropped after a random number of chunks and non-streaming requests dropped after a
    random delay: every engine request is aborted, its blocks freed, nothing answers 5xx."""
    rng, url, h = random.Random(9), hardened.url, auth()
    before = count_5xx(url, h)
    aborted_before = sum(v for (n, l), v in scrape(url, h).items()
                         if n == "colm_requests_total" and dict(l)["finish_reason"] == "abort")
    # 1000 tokens (colm-tiny's context is 1024) take over a second even alone on a fast machine, so every client
    # below leaves while its request is still running: each one must end as an abort.
    body = {"model": base_model, "prompt": "disconnect me", "max_tokens": 1000, "ignore_eos": True}

    def drop_stream(k: int) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=h, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= k:
                    break  # leaving the block closes the connection mid-stream

    def drop_wait(seconds: float) -> None:
        try:
            httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=seconds)
        except httpx.TimeoutException:
            pass

    jobs = [(drop_stream, rng.randint(0, 20)) for _ in range(6)] + [(drop_wait, rng.uniform(0.05, 0.3)) for _ in range(6)]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: j[0](j[1]), jobs))
    idle = wait_idle(url, h)
    assert idle["free"] == idle["total"] and idle["busy"] == 0, idle
    aborted = sum(v for (n, l), v in idle["metrics"].items()
                  if n == "colm_requests_total" and dict(l)["finish_reason"] == "abort") - aborted_before
    assert aborted == len(jobs), aborted
    assert count_5xx(url, h) == before
    assert_healthy(url, h, base_model)


def _stalled_stream(url: str, model: str, key: str) -> socket.socket:
    """A streaming request on a raw socket with a tiny receive buffer, never read."""
    body = json.dumps({"model": model, "prompt": "a stalled reader", "max_tokens": 1000, "ignore_eos": True,
                       "stream": True, "logprobs": 20, "n": 16, "best_of": 16, "chains": 1}).encode()
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def test_slow_client_is_bounded(hardened, base_model):
    """A client that stops reading (16 completions with 20 logprobs a token: megabytes): once the socket
    and uvicorn's write buffer are full and --max-stream-buffer outputs wait, the request is aborted in
    the engine (blocks freed, nothing running) while the connection is still open;
    other requests are served meanwhile."""
    url, h = hardened.url, auth()
    slow_before = metric(scrape(url, h), "colm_rejected_requests_total", reason="slow_client")
    s = _stalled_stream(url, base_model, KEYS[0])
    try:
        assert _completion(url, base_model, h).status_code == 200  # others go on
        deadline = time.monotonic() + 60
        while metric(scrape(url, h), "colm_rejected_requests_total", reason="slow_client") == slow_before:
            assert time.monotonic() < deadline, "the stalled stream was never aborted"
            time.sleep(0.2)
        idle = wait_idle(url, h)  # the engine stopped generating for it: nothing runs, every block free
        assert idle["free"] == idle["total"] and idle["busy"] == 0, idle
        assert _completion(url, base_model, h).status_code == 200
    finally:
        s.close()
    assert_healthy(url, h, base_model)


def test_exception_in_one_request_fails_it_alone(hardened, base_model):
    """The fault hook (COLM_FAULT_INJECT=step:<marker>, set only in this server's environment) makes
    the marked request raise inside the engine: it fails (500 / an error chunk then [DONE]); the
    requests running beside it finish normally."""
    url, h = hardened.url, auth()
    bad = f"please {FAULT_MARKER} now"
    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(_completion, url, base_model, h, max_tokens=40) for _ in range(2)]
        good_streams = [pool.submit(_stream, url, base_model, h, max_tokens=40) for _ in range(2)]
        time.sleep(0.3)
        bad_plain = pool.submit(_completion, url, base_model, h, prompt=bad)
        bad_stream = pool.submit(_stream, url, base_model, h, prompt=bad)
        r = bad_plain.result()
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        assert "InjectedFault" in r.json()["error"]["message"]
        events = bad_stream.result()
        assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}, events[-3:]
        for f in goods:
            out = f.result()
            assert out.status_code == 200 and out.json()["choices"][0]["finish_reason"] == "length"
            assert out.json()["usage"]["completion_tokens"] == 40
        for f in good_streams:
            events = f.result()
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
            assert [e for e in events[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert hardened.proc.poll() is None and httpx.get(f"{url}/health").status_code == 200
    assert_healthy(url, h, base_model)


def test_kv_exhaustion_shrinks_and_preempts(tight):
    """Four requests needing 2.5x the KV cache (16 blocks a pool): the engine shrinks elastic requests
    and preempts, every request completes in full, and every block is free afterwards."""
    url, h = tight.url, auth(KEYS[0])
    model = httpx.get(f"{url}/v1/models", headers=h).json()["data"][0]["id"]
    prompt = list(range(10, 40))
    reqs = [dict(prompt=prompt, max_tokens=120), dict(prompt=prompt, max_tokens=120),
            dict(prompt=prompt, max_tokens=120, model=f"{model}:c4"), dict(prompt=prompt, max_tokens=120, stream=True)]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_stream if r.pop("stream", False) else _completion, url, r.pop("model", model), h, **r)
                for r in reqs]
        results = [f.result() for f in futs]
    for res in results:
        if isinstance(res, list):
            assert res[-1] == "[DONE]" and sum(len(e["choices"]) for e in res[:-1] if e["choices"]) >= 100
        else:
            assert res.status_code == 200, res.text
            assert res.json()["usage"]["completion_tokens"] == 120
    m = scrape(url, h)
    assert metric(m, "colm_chain_shrinks_total") + metric(m, "colm_preemptions_total") > 0
    idle = wait_idle(url, h)
    assert idle["free"] == idle["total"] and idle["busy"] == 0, idle
    assert count_5xx(url, h) == 0 and tight.proc.poll() is None


def _wait_admitted(url: str, n: int, timeout: float = 60.0) -> None:
    """Until the server has admitted n requests (colm_routed_requests_total over every label)."""
    deadline = time.monotonic() + timeout
    while sum(v for (name, _), v in scrape(url).items() if name == "colm_routed_requests_total") < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests admitted in {timeout} s"
        time.sleep(0.01)


def test_sigterm_drains_every_request(tmp_path_factory, model_dir):
    """SIGTERM with six requests in flight (streams and not): all six finish in full, exit status 0."""
    server = start(tmp_path_factory, model_dir, "sigterm", ["--drain-timeout", "60"])
    url = server.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    try:
        started = threading.Barrier(7)

        def stream_one() -> list:
            body = {"model": model, "prompt": "drain me", "max_tokens": 60, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                events = sse_events(r)
                first = [next(events)]
                started.wait()
                return first + list(events)

        def plain_one() -> httpx.Response:
            started.wait()
            return _completion(url, model, {}, max_tokens=60)

        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(stream_one) for _ in range(3)] + [pool.submit(plain_one) for _ in range(3)]
            started.wait(timeout=60)
            _wait_admitted(url, 6)  # SIGTERM before a request reaches the server would (rightly) refuse it
            server.signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futs]
        for res in results[:3]:
            assert res[-1] == "[DONE]"
            assert [e for e in res[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"
        for res in results[3:]:
            assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] == 60, res.text
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
