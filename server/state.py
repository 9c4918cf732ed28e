"""ServerState: what a running server holds (engine, admission, metrics, template, limits) and its
lifecycle (ready, draining, the engine watchdog, the requests in flight).
"""

from __future__ import annotations

import asyncio
import logging

from colm_runtime.engine.types import EngineClient, EngineRequest, EngineStats
from colm_runtime.engine.validation import RequestLimits, validate

from server.admission import Admission, DegradationPolicy, Finished
from server.auth import APIKeyChecker
from server.chat_template import ChatTemplate
from server.errors import InvalidRequest, Unavailable
from server.metrics import ServerMetrics
from server.ratelimit import RateLimiter, RateLimits, current_api_key
from server.routing import ChainChoice, ChainRouter, RouteHints
from server.settings import ServerSettings
from server.structured import GrammarCache

log = logging.getLogger("colm.server")
WATCHDOG_PERIOD_S = 0.5  # how often the watchdog looks at the engine loop


class ServerState:
    """One per app, built in the lifespan once the engine is up (app.state.colm)."""

    def __init__(self, settings: ServerSettings, engine: EngineClient, router: ChainRouter,
                 policy: DegradationPolicy, metrics: ServerMetrics, template: ChatTemplate, limits: RequestLimits):
        self.settings, self.engine, self.router = settings, engine, router
        self.metrics, self.template, self.limits = metrics, template, limits
        self.cfg, self.tokenizer = engine.config, engine.tokenizer
        self.base_name, self.max_model_len = router.base_name, limits.model_len
        self.grammars = GrammarCache(self.tokenizer, self.cfg.vocab_size, metrics)  # structured outputs
        self.auth = APIKeyChecker(settings.all_api_keys)
        limiter = RateLimiter(RateLimits(settings.rate_limit_rpm, settings.rate_limit_tpm))
        self.admission = Admission(self.cfg, router, policy, limiter, metrics)
        self.ready = False
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self.runs: set = set()  # the RequestRuns in flight (engine watchdog, chain counts in flight)
        self._watchdog: asyncio.Task | None = None

    def start_watchdog(self) -> None:
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
                await asyncio.sleep(WATCHDOG_PERIOD_S)

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

    def track(self, run) -> None:
        """A RequestRun the engine accepted: in flight until untrack()."""
        self.runs.add(run)
        self.admission.on_started(run.choice)

    def untrack(self, run, finished: list[Finished]) -> None:
        """A tracked run ended: admission learns how its engine requests went (once per run)."""
        if run in self.runs:
            self.runs.discard(run)
            self.admission.on_finished(run.choice, finished)

    def encode(self, text: str, param: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of client text; 400 for text that is not valid Unicode (lone surrogates). add_bos
        (default: for a raw prompt) puts the model's BOS first if its tokenizer files ask for one."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{param} is not valid UTF-8 text", param=param) from None
        # A raw prompt gets the model's BOS token if it wants one; a chat template writes its own.
        return self.tokenizer.encode(text, add_bos=param == "prompt" if add_bos is None else add_bos)

    def validate(self, requests: list[EngineRequest], prompt_param: str) -> None:
        """The engine's checks (engine/validation.py), once, before admission: 400 naming the field."""
        for r in requests:
            validate(r, self.limits, prompt_param)

    def admit(self, hints: RouteHints, prompt_tokens: int, max_tokens: int) -> ChainChoice:
        """The chain count to run a request at (Admission.admit), while the server is open."""
        if self.draining or not self.ready:
            raise Unavailable("the server is shutting down" if self.draining else "the model is not loaded yet",
                              code="draining" if self.draining else "not_ready")
        stats = self.stats()
        if not stats.alive:
            raise Unavailable("the engine has stopped; the server needs a restart", code="engine_dead")
        return self.admission.admit(hints, stats, prompt_tokens, max_tokens, current_api_key.get())
