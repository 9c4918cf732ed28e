"""Real servers for the HTTP tests: `colm serve` subprocesses on free loopback ports.

The model is the default one (models/colm-tiny) when it exists, else a random model directory from
colm_runtime.testing, so the tests run on a fresh checkout too. Each server's log goes to a file that
is printed when a test using it fails to start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


REPO = Path(__file__).resolve().parents[2]
# `colm` as installed (the console script's entry point); `python -m colm_runtime.cli` would load the CLI
# module twice (as __main__ and by name), and its CLIError would not be caught.
COLM = [sys.executable, "-c", "import sys; from colm_runtime.cli import main; sys.exit(main())"]
API_KEYS = ("test-key-1", "test-key-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `colm serve` subprocess; .url, .stop(), .signal()."""

    def __init__(self, model_dir: Path, log_path: Path, args: tuple[str, ...] = (), env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [*COLM, "serve", "--model", str(model_dir),
               "--port", str(self.port), *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("COLM_")}
        full_env.update(env or {})
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(tmp_path_factory, model_dir: Path, name: str, args=(), env=None) -> ServerProcess:
    log = tmp_path_factory.mktemp(name) / "server.log"
    return ServerProcess(model_dir, log, tuple(args), env).wait_ready()


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_dir):
    """The default server: no API keys, default tiers; fp32 (the checkpoint's) whatever --dtype auto
    picks here, because tests compare its logprobs with an fp32 full forward (test_prompt_logprobs)."""
    s = start_server(tmp_path_factory, model_dir, "main", args=["--dtype", "float32"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory, model_dir):
    """API keys (one from the environment, one from a file), /metrics protected, a small body limit,
    a prompt limit and a custom tier file."""
    d = tmp_path_factory.mktemp("auth-config")
    (d / "keys.txt").write_text(f"# API keys\n{API_KEYS[1]}\n")
    (d / "tiers.yaml").write_text("tiers:\n  bronze: {chains: 1, priority: -5}\n"
                                  "  gold: {chains: all, priority: 5, latency_budget_ms: 60000}\n")
    s = start_server(tmp_path_factory, model_dir, "auth",
                     args=["--api-key-file", str(d / "keys.txt"), "--metrics-auth", "--max-body-bytes", "4KiB",
                           "--max-prompt-tokens", "64", "--tiers-file", str(d / "tiers.yaml"),
                           "--default-tier", "bronze"],
                     env={"COLM_API_KEYS": API_KEYS[0]})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def model_info(server) -> dict:
    """The /v1/models listing of the default server: base id, chain count, context length."""
    data = httpx.get(f"{server.url}/v1/models").json()["data"]
    base = data[0]
    return {"base": base["id"], "n_chains": base["chains"], "max_model_len": base["max_model_len"], "data": data}


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    r = httpx.get(f"{url}/metrics", headers=headers or {})
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
