"""Servers for the reliability tests: real `colm serve` subprocesses (tests/server/conftest.py's
ServerProcess), one torch thread each, with API keys, the test-only fault hook and small limits.

`hardened`: keys from the environment and a file, /metrics protected, the fault hook on
(COLM_FAULT_INJECT=step:<FAULT_MARKER>), a small stream buffer (64 outputs).
`tight`: a small KV cache and per-key rate limits.
Both log to files the tests read (prompts must never appear there).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.conftest import ServerProcess
from tests.server.helpers import scrape  # noqa: F401

KEYS = ("rel-key-env-7f3a", "rel-key-file-91c2")
FAULT_MARKER = "qx-inject-fault-qx"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RATE_RPM, RATE_TPM = 6, 3000


def start(tmp_path_factory, model_dir, name: str, args=(), env=None) -> ServerProcess:
    log = tmp_path_factory.mktemp(name) / "server.log"
    return ServerProcess(model_dir, log, tuple(args), {**ONE_THREAD, **(env or {})}).wait_ready()


@pytest.fixture(scope="session")
def hardened(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("keys")
    (d / "keys.txt").write_text(f"# keys\n{KEYS[1]}\n")
    s = start(tmp_path_factory, model_dir, "hardened",
              ["--api-key-file", str(d / "keys.txt"), "--metrics-auth", "--max-stream-buffer", "64",
               "--max-num-seqs", "16"],
              {"COLM_API_KEYS": KEYS[0], "COLM_FAULT_INJECT": f"step:{FAULT_MARKER}"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tight(tmp_path_factory, model_dir):
    s = start(tmp_path_factory, model_dir, "tight",
              ["--kv-cache-memory", "1MiB", "--block-size", "16", "--rate-limit-rpm", str(RATE_RPM),
               "--rate-limit-tpm", str(RATE_TPM)], {"COLM_API_KEYS": ",".join(KEYS)})
    yield s
    s.stop()


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def client(hardened) -> httpx.Client:
    with httpx.Client(base_url=hardened.url, headers=auth(), timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def base_model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def wait_idle(url: str, headers: dict | None = None, timeout: float = 20.0) -> dict:
    """Poll /metrics until nothing runs or waits and every KV block is free; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url, headers)
        free = sum(v for (n, _), v in m.items() if n == "colm_kv_cache_free_blocks")
        total = sum(v for (n, _), v in m.items() if n == "colm_kv_cache_total_blocks")
        busy = m.get(("colm_requests_running", ()), 0) + m.get(("colm_requests_waiting", ()), 0)
        if (free == total and not busy) or time.monotonic() > deadline:
            return {"free": free, "total": total, "busy": busy, "metrics": m}
        time.sleep(0.1)


def assert_healthy(url: str, headers: dict, model: str) -> None:
    """A good request succeeds, then the server is idle with every KV block free."""
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                   json={"model": model, "prompt": "after the storm", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    idle = wait_idle(url, headers)
    assert idle["free"] == idle["total"] > 0 and idle["busy"] == 0, idle


def count_5xx(url: str, headers: dict) -> float:
    """HTTP responses with a 5xx status the server has sent (its own colm_http_requests_total)."""
    m = scrape(url, headers)
    return sum(v for (n, labels), v in m.items()
               if n == "colm_http_requests_total" and dict(labels).get("status", "").startswith("5"))
