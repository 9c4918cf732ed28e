"""The scenarios: steady, overload (elastic against pinned), soak, cancel, and quick (for CI).

Each is a sequence of phases against one running server, separated by waits for the server to go
idle, followed by checks (no errors, no leaked KV blocks, bounded memory). Rates are set relative
to the full-chain capacity, measured first by a short calibration, unless given explicitly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from loadtests.client import CANCELLED
from loadtests.probe import ServerSnapshot, rss_bytes, snapshot, wait_idle
from loadtests.runner import PhaseResult, Target, run_phase
from loadtests.spec import Distribution, LoadSpec, Selection
from loadtests.stats import SLO, summarise
from loadtests.workload import make_plans

MIB = 1 << 20


@dataclass(frozen=True)
class RunOptions:
    """The command line's knobs (None: the scenario's default, or a value derived from calibration)."""

    prompt_tokens: Distribution | None = None
    output_tokens: Distribution | None = None
    seed: int = 0
    endpoint: str = "completions"
    prompt_format: str = "tokens"
    duration_s: float | None = None
    rate: float | None = None
    capacity_rps: float | None = None
    max_requests: int | None = None  # None: 5000, or what the soak's rate x duration needs
    load_factors: tuple[float, ...] = (2.0,)
    budget_ms: float | None = None
    mix: tuple[Selection, ...] | None = None
    cancel_share: float = 0.3
    calib_users: int = 64  # the server's default max_num_seqs: a full batch
    calib_duration_s: float = 15.0
    drain_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    rss_bound_mib: float = 64.0
    server_pid: int | None = None
    slo: SLO = SLO()


@dataclass
class ScenarioResult:
    """The phases of a run, their summaries, and what the scenario concluded."""

    phases: list[PhaseResult] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)
    calibration: dict | None = None
    comparison: dict | None = None
    server: dict = field(default_factory=dict)

    def add(self, phase: PhaseResult, slo: SLO) -> dict:
        self.phases.append(phase)
        self.summaries.append(summarise(phase, slo))
        return self.summaries[-1]

    def check(self, name: str, passed: bool, **details) -> None:
        self.checks[name] = {"passed": bool(passed), **details}


PROMPT_TOKENS, OUTPUT_TOKENS = Distribution("uniform", 32, 96), Distribution("fixed", 32)


def base_spec(opts: RunOptions, **kw) -> LoadSpec:
    """A phase with the run's lengths (or the defaults), seed, endpoint and bounds; kw overrides."""
    common = dict(prompt_tokens=opts.prompt_tokens or PROMPT_TOKENS,
                  output_tokens=opts.output_tokens or OUTPUT_TOKENS, seed=opts.seed,
                  endpoint=opts.endpoint, prompt_format=opts.prompt_format, max_requests=opts.max_requests or 5000,
                  drain_timeout_s=opts.drain_timeout_s)
    return LoadSpec(**(common | kw))


def full_chains(target: Target) -> Selection:
    """Pinned to all chains by model id (`<base>:c<n>`); the plain default for other servers."""
    return Selection(model_chains=target.n_chains) if target.n_chains else Selection()


async def phase(result: ScenarioResult, name: str, target: Target, spec: LoadSpec, opts: RunOptions,
                mode: str = "") -> dict:
    """Run one phase, summarise it, then wait for the server to be idle before the next."""
    summary = result.add(await run_phase(name, target, spec, make_plans(spec), mode), opts.slo)
    await settle(result, target, opts, f"after {name}")
    return summary


async def settle(result: ScenarioResult, target: Target, opts: RunOptions, when: str) -> ServerSnapshot | None:
    """Wait for the server to be idle and keep its /metrics snapshot in the result."""
    snap = await wait_idle(target, opts.idle_timeout_s)
    result.server.setdefault("snapshots", []).append({"when": when, **(snap.to_dict() if snap else {})})
    return snap


async def measure_capacity(result: ScenarioResult, target: Target, opts: RunOptions, selection: Selection,
                           name: str) -> dict:
    """Closed loop, calib_users clients with one chain selection: requests/s completed while all the
    clients were busy (the tail after the last send, with fewer clients, is left out), and latencies."""
    spec = base_spec(opts, arrival="users", users=opts.calib_users, duration_s=opts.calib_duration_s,
                     mix=(selection,), seed=opts.seed + 1000)
    s = await phase(result, name, target, spec, opts, mode="calibration")
    run = result.phases[-1]
    end = run.started + spec.duration_s
    done = sum(1 for r in run.records if r.outcome == "ok" and r.sent_at + r.e2e_s <= end)
    if done == 0:
        raise RuntimeError(f"{name} completed no request: {s['error_samples']}")
    return {"capacity_rps": round(done / spec.duration_s, 4), "e2e_ms": s["overall"]["e2e_ms"],
            "tokens_per_s": s["throughput_tokens_per_s"]}


