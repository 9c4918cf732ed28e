"""Soak with mixed traffic (issue 9, item 6): good requests (completions and chat, streamed or not, at
random chain counts), cancellations (streams dropped mid-way, requests abandoned after a random delay)
and bad requests, from a fixed number of concurrent users for a set time. Then it checks:

- no 5xx (the server's own colm_http_requests_total, and every answer the users saw);
- every good request answered in full (200, a finish_reason, a stream ending in [DONE] with no error);
- every bad request answered with a 4xx;
- every KV block free once idle;
- resident memory stable: growth from the first third of the run to the end within --rss-bound-mib.

    python -m loadtests.soak_mixed --url http://127.0.0.1:8000 --duration 600 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from loadtests.probe import check_loopback, discover, rss_bytes, server_pid, wait_idle
from loadtests.runner import Target

MIB = 1 << 20


@dataclass(frozen=True)
class SoakConfig:
    """How long, how many users, and the traffic mix (the rest of the requests are good)."""

    duration_s: float = 60.0
    users: int = 6
    cancel_share: float = 0.2
    bad_share: float = 0.2
    max_tokens: int = 48
    seed: int = 0
    rss_bound_mib: float = 64.0


@dataclass
class SoakCounts:
    """What the users sent and saw."""

    sent: int = 0
    good: int = 0
    good_answered: int = 0
    good_unanswered: list[str] = field(default_factory=list)  # why, for the first few
    cancelled: int = 0
    bad: int = 0
    bad_4xx: int = 0
    bad_other: list[int] = field(default_factory=list)
    status_5xx_seen: int = 0


def _bad_bodies(model: str) -> list[tuple[str, bytes]]:
    """(path, raw body) of requests that must be refused with a 4xx."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    dump = lambda d: json.dumps(d).encode()  # noqa: E731
    return [(c, b'{"model": "x", "prompt": '), (c, dump({"model": model, "prompt": ""})),
            (c, dump({"model": model, "prompt": [1, 10**7]})), (c, dump({"model": model, "prompt": "x", "n": 999})),
            (c, dump({"model": model, "prompt": "x", "max_tokens": 10**6})),
            (c, dump({"model": model, "prompt": "x", "temperature": -3})),
            (c, dump({"model": "nope", "prompt": "x"})), (c, dump({"model": model, "prompt": "x", "chains": 77})),
            (c, dump({"model": model, "prompt": "x", "stop": ["s"] * 40})),
            (chat, dump({"model": model, "messages": []})), (c, b'{"model": "' + model.encode() + b'", "prompt": "\xff"}')]


class SoakUser:
    """One user: a loop of random requests until the deadline."""

    def __init__(self, target: Target, cfg: SoakConfig, rng: random.Random, counts: SoakCounts):
        self.t, self.cfg, self.rng, self.counts = target, cfg, rng, counts
        self.bad = _bad_bodies(target.model)

    def _good_body(self) -> tuple[str, dict]:
        rng, t = self.rng, self.t
        body = {"max_tokens": rng.randint(1, self.cfg.max_tokens), "temperature": rng.choice([0, 0.8]),
                "stream": rng.random() < 0.5, "seed": rng.randint(0, 1000)}
        if t.n_chains and rng.random() < 0.5:
            body["chains"] = rng.randint(1, t.n_chains)
        text = " ".join(rng.choice(["soak", "chain", "model", "token", "server", "python"]) for _ in range(rng.randint(1, 40)))
        if rng.random() < 0.5:
            return "/v1/completions", {"model": t.model, "prompt": text, "n": rng.choice([1, 1, 2]), **body}
        return "/v1/chat/completions", {"model": t.model, "messages": [{"role": "user", "content": text}], **body}

    async def run(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            roll = self.rng.random()
            self.counts.sent += 1
            if roll < self.cfg.bad_share:
                await self._bad(client)
            elif roll < self.cfg.bad_share + self.cfg.cancel_share:
                await self._cancel(client)
            else:
                await self._good(client)

    def _saw(self, status: int) -> None:
        self.counts.status_5xx_seen += status >= 500

    async def _bad(self, client: httpx.AsyncClient) -> None:
        path, raw = self.rng.choice(self.bad)
        self.counts.bad += 1
        r = await client.post(path, content=raw, headers={"content-type": "application/json"})
        self._saw(r.status_code)
        if 400 <= r.status_code < 500:
            self.counts.bad_4xx += 1
        else:
            self.counts.bad_other.append(r.status_code)

    async def _cancel(self, client: httpx.AsyncClient) -> None:
        path, body = self._good_body()
        body["max_tokens"] = self.cfg.max_tokens * 4
        self.counts.cancelled += 1
        if body["stream"]:
            async with client.stream("POST", path, json=body) as r:
                self._saw(r.status_code)
                stop_after = self.rng.randint(0, 8)
                async for i, _ in _aenumerate(r.aiter_lines()):
                    if i >= stop_after:
                        break  # leaving the block drops the connection mid-stream
            return
        try:
            r = await asyncio.wait_for(client.post(path, json=body), self.rng.uniform(0.05, 1.0))
            self._saw(r.status_code)
        except asyncio.TimeoutError:
            pass

    async def _good(self, client: httpx.AsyncClient) -> None:
        path, body = self._good_body()
        self.counts.good += 1
        why = await (_stream_problem(client, path, body) if body["stream"] else _plain_problem(client, path, body))
        if why is None:
            self.counts.good_answered += 1
        else:
            self.counts.status_5xx_seen += why.startswith("5")
            if len(self.counts.good_unanswered) < 10:
                self.counts.good_unanswered.append(why)


async def _aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


async def _plain_problem(client: httpx.AsyncClient, path: str, body: dict) -> str | None:
    r = await client.post(path, json=body)
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    choices = r.json()["choices"]
    n = body.get("n", 1)
    if len(choices) != n or any(c["finish_reason"] not in ("stop", "length") for c in choices):
        return f"200 without a finish: {choices}"[:300]
    return None


async def _stream_problem(client: httpx.AsyncClient, path: str, body: dict) -> str | None:
    finished: set[int] = set()
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"{r.status_code} {(await r.aread())[:200]!r}"
        last = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last != "[DONE]":
                chunk = json.loads(last)
                if "error" in chunk:
                    return f"stream error {chunk['error']}"
                finished |= {c["index"] for c in chunk.get("choices", []) if c.get("finish_reason")}
    if last != "[DONE]":
        return "stream ended without [DONE]"
    return None if len(finished) == body.get("n", 1) else f"stream finished {len(finished)} of {body.get('n', 1)}"


async def _server_5xx(target: Target) -> float:
    async with httpx.AsyncClient(timeout=10, headers=target.headers) as c:
        text = (await c.get(f"{target.url}/metrics")).text
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "colm_http_requests_total" and s.labels.get("status", "").startswith("5"))


