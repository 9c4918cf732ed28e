"""Repeated step failures make /health answer 503 (so that an orchestrator restarts the process); a
lone failed step does not. A real `colm serve` with the test-only fault hook at the batched forward
(COLM_FAULT_INJECT=forward:<marker>): a step that schedules a marked request raises, which fails that
step's requests; the engine goes on."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.conftest import FAULT_MARKER, assert_healthy, start


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, model_dir):
    s = start(tmp_path_factory, model_dir, "faulty", ["--max-num-seqs", "4"],
              {"COLM_FAULT_INJECT": f"forward:{FAULT_MARKER}"})
    yield s
    s.stop()


def _bad(url: str, model: str) -> None:
    body = {"model": model, "prompt": f"please {FAULT_MARKER} now", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 500 and "InjectedFault" in r.json()["error"]["message"], r.text


def test_repeated_step_failures_turn_health_unhealthy(faulty):
    url = faulty.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    _bad(url, model)  # one failed step: its request fails, the engine serves on
    assert httpx.get(f"{url}/health").status_code == 200
    assert_healthy(url, {}, model)  # a good step: the run of failures starts again
    for _ in range(2):
        _bad(url, model)
        assert httpx.get(f"{url}/health").status_code == 200
    _bad(url, model)  # the third failed step in a row (EngineConfig.max_step_failures)
    r = httpx.get(f"{url}/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unhealthy", r.text
    assert faulty.proc.poll() is None  # the process stays up until the orchestrator restarts it