async def calibrate(result: ScenarioResult, target: Target, opts: RunOptions) -> float:
    """Full-chain capacity (requests/s): closed loop, calib_users clients pinned to all chains."""
    if opts.capacity_rps:
        result.calibration = {"capacity_rps": opts.capacity_rps, "source": "--capacity"}
        return opts.capacity_rps
    full = await measure_capacity(result, target, opts, full_chains(target), "calibration")
    result.calibration = {**full, "source": "calibration", "users": opts.calib_users}
    return full["capacity_rps"]


def auto_budget(result: ScenarioResult, opts: RunOptions) -> float:
    """--budget-ms, else twice the median full-chain latency under the calibration's load."""
    if opts.budget_ms:
        return opts.budget_ms
    p50 = ((result.calibration or {}).get("e2e_ms") or {}).get("p50")
    budget = round(2 * p50, -1) if p50 else 10_000.0
    if result.calibration is not None:
        result.calibration["budget_ms"] = budget
    return budget


def mixed_selection(target: Target, budget_ms: float) -> tuple[Selection, ...]:
    """Every way to choose: the default, a pinned model id, `chains`, two tiers and a budget."""
    if not target.n_chains:
        return (Selection(),)
    n = target.n_chains
    return (Selection(weight=2), Selection(model_chains=1), Selection(chains=max(1, n // 2)),
            Selection(tier="economy"), Selection(tier="standard"), Selection(latency_budget_ms=budget_ms, weight=2))


async def check_blocks(result: ScenarioResult, target: Target, opts: RunOptions) -> None:
    """Once idle, every KV block of every pool is free again."""
    snap = await settle(result, target, opts, "final")
    if snap is None or snap.leaked_blocks is None:
        result.check("no_leaked_blocks", False, reason="the server exports no colm_kv_cache_*_blocks metrics")
        return
    result.check("no_leaked_blocks", snap.leaked_blocks == 0 and snap.idle, leaked_blocks=snap.leaked_blocks,
                 running=snap.running, waiting=snap.waiting, free=snap.kv_free, total=snap.kv_total)


def check_clean(result: ScenarioResult) -> None:
    """No errors, refusals or timeouts among requests whose client stayed to the end."""
    bad = [r for p in result.phases for r in p.records if r.outcome not in ("ok", CANCELLED)]
    result.check("no_errors", not bad, failed=len(bad), samples=sorted({r.error or r.outcome for r in bad})[:5])


async def steady(target: Target, opts: RunOptions) -> ScenarioResult:
    """Half the full-chain capacity (or --rate), every kind of chain selection, for 60 s."""
    result = ScenarioResult()
    rate = opts.rate or 0.5 * await calibrate(result, target, opts)
    mix = opts.mix or mixed_selection(target, auto_budget(result, opts))
    spec = base_spec(opts, arrival="poisson", rate=rate, duration_s=opts.duration_s or 60.0, mix=mix)
    await phase(result, "steady", target, spec, opts, mode="mixed")
    check_clean(result)
    await check_blocks(result, target, opts)
    return result


async def overload(target: Target, opts: RunOptions) -> ScenarioResult:
    """At each load factor x full-chain capacity, the same budgeted traffic twice: free to choose chains
    (elastic), then pinned to all chains by model id."""
    result = ScenarioResult()
    capacity = await calibrate(result, target, opts)
    budget = auto_budget(result, opts)
    if target.n_chains and target.n_chains > 1 and not opts.capacity_rps:
        # The ceiling of elastic serving: everything at one chain (context for the comparison).
        one = await measure_capacity(result, target, opts, Selection(model_chains=1), "calibration c1")
        result.calibration["one_chain_capacity_rps"] = one["capacity_rps"]
    rows = []
    for factor in opts.load_factors:
        spec = base_spec(opts, arrival="poisson", rate=factor * capacity, duration_s=opts.duration_s or 60.0,
                         mix=(Selection(latency_budget_ms=budget),))
        pinned_spec = replace(spec, mix=(replace(full_chains(target), latency_budget_ms=budget),))
        e = await phase(result, f"elastic x{factor:g}", target, spec, opts, mode="elastic")
        p = await phase(result, f"pinned x{factor:g}", target, pinned_spec, opts, mode="pinned")
        rows.append(_compare(factor, capacity, budget, e, p))
    result.comparison = {"rows": rows, "goals": {"goodput_ratio_min": 2.0, "budget_met_share_min": 0.9}}
    await check_blocks(result, target, opts)
    return result


def _compare(factor: float, capacity: float, budget: float, elastic: dict, pinned: dict) -> dict:
    eg, pg = elastic["goodput_requests_per_s"], pinned["goodput_requests_per_s"]
    ratio = round(eg / pg, 3) if pg > 0 else None
    share = elastic["overall"]["budget_met_share"]
    return {"load_factor": factor, "offered_rate_rps": round(factor * capacity, 4), "budget_ms": budget,
            "elastic_goodput_rps": eg, "pinned_goodput_rps": pg, "goodput_ratio": ratio,
            "elastic_budget_met_share": share, "pinned_budget_met_share": pinned["overall"]["budget_met_share"],
            "elastic_chosen_chains": elastic["chosen_chains"],
            "goodput_goal_met": pg == 0 and eg > 0 or (ratio is not None and ratio >= 2.0),
            "budget_goal_met": share is not None and share >= 0.9}


async def _sample_rss(pid: int, samples: list, t0: float, every: float = 5.0) -> None:
    while True:
        samples.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))
        await asyncio.sleep(every)