async def run_soak(target: Target, cfg: SoakConfig, pid: int | None = None) -> dict:
    """Run the soak against a running server; the report (figures and checks) as a dict."""
    rng = random.Random(cfg.seed)
    counts = SoakCounts()
    base_5xx = await _server_5xx(target)
    start = time.monotonic()
    deadline = start + cfg.duration_s
    rss: list[tuple[float, int]] = []

    async def sample_rss() -> None:
        while pid is not None and time.monotonic() < deadline:
            if (b := rss_bytes(pid)) is not None:
                rss.append((time.monotonic() - start, b))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=cfg.users * 2)
    async with httpx.AsyncClient(base_url=target.url, headers=target.headers, timeout=120, limits=limits) as client:
        users = [SoakUser(target, cfg, random.Random(rng.random()), counts) for _ in range(cfg.users)]
        await asyncio.gather(sample_rss(), *(u.run(client, deadline) for u in users))
    idle = await wait_idle(target, timeout=60)
    end_rss = rss_bytes(pid) if pid is not None else None
    server_5xx = await _server_5xx(target) - base_5xx
    third = [b for t, b in rss if t >= cfg.duration_s / 3]
    growth_mib = (end_rss - third[0]) / MIB if third and end_rss is not None else None
    checks = {
        "no_5xx": server_5xx == 0 and counts.status_5xx_seen == 0,
        "every_good_answered": counts.good_answered == counts.good,
        "every_bad_4xx": counts.bad_4xx == counts.bad,
        "kv_blocks_free": idle is not None and idle.leaked_blocks == 0 and idle.idle,
        "memory_stable": growth_mib is None or growth_mib <= cfg.rss_bound_mib,
    }
    return {"config": asdict(cfg), "counts": asdict(counts), "server_5xx": server_5xx,
            "seconds": round(time.monotonic() - start, 1), "idle": idle.to_dict() if idle else None,
            "rss_mib": {"first_third": round(third[0] / MIB, 1) if third else None,
                        "end": round(end_rss / MIB, 1) if end_rss else None,
                        "growth": None if growth_mib is None else round(growth_mib, 1),
                        "bound": cfg.rss_bound_mib},
            "checks": checks, "passed": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak_mixed", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token (never printed)")
    p.add_argument("--allow-remote", action="store_true", help="target a non-loopback host you own")
    p.add_argument("--server-pid", type=int, default=None, help="for the memory check (default: found locally)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    for name, value in asdict(SoakConfig()).items():
        p.add_argument(f"--{name.replace('_', '-').removesuffix('-s')}", dest=name, type=type(value), default=value)
    args = p.parse_args(argv)
    url = check_loopback(args.url, args.allow_remote)
    target = discover(url, api_key=args.api_key)
    cfg = SoakConfig(**{k: getattr(args, k) for k in asdict(SoakConfig())})
    report = asyncio.run(run_soak(target, cfg, server_pid(url, args.server_pid)))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
