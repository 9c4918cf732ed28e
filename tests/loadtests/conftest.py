"""A real `colm serve` subprocess on a free loopback port for the load-test tests.

The model is the default one (models/colm-tiny) when it is there, else a random model directory, so
the tests also run on a fresh checkout. The server's log is shown when it fails to start.
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


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def load_model_dir(model_dir) -> Path:
    """The served model: tests/conftest.py's model_dir (the default model, else a random one)."""
    return model_dir


@pytest.fixture(scope="session")
def load_server(tmp_path_factory, load_model_dir):
    """(url, pid) of a running server; SIGTERM (then SIGKILL) at the end of the session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("load-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLM_")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "colm_runtime.cli", "serve", "--model", str(load_model_dir),
                                 "--port", str(port), "--no-access-log"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, url, log)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
