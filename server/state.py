"""ServerState: what a running server holds (engine, router, degradation policy, metrics, template),
and the admission step every generation request goes through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from colm_runtime.engine.types import EngineClient, EngineStats

from server.auth import APIKeyChecker
from server.chat_template import ChatTemplate
from server.degradation import DegradationPolicy
from server.errors import ContextTooLong, InvalidRequest, Unavailable
from server.load import Demand, InFlightChains, PredictionCorrection
from server.metrics import ServerMetrics
from server.ratelimit import RateLimiter, RateLimits, current_api_key
from server.routing import ChainChoice, ChainRouter, LatencyPredictor, RouteHints
from server.settings import ServerSettings
from server.structured import GrammarCache

log = logging.getLogger("colm.server")


@dataclass
class QueueTimeAverage:
    """The queue wait a new request can expect, from recent requests' queue times.

    observe() takes each finished request's queue time and when it left the queue. estimate() is
    Little's law on the live queue, the requests waiting now divided by the rate the queue drained at
    over the last `window` seconds, so it follows a queue that grows; before two departures are known
    it is the moving average of observed queue times (which lags a growing queue by a request's
    lifetime)."""

    value: float = 0.0
    alpha: float = 0.2
    window: float = 10.0
    departures: deque = field(default_factory=deque)  # monotonic times requests left the queue

    def observe(self, seconds: float, left_at: float | None = None) -> None:
        self.value = seconds if self.value == 0.0 else self.alpha * seconds + (1 - self.alpha) * self.value
        if left_at is not None:
            self.departures.append(left_at)

    def estimate(self, waiting: int, now: float) -> float:
        while self.departures and self.departures[0] < now - self.window:
            self.departures.popleft()
        if waiting <= 0:
            return 0.0
        if len(self.departures) < 2:
            return self.value
        rate = len(self.departures) / max(now - self.departures[0], 1e-3)
        return waiting / rate


class ServerState:
    """One per app, built in the lifespan once the engine is up (app.state.colm)."""

    def __init__(self, settings: ServerSettings, engine: EngineClient, router: ChainRouter,
                 policy: DegradationPolicy, metrics: ServerMetrics, template: ChatTemplate, max_model_len: int):
        self.settings, self.engine, self.router, self.policy = settings, engine, router, policy
        self.metrics, self.template, self.max_model_len = metrics, template, max_model_len
        self.cfg, self.tokenizer = engine.config, engine.tokenizer
        self.base_name = router.base_name
        self.grammars = GrammarCache(self.tokenizer, self.cfg.vocab_size, metrics)  # structured outputs
        self.auth = APIKeyChecker(settings.all_api_keys)
        self.limiter = RateLimiter(RateLimits(settings.rate_limit_rpm, settings.rate_limit_tpm))
        self.queue_time = QueueTimeAverage()
        self.offered = Demand()
        self.inflight = InFlightChains()
        self.correction = PredictionCorrection()
        self.ready = False
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self.runs: set = set()  # the RequestRuns in flight (engine watchdog, chain counts in flight)
        self._watchdog: asyncio.Task | None = None

    def start_watchdog(self, period: float = 0.5) -> None:
        """Fail in-flight requests if the engine loop dies (instead of leaving them waiting forever);
        /health then answers 503 so that the orchestrator restarts the process."""
        async def watch() -> None:
            while not self.draining:
                if not self.engine.stats().alive:
                    log.error("the engine loop died; failing %d in-flight request(s)", len(self.runs))
                    for run in list(self.runs):
                        run.fail(Unavailable("the engine loop stopped; retry on another replica",
                                             code="engine_dead"))
                    return
                await asyncio.sleep(period)

        self._watchdog = asyncio.ensure_future(watch())

    def begin_drain(self, timeout: float) -> None:
        """Stop admitting now (503); after `timeout` seconds stop the engine, which ends what still
        runs (those streams get an error chunk, then [DONE]). Call on the event loop."""
        self.draining = True
        if self._drain_task is None:
            alive = self.engine.stats().alive  # a dead engine has nothing left to drain
            self._drain_task = asyncio.ensure_future(self._stop_engine_after(timeout if alive else 0.0))

    async def shutdown(self, timeout: float) -> None:
        """Drain (if no signal started it already) and wait until the engine has stopped."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.begin_drain(timeout)
        await self._drain_task

    async def _stop_engine_after(self, timeout: float) -> None:
        await self.engine.shutdown(drain_timeout=timeout)
        log.info("drained; engine stopped")

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def predictor(self, stats: EngineStats) -> LatencyPredictor:
        now = time.monotonic()
        return LatencyPredictor(self.cfg, stats, self.queue_time.estimate(stats.waiting, now),
                                widest=self.inflight.widest, correction=self.correction.factor,
                                offered=self.offered.snapshot(now))

    def track(self, run) -> None:
        """A RequestRun the engine accepted: in flight until untrack()."""
        self.runs.add(run)
        self.inflight.add(run.choice.chains)

    def untrack(self, run) -> None:
        if run in self.runs:
            self.runs.discard(run)
            self.inflight.remove(run.choice.chains)

    def encode(self, text: str, param: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of client text; 400 for text that is not valid Unicode (lone surrogates). add_bos
        (default: for a raw prompt) puts the model's BOS first if its tokenizer files ask for one."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{param} is not valid UTF-8 text", param=param) from None
        # A raw prompt gets the model's BOS token if it wants one; a chat template writes its own.
        return self.tokenizer.encode(text, add_bos=param == "prompt" if add_bos is None else add_bos)

    def check_n(self, n: int) -> None:
        """n completions run side by side: more than max_num_seqs could never be scheduled."""
        if n > self.settings.max_num_seqs:
            raise InvalidRequest(f"n must be at most {self.settings.max_num_seqs} on this server "
                                 "(max_num_seqs)", param="n")

    def check_length(self, prompt_tokens: int, max_tokens: int, what: str) -> None:
        """400 naming the limit when a prompt (+ max_tokens) cannot fit."""
        limit = self.settings.max_prompt_tokens
        if limit is not None and prompt_tokens > limit:
            raise ContextTooLong(f"The prompt is {prompt_tokens} tokens; this server accepts at most {limit} "
                                 f"prompt tokens (max_prompt_tokens).", param=what)
        total = prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({prompt_tokens} in the {what}, {max_tokens} in the completion). Please reduce "
                f"the length of the {what} or max_tokens.", param=what if prompt_tokens >= self.max_model_len
                else "max_tokens")

    def admit(self, hints: RouteHints, prompt_tokens: int, max_tokens: int) -> ChainChoice:
        """Route, then degrade under overload; counts rejections and downgrades."""
        if self.draining or not self.ready:
            raise Unavailable("the server is shutting down" if self.draining else "the model is not loaded yet",
                              code="draining" if self.draining else "not_ready")
        stats = self.stats()
        if not stats.alive:
            raise Unavailable("the engine has stopped; the server needs a restart", code="engine_dead")
        # The demand, refused requests included: counting only admissions would read a load that is being
        # refused as spare capacity, and widen the batch that made the queue overflow.
        self.offered.observe(time.monotonic(), prompt_tokens, max_tokens)
        predictor = self.predictor(stats)
        choice = self.router.route(hints, predictor, prompt_tokens, max_tokens)
        choice = self.policy.apply(choice, stats, predictor, prompt_tokens, max_tokens)
        self.limiter.charge(current_api_key.get(), prompt_tokens + max_tokens)
        for why in choice.degrade_reasons:
            self.metrics.downgrades.labels(why).inc()
        self.metrics.routed.labels(choice.reason, str(choice.chains)).inc()
        if not choice.pinned:
            self.metrics.recent_degradation.observe(time.monotonic(), bool(choice.degrade_reasons))
        return choice