async def soak(target: Target, opts: RunOptions) -> ScenarioResult:
    """A moderate rate for a set time; memory measured after warm-up (the calibration) and at the end."""
    result = ScenarioResult()
    rate = 0.5 * await calibrate(result, target, opts) if not opts.rate else opts.rate
    if opts.rate:  # no calibration ran: warm up briefly so allocator growth at start-up is not counted
        warm = base_spec(opts, arrival="users", users=4, duration_s=10.0, max_requests=40)
        await phase(result, "warm-up", target, warm, opts, mode="warm-up")
    mix = opts.mix or mixed_selection(target, auto_budget(result, opts))
    pid, samples = opts.server_pid, []
    before = rss_bytes(pid) if pid else None
    sampler = asyncio.create_task(_sample_rss(pid, samples, time.monotonic())) if pid else None
    duration = opts.duration_s or 300.0
    spec = base_spec(opts, arrival="poisson", rate=rate, duration_s=duration, mix=mix, cancel_share=0.1,
                     max_requests=opts.max_requests or int(1.5 * rate * duration) + 10)  # time is the bound
    await phase(result, "soak", target, spec, opts, mode="mixed")
    if sampler:
        sampler.cancel()
    after = rss_bytes(pid) if pid else None
    check_clean(result)
    await check_blocks(result, target, opts)
    if before is None or after is None:
        result.check("rss_bounded", False, reason="server RSS unreadable (give --server-pid of a local server)")
    else:
        growth = (after - before) / MIB
        result.check("rss_bounded", growth <= opts.rss_bound_mib, pid=pid, rss_before_mib=round(before / MIB, 1),
                     rss_after_mib=round(after / MIB, 1), growth_mib=round(growth, 1), bound_mib=opts.rss_bound_mib,
                     samples_mib=[(t, round(b / MIB, 1)) for t, b in samples if b])
    return result


async def cancel(target: Target, opts: RunOptions) -> ScenarioResult:
    """A share of clients disconnect mid-stream; the others must see no error, and no block may leak."""
    result = ScenarioResult()
    rate = opts.rate or 0.5 * await calibrate(result, target, opts)
    mix = opts.mix or mixed_selection(target, auto_budget(result, opts))
    spec = base_spec(opts, arrival="poisson", rate=rate, duration_s=opts.duration_s or 60.0, mix=mix,
                     cancel_share=opts.cancel_share)
    before = await snapshot(target)
    await phase(result, "cancel", target, spec, opts, mode="mixed")
    check_clean(result)
    await check_blocks(result, target, opts)
    check_aborts(result, before, await snapshot(target))
    return result


def check_aborts(result: ScenarioResult, before: ServerSnapshot | None, after: ServerSnapshot | None) -> None:
    """The server counted the clients' disconnects as aborted requests (CoLM Serve's metrics only).

    A disconnect racing the last tokens may finish normally, so aborts may be fewer than disconnects,
    but never zero when there were some, and never more."""
    if before is None or after is None or not after.finished:
        return
    cancelled = sum(1 for p in result.phases for r in p.records if r.outcome == CANCELLED)
    aborted = int(after.finished.get("abort", 0) - before.finished.get("abort", 0))
    result.check("disconnects_abort", (aborted > 0 if cancelled else aborted == 0) and aborted <= cancelled,
                 cancelled=cancelled, server_aborted=aborted)


async def quick(target: Target, opts: RunOptions) -> ScenarioResult:
    """Under two minutes: every chain selection, streamed, a quarter cancelled mid-stream, at two open-loop
    rates (short prompts and outputs unless given, so it also fits a slow machine)."""
    result = ScenarioResult()
    before = await snapshot(target)
    mix = opts.mix or mixed_selection(target, opts.budget_ms or 60_000.0)
    lengths = replace(opts, prompt_tokens=opts.prompt_tokens or Distribution("uniform", 16, 48),
                      output_tokens=opts.output_tokens or Distribution("fixed", 16))
    for rate in (opts.rate or 2.0, 2.5 * (opts.rate or 2.0)):
        spec = base_spec(lengths, arrival="constant", rate=rate, duration_s=opts.duration_s or 10.0,
                         mix=mix, cancel_share=0.25, drain_timeout_s=min(opts.drain_timeout_s, 30.0),
                         seed=opts.seed + int(rate * 10))
        await phase(result, f"quick {rate:g}/s", target, spec, opts, mode="mixed")
    check_clean(result)
    await check_blocks(result, target, opts)
    check_aborts(result, before, await snapshot(target))
    return result


SCENARIOS = {"steady": steady, "overload": overload, "soak": soak, "cancel": cancel, "quick": quick}
