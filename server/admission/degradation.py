"""SLO-aware degradation: under overload, unpinned requests get fewer chains instead of queuing past
their budget or being refused.

A request is unpinned when the client did not fix its chain count (by model id or `chains`): tier,
budget and default requests. At admission, four signals can lower its chain count, each counted
with its reason:

- "capacity": the recent demand (signals.Demand, refused requests included) plus the waiting queue
  would take more than `utilization` of the engine's time at its chain count
  (predictor.LatencyPredictor.utilization): it gets the largest chain count at which that load fits, else 1
  chain. A batch costs what its widest rows cost, so this keeps the whole batch narrow enough to keep
  up with the arrivals instead of letting a queue grow.

- "budget": it has a latency target (its own or its tier's) that the predicted latency at its chain
  count misses: it gets the largest chain count that fits, else 1 chain.
- "queue": the waiting queue is past `degrade_queue_fraction` of `max_waiting`: chains shrink linearly
  with the queue's fill, down to 1 chain at a full queue. Past `max_waiting`, pinned requests are
  refused (429) while unpinned ones are still admitted at 1 chain, up to the headroom (the engine's
  queue bound, hard_queue_limit, which the engine enforces: a 429 from there).
- "kv_cache": (plain CoLM) the pool of its top chain is above `degrade_kv_watermark`: it drops the
  chains whose pools are that full, so it does not wait for blocks there.

With `refuse_unreachable` (off by default), an unpinned request with a budget that even 1 chain is
predicted to miss (before the prediction's correction) is refused with 429 `budget_unreachable`.

Admitted requests that are unpinned may also be shrunk later by the engine under memory pressure
(EngineRequest.min_chains = 1); pinned ones never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from colm_runtime.config import ModelConfig
from colm_runtime.engine.types import EngineStats

from server.admission.predictor import LatencyPredictor
from server.errors import Overloaded
from server.routing import ChainChoice


class DegradeReason(StrEnum):
    """Why an unpinned request got fewer chains; the value is the colm_downgrades_total{reason} label
    and the body's colm.degrade_reasons entry (dashboards read both: keep the values)."""

    CAPACITY = "capacity"
    BUDGET = "budget"
    QUEUE = "queue"
    KV_CACHE = "kv_cache"


@dataclass(frozen=True)
class DegradationConfig:
    """Thresholds (from ServerSettings)."""

    max_waiting: int
    queue_fraction: float = 0.5
    kv_watermark: float = 0.9
    max_num_seqs: int = 64
    utilization: float = 0.85
    refuse_unreachable: bool = False


class DegradationPolicy:
    """Applies the four signals to a routed choice; raises Overloaded when it must refuse."""

    def __init__(self, cfg: ModelConfig, config: DegradationConfig):
        self.cfg, self.config = cfg, config

    def apply(self, choice: ChainChoice, stats: EngineStats, predictor: LatencyPredictor,
              prompt_tokens: int, max_tokens: int) -> ChainChoice:
        """The choice to admit with (possibly fewer chains), or Overloaded."""
        self._refuse_pinned(choice, stats)
        if choice.pinned:
            return choice
        signals = ((DegradeReason.CAPACITY, self._capacity), (DegradeReason.BUDGET, self._budget),
                   (DegradeReason.QUEUE, self._queue), (DegradeReason.KV_CACHE, self._kv_cache))
        for why, signal in signals:
            k = signal(choice, stats, predictor, prompt_tokens, max_tokens)
            if k is not None and k < choice.chains:
                choice = choice.degraded(k, why, predictor.predict(k, prompt_tokens, max_tokens))
        if self.config.refuse_unreachable:
            self._refuse_unreachable(choice, predictor, prompt_tokens, max_tokens)
        return choice

    @staticmethod
    def _refuse_unreachable(choice: ChainChoice, predictor: LatencyPredictor, prompt_tokens: int,
                            max_tokens: int) -> None:
        """429 for a budgeted request that misses its budget even at 1 chain by the uncorrected
        prediction: admitted, it would only lengthen the queue that makes the next requests late too."""
        if choice.latency_budget_ms is None or choice.chains > 1:
            return  # a count above 1 survived the budget checks: it fits
        predicted = predictor.predict_raw(1, prompt_tokens, max_tokens)
        if predicted * 1000 > choice.latency_budget_ms:
            raise Overloaded(f"the latency budget of {choice.latency_budget_ms:g} ms cannot be met now (predicted "
                             f"{predicted * 1000:.0f} ms at 1 chain); retry later", code="budget_unreachable")

    def _refuse_pinned(self, choice: ChainChoice, stats: EngineStats) -> None:
        """Past max_waiting only unpinned requests (degraded to fewer chains) may still queue, up to the
        engine's own bound (hard_queue_limit, which the engine checks: the one queue bound)."""
        if choice.pinned and stats.waiting >= self.config.max_waiting:
            raise Overloaded(f"the waiting queue is full ({stats.waiting} waiting, limit {self.config.max_waiting} "
                             "for requests that pin a chain count); retry later or let the server choose the "
                             "chain count")

    def _capacity(self, choice: ChainChoice, stats, predictor: LatencyPredictor, *_) -> int | None:
        for k in range(choice.chains, 0, -1):
            if predictor.utilization(k, self.config.max_num_seqs) <= self.config.utilization:
                return k
        return 1

    def _budget(self, choice: ChainChoice, stats, predictor: LatencyPredictor, prompt_tokens: int,
                max_tokens: int) -> int | None:
        if choice.latency_budget_ms is None or choice.reason == "budget":
            return None  # budget routing already chose the largest chain count that fits
        budget_s = choice.latency_budget_ms / 1000
        if predictor.predict(choice.chains, prompt_tokens, max_tokens) <= budget_s:
            return None
        return predictor.largest_fitting(budget_s, choice.chains - 1, prompt_tokens, max_tokens) or 1

    def _queue(self, choice: ChainChoice, stats: EngineStats, *_) -> int | None:
        fill = stats.waiting / self.config.max_waiting
        start = self.config.queue_fraction
        if fill < start or stats.waiting == 0:
            return None
        over = 1.0 if start >= 1 else min(1.0, (fill - start) / (1 - start))
        # Linear from the routed chain count at `start` down to 1 chain at a full queue.
        return max(1, math.floor(choice.chains - over * (choice.chains - 1)))

    def _kv_cache(self, choice: ChainChoice, stats: EngineStats, *_) -> int | None:
        if self.cfg.kv_sharing or not stats.kv_usage:
            return None  # CoLM-Air: one shared pool, fewer chains do not relieve it
        k = choice.chains
        while k > 1 and stats.kv_usage[self.cfg.pools_for(k) - 1] >= self.config.kv_watermark:
            k -= 1
        return k
