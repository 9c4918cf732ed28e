"""The latency predictor admission routes and degrades with: end-to-end latency at k chains, and the
share of the engine's time the offered load would take at k chains."""

from __future__ import annotations

from dataclasses import dataclass, field

from colm_runtime.config import ModelConfig
from colm_runtime.engine.types import EngineStats

from server.admission.signals import Offered

DRAIN_S = 3.0  # utilization(): the waiting queue is load to serve within this many seconds


@dataclass(frozen=True)
class LatencyPredictor:
    """End-to-end latency at k chains = correction x (queue wait + prompt x prefill time per token +
    max_tokens x the step time of the batch the request joins).

    In continuous batching every running request waits for the whole batch each step, and a step costs
    about what its widest rows cost: a request admitted at k chains into a batch whose widest request in
    flight has `widest` chains pays the step time of max(k, widest) chains per token, not of k.
    The step and prefill times come from the engine (EngineStats, keyed by a step's widest chain count),
    the queue wait from the server's live queue estimate, `correction` from how far recent predictions
    were off (signals.PredictionCorrection). A chain count never measured yet borrows the nearest
    measured one, scaled by width (compute grows with width); with nothing measured the prediction is 0
    (optimistic). `offered` (the recent demand) gives utilization(k), the share of the engine's
    time that load would take if it all ran at k chains.
    """

    cfg: ModelConfig
    stats: EngineStats
    queue_wait_s: float
    widest: int = 0
    correction: float = 1.0
    offered: Offered = field(default_factory=Offered)

    def _per_chain(self, table: dict[int, float], k: int) -> float:
        if k in table:
            return table[k]
        if not table:
            return 0.0
        near = min(table, key=lambda j: abs(j - k))
        return table[near] * self.cfg.width(k) / self.cfg.width(near)

    def predict_raw(self, k: int, prompt_tokens: int, max_tokens: int) -> float:
        """Seconds from now to the last token at k chains, before the correction."""
        queue = self.queue_wait_s if self.stats.waiting > 0 else 0.0
        batch_k = max(k, self.widest)
        prefill = prompt_tokens * self._per_chain(self.stats.prefill_time_per_token, batch_k)
        decode = max_tokens * self._per_chain(self.stats.step_time_per_chains, batch_k)
        return queue + prefill + decode

    def predict(self, k: int, prompt_tokens: int, max_tokens: int) -> float:
        """Seconds from now to the last token at k chains (corrected)."""
        return self.correction * self.predict_raw(k, prompt_tokens, max_tokens)

    def largest_fitting(self, budget_s: float, upto: int, prompt_tokens: int, max_tokens: int) -> int | None:
        """The largest chain count <= upto whose prediction fits the budget (None: none fits)."""
        for k in range(upto, 0, -1):
            if self.predict(k, prompt_tokens, max_tokens) <= budget_s:
                return k
        return None

    def utilization(self, k: int, max_num_seqs: int) -> float:
        """The share of the engine's time the load would take with every request at k chains:
        (offered rate + waiting / DRAIN_S) x (max_tokens x decode step / batch slots + prompt x prefill
        time per token). The waiting requests count as load to serve within DRAIN_S seconds, so a queue
        that has built up (or a client that sends in bursts) is not mistaken for spare capacity.
        Above 1 the queue grows at k chains."""
        o = self.offered
        if o.rate <= 0 and self.stats.waiting <= 0:
            return 0.0
        decode = o.max_tokens * self._per_chain(self.stats.step_time_per_chains, k) / max_num_seqs
        prefill = o.prompt_tokens * self._per_chain(self.stats.prefill_time_per_token, k)
        return (o.rate + self.stats.waiting / DRAIN_S) * (decode + prefill)
