"""Online step-time measurements, per chain count, as exponential moving averages.

A decode step (every sequence computes one token) is keyed by its largest chain count; steps with
prompt tokens feed the per-token prefill time instead. The router reads these to predict latency.
"""

from __future__ import annotations

from colm_runtime.engine.scheduler import SchedulerOutput

ALPHA = 0.1  # weight of the newest step: about the last 10-20 steps matter


class StepMetrics:
    """decode[k]: seconds per decode step at most k chains; prefill[k]: seconds per computed token."""

    def __init__(self) -> None:
        self.decode: dict[int, float] = {}
        self.prefill: dict[int, float] = {}
        self.steps = 0
        self.tokens = 0

    @staticmethod
    def _ema(table: dict[int, float], key: int, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + ALPHA * (value - old)

    def record(self, so: SchedulerOutput, seconds: float) -> None:
        self.steps += 1
        n = so.num_tokens
        self.tokens += n
        k = max(seq.chains for seq, _ in so.scheduled)
        if n - so.num_lookahead == len(so.scheduled):
            self._ema(self.decode, k, seconds)
        else:
            self._ema(self.prefill, k, seconds / n)
