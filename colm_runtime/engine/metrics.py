"""Online step-time measurements, per chain count, as exponential moving averages: the engine's one
step-time signal.

A decode step (every sequence computes one token) is keyed by its largest chain count; steps with
prompt tokens feed the per-token prefill time instead. The server's router reads these (EngineStats)
to predict latency; the engine's load policy reads the decode average of the latest decode step's
chain count (decode_step_time).
"""

from __future__ import annotations

from colm_runtime.engine.scheduler import SchedulerOutput
from colm_runtime.stats import ema

ALPHA = 0.1  # weight of the newest step: about the last 10-20 steps matter


class StepMetrics:
    """decode[k]: seconds per decode step at most k chains; prefill[k]: seconds per computed token."""

    def __init__(self) -> None:
        self.decode: dict[int, float] = {}
        self.prefill: dict[int, float] = {}
        self.steps = 0
        self._last_decode: int | None = None  # the largest chain count of the latest decode step

    def record(self, so: SchedulerOutput, seconds: float) -> None:
        self.steps += 1
        k = max(seq.num_chains for seq, _ in so.scheduled)
        if so.decode_only:
            self.decode[k] = ema(self.decode.get(k), seconds, ALPHA)
            self._last_decode = k
        else:
            self.prefill[k] = ema(self.prefill.get(k), seconds / so.num_tokens, ALPHA)

    @property
    def decode_step_time(self) -> float | None:
        """The decode step-time average at the chain count of the latest decode step (None: none yet)."""
        return None if self._last_decode is None else self.decode[self._last_decode]
