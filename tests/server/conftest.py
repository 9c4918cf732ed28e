"""Real servers for the HTTP tests: the app in this process (`app`, tests/server/inprocess.py) wherever
a separate process is not the point, and `colm serve` subprocesses on free loopback ports for client
disconnects, overload with held streams, signals and logs.

The model is the default one (models/colm-tiny) when it exists, else a random model directory from
colm_runtime.testing, so the tests run on a fresh checkout too. Each subprocess's log goes to a file
that is printed when a test using it fails to start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# The HTTP helpers live in helpers.py; re-exported for the test packages that import them from here.
from tests.server.helpers import assert_error, metric, scrape, sse_events  # noqa: F401
from tests.server.inprocess import InProcessServer


REPO = Path(__file__).resolve().parents[2]
# `colm` as installed (the console script's entry point); `python -m colm_runtime.cli` would load the CLI
# module twice (as __main__ and by name), and its CLIError would not be caught.
COLM = [sys.executable, "-c", "import sys; from colm_runtime.cli import main; sys.exit(main())"]
API_KEYS = ("test-key-1", "test-key-2")
TIERS_YAML = "tiers:\n  bronze: {chains: 1, priority: -5}\n  gold: {chains: all, priority: 5, latency_budget_ms: 60000}\n"


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
def app(model_dir):
    """The default server in this process: no API keys, default tiers; fp32 (the checkpoint's) whatever
    --dtype auto picks here, because tests compare its logprobs with an fp32 full forward
    (test_prompt_logprobs)."""
    s = InProcessServer(model_dir, dtype="float32")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def auth_app(tmp_path_factory, model_dir):
    """In this process: API keys (two), /metrics protected, a small body limit, a prompt limit and a
    custom tier file (`auth_server`'s settings)."""
    d = tmp_path_factory.mktemp("auth-app-config")
    (d / "keys.txt").write_text(f"# API keys\n{API_KEYS[1]}\n")
    (d / "tiers.yaml").write_text(TIERS_YAML)
    s = InProcessServer(model_dir, api_keys=API_KEYS[:1], api_key_file=d / "keys.txt", metrics_auth=True, max_body_bytes=4096, max_prompt_tokens=64,
                        tiers_file=d / "tiers.yaml", default_tier="bronze")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_dir):
    """The default server as a subprocess: no API keys, default tiers; fp32 (the checkpoint's)
    whatever --dtype auto picks here, like the in-process `app`."""
    s = start_server(tmp_path_factory, model_dir, "main", args=["--dtype", "float32"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory, model_dir):
    """API keys (one from the environment, one from a file), /metrics protected, a small body limit,
    a prompt limit and a custom tier file."""
    d = tmp_path_factory.mktemp("auth-config")
    (d / "keys.txt").write_text(f"# API keys\n{API_KEYS[1]}\n")
    (d / "tiers.yaml").write_text(TIERS_YAML)
    s = start_server(tmp_path_factory, model_dir, "auth",
                     args=["--api-key-file", str(d / "keys.txt"), "--metrics-auth", "--max-body-bytes", "4KiB",
                           "--max-prompt-tokens", "64", "--tiers-file", str(d / "tiers.yaml"),
                           "--default-tier", "bronze"],
                     env={"COLM_API_KEYS": API_KEYS[0]})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def model_info(app) -> dict:
    """The /v1/models listing of the default server: base id, chain count, context length."""
    data = app.client.get("/v1/models").json()["data"]
    base = data[0]
    return {"base": base["id"], "n_chains": base["chains"], "max_model_len": base["max_model_len"], "data": data}
