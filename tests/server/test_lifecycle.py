"""Start-up validation and SIGTERM: the server stops admitting, drains what is in flight, then exits 0;
a stream still running at the drain deadline ends with an error chunk and [DONE]."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from tests.server.conftest import COLM, REPO, start_server
from tests.server.helpers import sse_events


def _stream_after_sigterm(server, max_tokens: int) -> tuple[list, list[str]]:
    """Start a long stream, SIGTERM the server after its first chunks, probe admission while it drains,
    and return the stream's events plus what the probes saw."""
    url = server.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    probes = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
        seen = [next(events), next(events)]
        server.signal(signal.SIGTERM)
        time.sleep(0.3)
        for path in ("/ready", "/v1/models"):
            try:
                probes.append(str(httpx.get(f"{url}{path}", timeout=5).status_code))
            except httpx.TransportError:
                probes.append("refused")
        seen.extend(events)
    return seen, probes


def test_sigterm_drains_in_flight(tmp_path_factory, model_dir):
    server = start_server(tmp_path_factory, model_dir, "drain", args=["--drain-timeout", "60"])
    try:
        limit = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
        events, probes = _stream_after_sigterm(server, min(limit - 16, 400))
        assert events[-1] == "[DONE]"
        final = [e for e in events[:-1] if e["choices"]][-1]["choices"][0]
        assert final["finish_reason"] == "length"  # it ran to its end, not cut off
        assert sum(len(e["choices"]) for e in events[:-1]) >= 2
        assert all(p in ("503", "refused") for p in probes), probes  # admission stopped
        assert server.proc.wait(timeout=30) == 0
        assert "drained; engine stopped" in server.log()
    finally:
        server.stop()


def test_drain_deadline_ends_streams_with_error_chunk(tmp_path_factory, model_dir):
    server = start_server(tmp_path_factory, model_dir, "deadline", args=["--drain-timeout", "0.3"])
    try:
        limit = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
        events, _ = _stream_after_sigterm(server, limit - 16)
        assert events[-1] == "[DONE]"
        error = events[-2]
        assert set(error) == {"error"} and error["error"]["code"] == "draining"
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("args,expect", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--port", "70000"], "port"),
    (["--dtype", "float64"], "dtype"),
    (["--max-body-bytes", "lots"], "not a size"),
    (["--default-tier", "gold"], "default tier 'gold'"),
])
def test_bad_settings_fail_fast(model_dir, args, expect):
    cmd = [*COLM, "serve", "--model", str(model_dir), *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and expect in p.stderr, p.stderr


def test_bad_tier_file_fails_fast(model_dir, tmp_path):
    (tmp_path / "tiers.yaml").write_text("tiers:\n  huge: {chains: 99}\n")
    cmd = [*COLM, "serve", "--model", str(model_dir),
           "--tiers-file", str(tmp_path / "tiers.yaml")]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "tier 'huge'" in p.stderr, p.stderr


def test_before_the_model_loads_everything_is_503(model_dir):
    """The app before its lifespan has run (no engine yet): /ready and the API answer 503 not_ready
    with Retry-After, /health stays 200."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    client = TestClient(create_app(ServerSettings(model=model_dir)))  # no `with`: no lifespan, no engine
    assert client.get("/health").status_code == 200
    for r in (client.get("/ready"), client.get("/v1/models"),
              client.post("/v1/completions", json={"model": "m", "prompt": "x"})):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "not_ready" and r.json()["error"]["type"] == "service_unavailable_error"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_fails_requests_instead_of_hanging(model_dir):
    """Fault injection into the real engine: if its loop dies (an exception it does not expect),
    waiting requests get 503 engine_dead within a second, and /health and /ready turn 503."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    app = create_app(ServerSettings(model=model_dir, access_log=False))
    with TestClient(app) as client:
        class Fatal(BaseException):
            """Not an Exception: per-request isolation does not catch it, so the loop dies."""

        def broken(request, **kwargs):
            raise Fatal("injected fault")

        app.state.colm.engine.engine.add_request = broken  # the engine thread dies on the next request
        start = time.monotonic()
        r = client.post("/v1/completions", json={"model": app.state.colm.base_name, "prompt": "x", "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert time.monotonic() - start < 5
        assert client.get("/health").status_code == 503 and client.get("/ready").status_code == 503
