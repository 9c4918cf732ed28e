"""The picker-facing gauges of server/gateway_metrics.py: the share of recent unpinned admissions that
were degraded is a sliding window, and the KV gauge the picker reads is max(fullest pool, that share)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from colm_runtime.engine.types import EngineStats
from server.gateway_metrics import GatewayCollector, RecentDegradation


def test_share_is_a_sliding_window():
    w = RecentDegradation(window=10.0)
    assert w.share(0.0) == 0.0
    for t, degraded in [(0.0, True), (1.0, False), (2.0, False), (3.0, True)]:
        w.observe(t, degraded)
    assert w.share(3.0) == 0.5
    assert w.share(10.5) == 1 / 3  # the event at t=0 left the window
    assert w.share(13.5) == 0.0  # all gone: a replica that stopped degrading reads 0


def _gauges(kv_usage: tuple[float, ...], share_events: list[bool]) -> dict[str, float]:
    w = RecentDegradation()
    for d in share_events:
        w.observe(100.0, d)
    stats = EngineStats(running=1, waiting=0, kv_usage=kv_usage, kv_blocks_total=(10,) * len(kv_usage),
                        kv_blocks_free=tuple(10 - round(10 * u) for u in kv_usage), step_time_per_chains={},
                        prefill_time_per_token={}, preemptions_total=0, shrinks_total=0, steps_total=0, alive=True)
    reg = CollectorRegistry()
    reg.register(GatewayCollector(lambda: stats, w, clock=lambda: 100.0))
    text = generate_latest(reg).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_picker_gauge_is_the_fullest_pool_or_the_degraded_share():
    g = _gauges((0.2, 0.7, 0.1), [False, False, False, True])
    assert g["colm_kv_cache_usage_max_ratio"] == 0.7
    assert g["colm_degraded_requests_ratio"] == 0.25
    assert g["colm_epp_kv_cache_usage_ratio"] == 0.7
    g = _gauges((0.2, 0.3), [True, True, False])
    assert g["colm_epp_kv_cache_usage_ratio"] == 2 / 3


def test_no_engine_no_samples():
    reg = CollectorRegistry()
    reg.register(GatewayCollector(lambda: None, RecentDegradation(), clock=lambda: 0.0))
    text = generate_latest(reg).decode()
    assert all(not f.samples for f in text_string_to_metric_families(text))
