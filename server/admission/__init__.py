"""Admission: the one object that decides a generation request's chain count or refuses it, and
learns from how admitted requests went.

`Admission.admit()` routes the request (server/routing.py), lets degradation lower an unpinned
request's chains or refuse it (degradation.py), charges the API key's rate limit and counts the
decision; `on_started()` and `on_finished()` feed back what the requests then did (the chain counts in
flight, queue times, how far the latency predictions were off). What it measures lives in signals.py,
the latency model in predictor.py. A package rather than one file: together these are ~500 lines,
and each part is read (and unit-tested) on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from colm_runtime.config import ModelConfig
from colm_runtime.engine.types import EngineStats

from server.admission.degradation import DegradationConfig, DegradationPolicy, DegradeReason
from server.admission.predictor import LatencyPredictor
from server.admission.signals import Demand, InFlightChains, PredictionCorrection, QueueTimeAverage
from server.ratelimit import RateLimiter
from server.routing import ChainChoice, ChainRouter, RouteHints

if TYPE_CHECKING:
    from server.metrics import ServerMetrics

__all__ = ["Admission", "DegradationConfig", "DegradationPolicy", "DegradeReason", "Finished", "LatencyPredictor"]


@dataclass(frozen=True)
class Finished:
    """What one engine request of an admitted HTTP request did, for the feedback.

    queue_s: its time in the engine's waiting queue (None: it never left the queue);
    e2e_s: arrival to last token (None: it did not complete, e.g. aborted)."""

    arrival: float
    queue_s: float | None
    e2e_s: float | None


class Admission:
    """Routing, degradation and rate limits at admission, and the estimators they read (one per app)."""

    def __init__(self, cfg: ModelConfig, router: ChainRouter, policy: DegradationPolicy, limiter: RateLimiter,
                 metrics: ServerMetrics):
        self.cfg, self.router, self.policy, self.limiter, self.metrics = cfg, router, policy, limiter, metrics
        self.queue_time = QueueTimeAverage()
        self.offered = Demand()
        self.inflight = InFlightChains()
        self.correction = PredictionCorrection()

    def predictor(self, stats: EngineStats, now: float) -> LatencyPredictor:
        """The latency predictor for a request arriving now."""
        return LatencyPredictor(self.cfg, stats, self.queue_time.estimate(stats.waiting, now),
                                widest=self.inflight.widest, correction=self.correction.factor,
                                offered=self.offered.snapshot(now))

    def admit(self, hints: RouteHints, stats: EngineStats, prompt_tokens: int, max_tokens: int,
              api_key: str | None) -> ChainChoice:
        """Route, then degrade under overload, then charge the key's rate limit; counts the decision.
        Raises the client's error (unknown model or tier: 4xx) or Overloaded / RateLimited (429)."""
        now = time.monotonic()
        # The demand, refused requests included: counting only admissions would read a load that is being
        # refused as spare capacity, and widen the batch that made the queue overflow.
        self.offered.observe(now, prompt_tokens, max_tokens)
        predictor = self.predictor(stats, now)
        choice = self.router.route(hints, predictor, prompt_tokens, max_tokens)
        choice = self.policy.apply(choice, stats, predictor, prompt_tokens, max_tokens)
        self.limiter.charge(api_key, prompt_tokens + max_tokens, now)
        for why in choice.degrade_reasons:
            self.metrics.downgrades.labels(why).inc()
        self.metrics.routed.labels(choice.reason, str(choice.chains)).inc()
        if not choice.pinned:
            self.metrics.recent_degradation.observe(now, bool(choice.degrade_reasons))
        return choice

    def on_started(self, choice: ChainChoice) -> None:
        """The engine accepted an admitted request: its chain count is in flight until on_finished()."""
        self.inflight.add(choice.chains)

    def on_finished(self, choice: ChainChoice, finished: list[Finished]) -> None:
        """A started request ended (once): its engine requests' queue times and, for complete ones, the
        measured / predicted latency feed the estimators."""
        self.inflight.remove(choice.chains)
        for f in finished:
            if f.queue_s is not None:
                self.queue_time.observe(f.queue_s, left_at=f.arrival + f.queue_s)
            if f.e2e_s is not None and choice.predicted_s:
                self.correction.observe(f.e2e_s, choice.predicted_s / choice.correction)
