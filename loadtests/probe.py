"""What the load generator reads from the server besides answers: the served models, its /metrics
(engine queue, KV blocks per chain pool) and, for a local server, its resident memory.

The KV check is exact: once the server is idle, every pool's free block count must equal its total
(colm_kv_cache_free_blocks / colm_kv_cache_total_blocks); a difference is a leaked block. The free
count includes the blocks the prefix cache keeps (colm_kv_cache_cached_free_blocks, reported too):
nobody references them, so the check counts referenced blocks whether or not caching is on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests.runner import Target


class TargetError(ValueError):
    """The URL is not allowed, or the server cannot be used as a load target."""


def check_loopback(url: str, allow_remote: bool) -> str:
    """The URL without a trailing slash; TargetError for a non-loopback host unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"not an http(s) URL: {url!r}")
    if not allow_remote:
        try:
            addrs = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
        except socket.gaierror as e:
            raise TargetError(f"cannot resolve {parts.hostname!r}: {e}") from None
        if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
            raise TargetError(f"{parts.hostname} is not a loopback address; load tests only target this "
                              "machine unless --allow-remote is given (and you own the server)")
    return url.rstrip("/")


def discover(url: str, model: str | None = None, api_key: str | None = None, timeout: float = 10.0) -> Target:
    """The base model id and chain count from GET /v1/models (CoLM Serve cards carry `chains`)."""
    headers = Target(url, "", api_key=api_key).headers
    try:
        cards = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout).raise_for_status().json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise TargetError(f"GET {url}/v1/models failed: {e}") from None
    if not cards:
        raise TargetError(f"{url} serves no models")
    bases = [c for c in cards if not c.get("parent")] or cards
    base = next((c for c in cards if c["id"] == model), None) if model else bases[0]
    if base is None:
        raise TargetError(f"{url} does not serve {model!r}; it serves {', '.join(c['id'] for c in cards)}")
    return Target(url, base["id"], base.get("chains"), api_key)


@dataclass(frozen=True)
class ServerSnapshot:
    """The engine gauges at one instant (None where the server does not export them)."""

    running: float | None
    waiting: float | None
    kv_free: dict[str, float]
    kv_total: dict[str, float]
    finished: dict[str, float] = field(default_factory=dict)  # colm_requests_total by finish_reason
    kv_cached: dict[str, float] = field(default_factory=dict)  # free blocks holding a cached prefix

    @property
    def leaked_blocks(self) -> int | None:
        if not self.kv_total:
            return None
        return int(sum(self.kv_total[p] - self.kv_free.get(p, 0) for p in self.kv_total))

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and not self.leaked_blocks

    def to_dict(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "kv_free_blocks": self.kv_free,
                "kv_total_blocks": self.kv_total, "kv_cached_free_blocks": self.kv_cached,
                "leaked_blocks": self.leaked_blocks,
                "finished_by_reason": self.finished}


def parse_metrics(text: str) -> ServerSnapshot:
    """The engine gauges (and finished requests by reason) from a Prometheus text exposition."""
    values: dict[str, dict[str, float]] = {}
    finished: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "colm_requests_total":
                reason = s.labels.get("finish_reason", "")
                finished[reason] = finished.get(reason, 0.0) + s.value
            values.setdefault(s.name, {})[s.labels.get("chain", "")] = s.value
    one = lambda name: values.get(name, {}).get("")  # noqa: E731
    return ServerSnapshot(one("colm_requests_running"), one("colm_requests_waiting"),
                          values.get("colm_kv_cache_free_blocks", {}), values.get("colm_kv_cache_total_blocks", {}),
                          finished, values.get("colm_kv_cache_cached_free_blocks", {}))


async def snapshot(target: Target) -> ServerSnapshot | None:
    """The server's engine gauges now, or None if it has no (readable) /metrics."""
    try:
        async with httpx.AsyncClient(timeout=10.0, headers=target.headers) as client:
            resp = await client.get(f"{target.url}/metrics")
        return parse_metrics(resp.text) if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def wait_idle(target: Target, timeout: float = 30.0) -> ServerSnapshot | None:
    """Poll /metrics until nothing runs or waits and every KV block is free (aborted requests free their
    blocks at the engine's next step); returns the last snapshot, idle or not, after `timeout`."""
    deadline = time.monotonic() + timeout
    snap = await snapshot(target)
    while snap is not None and not snap.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        snap = await snapshot(target)
    return snap


def listening_pid(port: int) -> int | None:
    """The pid of the local process listening on TCP `port` (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    for pid in filter(str.isdigit, os.listdir("/proc")) if inodes else ():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process (bytes), or None if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def server_pid(url: str, given: int | None) -> int | None:
    """--server-pid, else the local process listening on the URL's port."""
    if given is not None:
        return given
    parts = urlsplit(url)
    return listening_pid(parts.port or (443 if parts.scheme == "https" else 80))
