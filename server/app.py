"""create_app(settings): the FastAPI app; the engine is built in the lifespan, not at import.

Start-up: load the model into an AsyncEngine, resolve the tiers and the chat template, warm up one tiny
request per chain count (so the latency predictor has measurements), then mark ready. Shutdown (after
uvicorn has drained the open connections): stop the engine, draining what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from colm_runtime.engine.types import EngineClient, EngineRequest, SamplingParams
from colm_runtime.engine.validation import RequestLimits

from server.chat_template import ChatTemplate, find_template
from server.admission import DegradationConfig, DegradationPolicy
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.middleware import AccessLogMiddleware, BodyLimitMiddleware
from server.routes import completions, health, models, tokenize
from server.routing import ChainRouter
from server.settings import ServerSettings
from server.state import ServerState
from server.tiers import load_tiers

log = logging.getLogger("colm.server")


def engine_config(settings: ServerSettings):
    """The EngineConfig the settings describe."""
    from colm_runtime.engine.config import EngineConfig

    return EngineConfig(block_size=settings.block_size, kv_cache_memory=settings.kv_cache_memory,
                        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                        max_model_len=settings.max_model_len, max_waiting=settings.hard_queue_limit,
                        device=settings.resolved_device,
                        dtype=settings.resolved_dtype[0], seed=settings.seed,
                        num_speculative_tokens=settings.num_speculative_tokens,
                        speculative_draft_chains=settings.speculative_draft_chains,
                        step_time_target=None if settings.step_time_target_ms is None
                        else settings.step_time_target_ms / 1e3,
                        enable_prefix_caching=settings.enable_prefix_caching)


def build_engine(settings: ServerSettings) -> EngineClient:
    """Load the model directory into the engine (blocking: run it off the event loop)."""
    from colm_runtime.engine.async_engine import AsyncEngine

    return AsyncEngine.from_model_dir(settings.model, engine_config(settings))


async def warm_up(engine: EngineClient) -> None:
    """One 2-token greedy request per chain count, one at a time, so that step-time measurements exist
    for every chain count before the first routed request."""
    prompt = engine.tokenizer.encode("Hello, world.") or [engine.tokenizer.eos_token_id]
    for k in range(1, engine.config.n_chains + 1):
        req = EngineRequest(f"warmup-c{k}", prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                            chains=k)
        async for _ in engine.generate(req):
            pass


async def while_alive(engine: EngineClient, work) -> None:
    """Await `work`, but fail at once if the engine loop dies meanwhile (it would wait forever)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and not engine.stats().alive:
            task.cancel()
            raise RuntimeError("the engine loop died during warm-up (its traceback is above)")
    task.result()


async def build_state(settings: ServerSettings, metrics: ServerMetrics) -> ServerState:
    """Engine, router, policy and template for one server; raises on any start-up error."""
    t0 = time.monotonic()
    engine = await asyncio.to_thread(build_engine, settings)
    await engine.start()
    cfg = engine.config
    tiers = load_tiers(settings.tiers_file, cfg.n_chains)
    router = ChainRouter(cfg, settings.model_name, tiers, settings.default_tier)
    policy = DegradationPolicy(cfg, DegradationConfig(settings.max_waiting, settings.degrade_queue_fraction,
                                                      settings.degrade_kv_watermark, settings.max_num_seqs,
                                                      settings.degrade_utilization,
                                                      settings.refuse_unreachable_budgets))
    source, origin = find_template(settings.model, settings.chat_template)
    tok = engine.tokenizer
    template = ChatTemplate(source, origin, eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    limits = RequestLimits.of(cfg, engine_config(settings), settings.max_prompt_tokens)
    state = ServerState(settings, engine, router, policy, metrics, template, limits)
    state.loop = asyncio.get_running_loop()
    if settings.warmup:
        await while_alive(engine, warm_up(engine))
    state.start_watchdog()
    state.ready = True
    dtype, why = settings.resolved_dtype
    log.info("serving %s (%d chains, max_model_len %d, chat template: %s) on %s in %s after %.1fs",
             settings.model_name, cfg.n_chains, limits.model_len, origin, settings.resolved_device,
             f"{dtype} ({why})" if dtype else "the checkpoint's dtype", time.monotonic() - t0)
    return state


def create_app(settings: ServerSettings) -> FastAPI:
    """The app for these settings. Nothing heavy happens until the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            app.state.colm = await build_state(settings, app.state.metrics)
        except Exception as e:  # uvicorn prints the traceback too; this line says it plainly
            log.error("start-up failed: %s: %s", type(e).__name__, e)
            raise
        try:
            yield
        finally:
            await app.state.colm.shutdown(settings.drain_timeout)

    app = FastAPI(title="CoLM Serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for Chain-of-Model language models, with per-request "
                              "chain routing. See docs/api.md.")
    app.state.colm = None
    app.state.metrics = ServerMetrics(lambda: app.state.colm.stats() if app.state.colm is not None else None)
    install_error_handlers(app)
    for r in (completions.router, models.router, tokenize.router, health.router):
        app.include_router(r)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=app.state.metrics)
    app.add_middleware(AccessLogMiddleware, metrics=app.state.metrics, enabled=settings.access_log)
    return app
