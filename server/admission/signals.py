"""What the server measures about its own traffic for admission: the offered load, the chain counts
in flight, the queue wait, and how far its latency predictions have been off.

All are plain in-process counters (no engine calls), owned by `Admission` (server/admission/__init__.py):
read at every admission, updated when a request reaches admission, starts, or finishes.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from colm_runtime.stats import ema


@dataclass(frozen=True)
class Offered:
    """The demand over the last window: requests/s and their mean prompt and max_tokens."""

    rate: float = 0.0
    prompt_tokens: float = 0.0
    max_tokens: float = 0.0


@dataclass
class OfferedLoad:
    """Requests that reached admission (admitted or refused: the demand) over the last `window` seconds,
    a sliding window that follows a load rising within it.

    The rate divides by the span the window has seen, at least `min_span` seconds: right after an idle
    spell a burst shows its rate within about a second instead of ramping up over the whole window."""

    window: float = 3.0
    min_span: float = 1.0
    admitted: deque = field(default_factory=deque)  # (monotonic time, prompt tokens, max_tokens)
    _prompt_sum: int = 0
    _max_tokens_sum: int = 0
    _since: float | None = None  # when the current busy spell began (the window's span starts here)

    def observe(self, now: float, prompt_tokens: int, max_tokens: int) -> None:
        self._expire(now)
        if not self.admitted:
            self._since = now
        self.admitted.append((now, prompt_tokens, max_tokens))
        self._prompt_sum += prompt_tokens
        self._max_tokens_sum += max_tokens

    def _expire(self, now: float) -> None:
        while self.admitted and self.admitted[0][0] < now - self.window:
            _, p, m = self.admitted.popleft()
            self._prompt_sum -= p
            self._max_tokens_sum -= m

    def snapshot(self, now: float) -> Offered:
        self._expire(now)
        n = len(self.admitted)
        if n == 0:
            return Offered()
        span = min(self.window, max(self.min_span, now - self._since))
        return Offered(n / span, self._prompt_sum / n, self._max_tokens_sum / n)


@dataclass
class Demand:
    """The demand the capacity signal plans for: the rate of the last `recent` seconds (a rise shows
    within about a second), held up by the rate of the last `held` seconds, so that a pause (a client
    that stalls and then sends a burst, a lull between bursts) is not read as spare capacity until the
    longer window has seen it. The mean lengths come from the recent window while it has requests."""

    recent: OfferedLoad = field(default_factory=lambda: OfferedLoad(window=3.0))
    held: OfferedLoad = field(default_factory=lambda: OfferedLoad(window=15.0))

    def observe(self, now: float, prompt_tokens: int, max_tokens: int) -> None:
        self.recent.observe(now, prompt_tokens, max_tokens)
        self.held.observe(now, prompt_tokens, max_tokens)

    def snapshot(self, now: float) -> Offered:
        short, long = self.recent.snapshot(now), self.held.snapshot(now)
        if short.rate >= long.rate:
            return short
        return long if short.rate == 0 else replace(short, rate=long.rate)


@dataclass
class InFlightChains:
    """How many admitted requests (running or waiting in the engine) hold each chain count.

    In continuous batching every running request waits for the whole batch each step, and a step costs
    about what its widest rows cost, so the widest count in flight sets everyone's time per token."""

    counts: Counter = field(default_factory=Counter)

    def add(self, chains: int) -> None:
        self.counts[chains] += 1

    def remove(self, chains: int) -> None:
        assert self.counts[chains] > 0, f"no request in flight at {chains} chains"
        self.counts[chains] -= 1
        if not self.counts[chains]:
            del self.counts[chains]

    @property
    def widest(self) -> int:
        """The largest chain count in flight (0: nothing in flight)."""
        return max(self.counts, default=0)


@dataclass
class PredictionCorrection:
    """A factor for the latency predictions: the `quantile` of measured / predicted end-to-end latency
    over the last `size` finished requests (predictions taken before correction).

    Scaling a prediction by the 0.9 quantile of its past error makes about 90% of the requests that are
    predicted to fit their budget really fit it, whatever the prediction's bias (the load generator on
    the same cores, event-loop time the engine does not see, a batch that changes after admission).
    Clamped to [lo, hi]; 1.0 until `min_samples` requests have finished."""

    size: int = 200
    quantile: float = 0.9
    min_samples: int = 20
    lo: float = 0.5
    hi: float = 8.0
    ratios: deque = field(default_factory=deque)
    _sorted: list = field(default_factory=list)

    def observe(self, measured_s: float, predicted_s: float) -> None:
        if predicted_s <= 0 or not math.isfinite(measured_s / predicted_s):
            return
        ratio = measured_s / predicted_s
        self.ratios.append(ratio)
        bisect.insort(self._sorted, ratio)
        if len(self.ratios) > self.size:
            old = self.ratios.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    @property
    def factor(self) -> float:
        n = len(self._sorted)
        if n < self.min_samples:
            return 1.0
        q = self._sorted[min(n - 1, int(self.quantile * n))]
        return min(self.hi, max(self.lo, q))


@dataclass
class QueueTimeAverage:
    """The queue wait a new request can expect, from recent requests' queue times.

    observe() takes each finished request's queue time and when it left the queue. estimate() is
    Little's law on the live queue, the requests waiting now divided by the rate the queue drained at
    over the last `window` seconds, so it follows a queue that grows; before two departures are known
    it is the moving average of observed queue times (which lags a growing queue by a request's
    lifetime)."""

    value: float | None = None  # moving average of observed queue times (None: none observed yet)
    alpha: float = 0.2
    window: float = 10.0
    departures: deque = field(default_factory=deque)  # monotonic times requests left the queue

    def observe(self, seconds: float, left_at: float | None = None) -> None:
        self.value = ema(self.value, seconds, self.alpha)
        if left_at is not None:
            self.departures.append(left_at)

    def estimate(self, waiting: int, now: float) -> float:
        while self.departures and self.departures[0] < now - self.window:
            self.departures.popleft()
        if waiting <= 0:
            return 0.0
        if len(self.departures) < 2:
            return self.value or 0.0
        rate = len(self.departures) / max(now - self.departures[0], 1e-3)
        return waiting / rate
