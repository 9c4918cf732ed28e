"""Runs one phase: sends its plans on their arrival process and collects the records.

Open loop (poisson, constant): each request is sent at its planned time whatever the server does,
so an overloaded server sees its queue grow, as in production; a closed loop (users) would slow its
own arrivals and hide the overload. Both stop sending at the phase's bounds, then wait up to the
drain timeout and cancel what is left (counted as timed out, never silently dropped).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from loadtests.client import RequestRecord, send
from loadtests.spec import LoadSpec
from loadtests.workload import RequestPlan


@dataclass(frozen=True)
class Target:
    """The server under load: its base URL, the base model id, the full chain count (None for servers
    that are not CoLM Serve) and the API key to send, if the server wants one (never printed)."""

    url: str
    model: str
    n_chains: int | None = None
    api_key: str | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class PhaseResult:
    """The records of one phase, with its wall-clock span (monotonic seconds)."""

    name: str
    spec: LoadSpec
    records: list[RequestRecord]
    started: float
    sending_ended: float
    ended: float
    mode: str = ""  # what the phase compares, e.g. "elastic" or "pinned"


def _record(plan: RequestPlan) -> RequestRecord:
    return RequestRecord(plan.index, plan.selection.label, plan.selection.latency_budget_ms, plan.max_tokens,
                         planned_s=plan.send_at)


def new_client(spec: LoadSpec, connections: int, headers: dict[str, str]) -> httpx.AsyncClient:
    """One connection per concurrent request: a queued connection would add client-side latency."""
    timeout = httpx.Timeout(spec.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers)


async def _open_loop(client, target: Target, spec: LoadSpec, plans, records, tasks, t0: float) -> None:
    deadline = t0 + spec.duration_s
    for plan, rec in zip(plans, records):
        delay = t0 + plan.send_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > deadline:
            break
        tasks.append(asyncio.create_task(send(client, target.url, plan, target.model, spec.endpoint, rec)))


async def _closed_loop(client, target: Target, spec: LoadSpec, plans, records, tasks, t0: float) -> None:
    deadline = t0 + spec.duration_s
    queue = iter(zip(plans, records))

    async def user() -> None:
        for plan, rec in queue:  # a shared iterator: each plan goes to exactly one user
            if time.monotonic() > deadline:
                return
            await send(client, target.url, plan, target.model, spec.endpoint, rec)

    tasks.extend(asyncio.create_task(user()) for _ in range(spec.users))


async def run_phase(name: str, target: Target, spec: LoadSpec, plans: list[RequestPlan],
                    mode: str = "") -> PhaseResult:
    """Send `plans` under `spec`'s arrival process and bounds; records of unsent plans are dropped."""
    records = [_record(p) for p in plans]
    tasks: list[asyncio.Task] = []
    connections = spec.users if spec.arrival == "users" else len(plans)
    async with new_client(spec, max(1, connections), target.headers) as client:
        t0 = time.monotonic()
        if spec.arrival == "users":
            await _closed_loop(client, target, spec, plans, records, tasks, t0)
            await asyncio.wait(tasks, timeout=spec.duration_s)
        else:
            await _open_loop(client, target, spec, plans, records, tasks, t0)
        sending_ended = time.monotonic()
        pending = [t for t in tasks if not t.done()]
        if pending:
            _, pending = await asyncio.wait(pending, timeout=spec.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ended = time.monotonic()
    sent = [r for r in records if r.sent_at > 0]
    return PhaseResult(name, spec, sent, t0, sending_ended, ended, mode)
