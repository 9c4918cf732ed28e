"""Start `colm serve` as a real process on a loopback port and wait for /ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server process; `log` is its combined stdout and stderr, kept for failure messages."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, cwd: Path, log: Path, **popen):
        self.port = port
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, **popen)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """What the server printed so far (the tail, for assertion messages)."""
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float) -> httpx.Response:
        """Poll /ready until 200; fail with the server's output if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"/ready did not answer 200 within {timeout:.0f}s:\n{self.output()}")

    def terminate(self, timeout: float) -> int:
        """SIGTERM (as `docker stop` and the kubelet send it); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"server ignored SIGTERM for {timeout}s:\n{self.output()}") from None
        self._log_file.close()
        return self.proc.returncode
