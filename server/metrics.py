"""Prometheus metrics at /metrics (names in vLLM's style, prefixed colm_).

Request metrics are observed by the server as requests finish; engine gauges (running, waiting, KV
usage per chain pool, preemptions) are read from EngineStats at scrape time by a collector, so they are
never stale. Each app has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from colm_runtime.engine.types import EngineStats

from server.admission.degradation import DegradeReason
from server.gateway_metrics import GatewayCollector, RecentDegradation

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters the engine owns, read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def describe(self):
        return []  # unchecked collector: the families depend on the model (pool count)

    def collect(self):
        s = self.stats()
        running = GaugeMetricFamily("colm_requests_running", "Requests in the running batch")
        waiting = GaugeMetricFamily("colm_requests_waiting", "Requests waiting to be scheduled")
        kv = GaugeMetricFamily("colm_kv_cache_usage_ratio", "Used / total KV blocks of each chain's pool "
                               "(CoLM-Air: one pool, chain 1)", labels=["chain"])
        free = GaugeMetricFamily("colm_kv_cache_free_blocks", "Free KV blocks of each chain's pool",
                                 labels=["chain"])
        total = GaugeMetricFamily("colm_kv_cache_total_blocks", "KV blocks of each chain's pool",
                                  labels=["chain"])
        preempt = CounterMetricFamily("colm_preemptions", "Requests preempted (recomputed later)")
        shrinks = CounterMetricFamily("colm_chain_shrinks", "Running requests shrunk to fewer chains "
                                      "by the engine under KV pressure")
        steps = CounterMetricFamily("colm_engine_steps", "Engine steps run")
        proposed = CounterMetricFamily("colm_spec_decode_proposed_tokens", "Draft tokens proposed by "
                                       "self-speculative decoding")
        accepted = CounterMetricFamily("colm_spec_decode_accepted_tokens", "Draft tokens accepted by verification")
        switches = CounterMetricFamily("colm_chain_switches", "Chain-count changes of running requests, by "
                                       "direction (up, down) and reason (schedule, load)",
                                       labels=["direction", "reason"])
        recomputed = CounterMetricFamily("colm_chain_switch_recomputed_tokens", "Tokens recomputed to raise "
                                         "plain-CoLM requests to more chains")
        cached = GaugeMetricFamily("colm_kv_cache_cached_free_blocks", "Free KV blocks of each chain's pool "
                                   "that hold a cached prefix (included in the free blocks)", labels=["chain"])
        queries = CounterMetricFamily("colm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache, "
                                      "by chain pool", labels=["chain"])
        hits = CounterMetricFamily("colm_prefix_cache_hits", "Prompt tokens whose K/V came from the prefix cache, "
                                   "by chain pool", labels=["chain"])
        if s is not None:
            running.add_metric([], s.running)
            waiting.add_metric([], s.waiting)
            for p, (u, f, t) in enumerate(zip(s.kv_usage, s.kv_blocks_free, s.kv_blocks_total)):
                kv.add_metric([str(p + 1)], u)
                free.add_metric([str(p + 1)], f)
                total.add_metric([str(p + 1)], t)
            preempt.add_metric([], s.preemptions_total)
            shrinks.add_metric([], s.shrinks_total)
            steps.add_metric([], s.steps_total)
            proposed.add_metric([], s.spec_proposed_total)
            accepted.add_metric([], s.spec_accepted_total)
            for d, why in [(d, w) for d in ("up", "down") for w in ("schedule", "load")]:
                switches.add_metric([d, why], s.chain_switches.get((d, why), 0))
            recomputed.add_metric([], s.recomputed_tokens_total)
            for p, (c, q, h) in enumerate(zip(s.kv_blocks_cached_free, s.prefix_cache_queries, s.prefix_cache_hits)):
                cached.add_metric([str(p + 1)], c)
                queries.add_metric([str(p + 1)], q)
                hits.add_metric([str(p + 1)], h)
        yield from (running, waiting, kv, free, total, preempt, shrinks, steps, proposed, accepted, switches,
                    recomputed, cached, queries, hits)


class ServerMetrics:
    """Every metric the server exports, on its own registry."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(_EngineCollector(stats))
        by_chains = ["chains"]
        self.ttft = Histogram("colm_time_to_first_token_seconds", "Arrival to first token", by_chains,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("colm_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", by_chains, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("colm_e2e_request_latency_seconds", "Arrival to last token", by_chains,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("colm_request_queue_time_seconds", "Time waiting before the first step",
                               by_chains, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("colm_prompt_tokens", "Prompt tokens computed", by_chains, registry=r)
        self.generation_tokens = Counter("colm_generation_tokens", "Tokens generated", by_chains, registry=r)
        self.requests = Counter("colm_requests", "Finished requests", ["chains", "finish_reason"], registry=r)
        self.routed = Counter("colm_routed_requests", "Admitted requests by routing reason and chain count",
                              ["reason", "chains"], registry=r)
        self.downgrades = Counter("colm_chain_downgrades", "Chain-count downgrades at admission, by reason",
                                  ["reason"], registry=r)
        self.budget_misses = Counter("colm_latency_budget_misses", "Requests with a latency budget that "
                                     "finished past it", registry=r)
        self.rejected = Counter("colm_rejected_requests", "Requests refused, by reason", ["reason"], registry=r)
        self.http_requests = Counter("colm_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_duration = Histogram("colm_http_request_duration_seconds", "HTTP request duration "
                                       "(streams: until the last byte)", ["route", "method", "status"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self._structured_outputs(r)
        for reason in ("invalid", "too_long", "unauthorized", "not_found", "body_too_large", "queue_full",
                       "budget_unreachable", "draining", "not_ready"):
            self.rejected.labels(reason)  # export zeros, so alerts and dashboards see the series
        for reason in DegradeReason:
            self.downgrades.labels(reason)

        # --- Gateway API Inference Extension: what its endpoint picker reads (server/gateway_metrics.py).
        self.recent_degradation = RecentDegradation()
        r.register(GatewayCollector(stats, self.recent_degradation, time.monotonic))

    # ---- structured outputs (server/structured.py) -------------------------------------------------
    def _structured_outputs(self, r: CollectorRegistry) -> None:
        self.structured = Counter("colm_structured_requests", "Requests with an output constraint, by kind "
                                  "(json_object, json_schema, regex, choice)", ["kind"], registry=r)
        self.grammar_compile = Histogram("colm_grammar_compile_seconds", "Grammar compilation time (cache "
                                         "misses only)", buckets=_COMPILE_BUCKETS, registry=r)
        for kind in ("json_object", "json_schema", "regex", "choice"):
            self.structured.labels(kind)
