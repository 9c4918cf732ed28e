"""What the Gateway API Inference Extension's endpoint picker (EPP) scrapes from each replica.

Its model server protocol asks for three gauges, under names it is configured with (flags
--total-queued-requests-metric, --total-running-requests-metric, --kv-cache-usage-percentage-metric,
or the core-metrics-extractor's engineConfigs; deploy/k8s/gateway/epp.yaml):

- queued requests: colm_requests_waiting; running requests: colm_requests_running (metrics.py);
- KV-cache usage, a fraction 0..1: colm_epp_kv_cache_usage_ratio, below.

CoLM has one KV pool per chain, so "the" KV usage is the fullest pool's (colm_kv_cache_usage_max_ratio):
that pool is the one that makes requests wait or lose chains first. A replica can also be degrading
chains (server/degradation.py) with its pools far from full: its queue or its recent demand is past
what it serves at the routed chain counts. The picker should avoid it, and it only weighs the metrics
above, so the KV gauge the picker reads is max(fullest pool, share of recent unpinned admissions that
lost chains): a replica that degrades every request reads as full, one that degrades none reads its
real KV usage. colm_degraded_requests_ratio exports that share on its own for dashboards and alerts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily

from colm_runtime.engine.types import EngineStats


class RecentDegradation:
    """The share of unpinned admissions of the last `window` seconds that got fewer chains than routed.
    Pinned requests (a chain count fixed by the client) are never degraded, so they do not count."""

    def __init__(self, window: float = 30.0, max_events: int = 100_000):
        self.window = window
        self.events: deque[tuple[float, bool]] = deque(maxlen=max_events)  # (monotonic time, degraded)

    def observe(self, now: float, degraded: bool) -> None:
        self.events.append((now, degraded))

    def share(self, now: float) -> float:
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()
        if not self.events:
            return 0.0
        return sum(d for _, d in self.events) / len(self.events)


class GatewayCollector:
    """The picker-facing gauges, read at scrape time like metrics._EngineCollector's."""

    def __init__(self, stats: Callable[[], EngineStats | None], degradation: RecentDegradation,
                 clock: Callable[[], float]):
        self.stats, self.degradation, self.clock = stats, degradation, clock

    def describe(self):
        return []

    def collect(self):
        kv_max = GaugeMetricFamily("colm_kv_cache_usage_max_ratio", "Used / total KV blocks of the fullest "
                                   "chain pool")
        degraded = GaugeMetricFamily("colm_degraded_requests_ratio", "Share of the unpinned requests admitted "
                                     "in the last 30 s that got fewer chains than routed (degradation)")
        epp = GaugeMetricFamily("colm_epp_kv_cache_usage_ratio", "KV-cache usage as the Gateway endpoint "
                                "picker reads it: max(fullest chain pool, share of recent degraded admissions)")
        s = self.stats()
        if s is not None:
            share = self.degradation.share(self.clock())
            usage = max(s.kv_usage, default=0.0)
            kv_max.add_metric([], usage)
            degraded.add_metric([], share)
            epp.add_metric([], max(usage, share))
        yield from (kv_max, degraded, epp)
