"""The part shared by /v1/completions and /v1/chat/completions: request validation into
SamplingParams and RouteHints, the engine streams of one HTTP request (RequestRun), per-request metrics,
SSE framing and the client-disconnect race.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import Request, Response
from pydantic import BaseModel

from colm_runtime.engine.types import EngineError, EngineRequest, RequestOutput, SamplingParams, TokenLogprob

from server.errors import (APIError, InternalError, InvalidRequest, SlowClient, Unavailable, error_body,
                           from_engine_error)
from server.routing import ChainChoice, RouteHints, parse_header_number
from server.schemas import ColmReport, PromptLogprob, PromptLogprobs, Usage, _Sampling
from server.state import ServerState
from server.structured import logit_bias

log = logging.getLogger("colm.server")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def route_hints(req: _Sampling, headers) -> RouteHints:
    """Body fields over their X-CoLM-* header twins."""
    chains = req.chains if req.chains is not None else parse_header_number(
        "X-CoLM-Chains", headers.get("x-colm-chains"), int)
    budget = req.latency_budget_ms if req.latency_budget_ms is not None else parse_header_number(
        "X-CoLM-Latency-Budget-Ms", headers.get("x-colm-latency-budget-ms"), float)
    tier = req.tier if req.tier is not None else headers.get("x-colm-tier")
    if req.chain_schedule and chains is None:
        chains = req.chain_schedule[0][1]  # a schedule pins the chain count it starts at
    return RouteHints(model=req.model, chains=chains, tier=tier, latency_budget_ms=budget, priority=req.priority)


def engine_extras(req: _Sampling) -> dict:
    """EngineRequest fields taken from the body as they are (chain schedule, speculation, cache salt)."""
    schedule = tuple(tuple(e) for e in req.chain_schedule) if req.chain_schedule else None
    return {"chain_schedule": schedule, "speculative": req.speculative, "cache_salt": req.cache_salt}


def warn_unknown_fields(req: _Sampling) -> None:
    """Unknown fields are ignored, as vLLM does; their names (never values) are logged."""
    if req.model_extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(k[:40] for k in req.model_extra)[:10]))


def continuous_usage(req: _Sampling) -> bool:
    """vLLM's stream_options.continuous_usage_stats: usage so far in every chunk (with include_usage)."""
    o = req.stream_options
    return o is not None and o.include_usage and o.continuous_usage_stats


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, vocab_size: int,
                    n: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams from the shared OpenAI/vLLM fields; 400 naming the field if invalid. n: the
    completions the engine runs (best_of), default req.n."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(not s for s in stop):
        raise InvalidRequest("stop strings must not be empty", param="stop")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, min_p=req.min_p, seed=req.seed,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, stop=stop,
                              stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                              logprobs=logprobs, n=n or req.n, logit_bias=logit_bias(req, vocab_size),
                              prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise InvalidRequest(str(e), param=str(e).split(" ", 1)[0]) from None


def check_prompt_logprobs(req: _Sampling) -> None:
    """vLLM's rule: prompt_logprobs come in the whole response, not in a stream."""
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidRequest("prompt_logprobs are not available with stream: true", param="prompt_logprobs")


def vllm_prompt_logprobs(entries: tuple[TokenLogprob | None, ...], top: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}}, the token
    first, then its top `top`; the first entry None."""
    out: PromptLogprobs = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        d = {str(lp.token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.token)}
        for r, (i, text, v) in enumerate(lp.top[:top], start=1):
            d.setdefault(str(i), PromptLogprob(logprob=v, rank=r, decoded_token=text))
        out.append(d)
    return out


def colm_report(choice: ChainChoice, measured_s: float | None = None, final_chains: int | None = None) -> ColmReport:
    return ColmReport(chains=choice.chains, reason=choice.reason, requested_chains=choice.requested_chains,
                      degrade_reasons=list(choice.degrade_reasons), tier=choice.tier, priority=choice.priority,
                      latency_budget_ms=choice.latency_budget_ms,
                      predicted_latency_ms=None if choice.predicted_s is None else round(choice.predicted_s * 1e3, 3),
                      measured_latency_ms=None if measured_s is None else round(measured_s * 1e3, 3),
                      final_chains=final_chains)


def colm_headers(request_id: str, choice: ChainChoice) -> dict[str, str]:
    return {"X-Request-Id": request_id, "X-CoLM-Chains": str(choice.chains), "X-CoLM-Route-Reason": choice.reason}


def sse(obj: BaseModel | dict) -> str:
    import json

    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def guarded_sse(events: AsyncIterator[str], run: "RequestRun") -> AsyncIterator[str]:
    """The SSE stream of one request: its events, then [DONE] whatever happens. An API error or an
    unexpected failure midway becomes an error event first; the run is closed (aborting whatever is
    unfinished) in every case."""
    try:
        async for event in events:
            yield event
    except asyncio.CancelledError:
        raise
    except APIError as e:
        yield sse(e.body())
    except Exception:  # never leave a stream hanging without its end marker
        log.exception("stream failed")
        yield sse(error_body("internal server error", "internal_error", None, "internal_error"))
    finally:
        await run.close()
    yield SSE_DONE


@dataclass
class _Track:
    """Timing and counts of one engine request, for its metrics."""

    prompt_tokens: int
    tokens: dict[int, int] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    first_token_s: float | None = None
    queue_s: float | None = None
    chains: int | None = None
    end: float | None = None


_END = object()
ADMIT_WAIT_S = 0.25  # how long admission may take before a stream starts anyway


class RequestRun:
    """The engine streams of one HTTP request (one EngineRequest per prompt), merged in arrival order.

    start() admits every prompt (engine refusals become API errors before any byte is sent); iterating
    yields (prompt index, RequestOutput); close() aborts whatever has not finished (client gone) and
    records the metrics of every engine request exactly once.
    """

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams,
                 choice: ChainChoice, arrival: float, chain_schedule: tuple | None = None,
                 speculative: bool | None = None, stream: bool = False, grammar=None,
                 cache_salt: str | None = None):
        self.state, self.choice, self.arrival = state, choice, arrival
        # A stream's outputs wait for a network client: bounded. A collected answer is read in-process.
        self.buffer_limit = state.settings.max_stream_buffer if stream else None
        # Prompt logprobs are scored at one chain count: such a request is never shrunk.
        floor = choice.chains if choice.pinned or params.prompt_logprobs is not None else 1
        if chain_schedule:
            floor = min(c for _, c in chain_schedule)
        self.requests = [EngineRequest(f"{request_id}-{i}", p, params, chains=choice.chains,
                                       min_chains=floor, priority=choice.priority, arrival_time=arrival,
                                       chain_schedule=chain_schedule, speculative=speculative, grammar=grammar,
                                       cache_salt=cache_salt)
                         for i, p in enumerate(prompts)]
        self.tracks = [_Track(len(p)) for p in prompts]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._overflowed = False
        self.end: float | None = None

    async def start(self) -> None:
        """Submit every prompt; wait up to ADMIT_WAIT_S for the engine to accept or refuse them.

        A refusal then (queue full, too long, draining) is an HTTP error status; a request still queued
        after the wait streams on, so headers (X-CoLM-Chains) and the first chunk go out at once."""
        iters = [self.state.engine.generate(r) for r in self.requests]
        firsts = [asyncio.ensure_future(anext(it)) for it in iters]
        try:
            await asyncio.wait(firsts, timeout=ADMIT_WAIT_S)
        except BaseException:  # cancelled (client gone) while being admitted
            await self._discard(firsts)
            raise
        failure = next((f.exception() for f in firsts if f.done() and not f.cancelled() and f.exception()), None)
        if failure is not None:
            await self._discard(firsts)
            raise self._api_error(failure)
        self._tasks = [asyncio.create_task(self._pump(i, it, first))
                       for i, (it, first) in enumerate(zip(iters, firsts))]
        self.state.track(self)

    async def _discard(self, firsts: list[asyncio.Future]) -> None:
        self._closed = True
        for f in firsts:
            f.cancel()  # closes the engine stream, which aborts the request
        await asyncio.gather(*firsts, return_exceptions=True)
        for r in self.requests:
            await self.state.engine.abort(r.request_id)

    def fail(self, err: APIError) -> None:
        """End this request with an error (the engine loop died): iteration raises it."""
        self._queue.put_nowait((-1, err))

    def _api_error(self, e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, EngineError):
            return from_engine_error(e)
        log.error("engine stream failed: %r", e)
        return InternalError(f"generation failed: {type(e).__name__}")

    def _buffer(self, i: int, out: RequestOutput) -> bool:
        """Queue one output; False (and an error queued instead) once a stream's client has left
        max_stream_buffer outputs unread (the socket and uvicorn's write buffer are full, so the response
        loop is blocked): its request is then aborted, so a stalled stream holds bounded memory. A client
        that reads keeps this queue near empty (one step adds at most n x (1 + speculative tokens))."""
        if self.buffer_limit is None or self._queue.qsize() < self.buffer_limit:
            self._queue.put_nowait((i, out))
            return True
        if not self._overflowed:
            self._overflowed = True
            self.state.metrics.rejected.labels("slow_client").inc()
            log.warning("request %s aborted: its client stopped reading (%d chunks buffered)",
                        self.requests[i].request_id, self._queue.qsize())
            self._queue.put_nowait((i, SlowClient("the client stopped reading this stream; the request was "
                                                  "aborted (max_stream_buffer)")))
        return False

    async def _pump(self, i: int, it: AsyncIterator[RequestOutput], first: asyncio.Future) -> None:
        try:
            if self._buffer(i, await first):
                async for out in it:
                    if not self._buffer(i, out):
                        break
            await it.aclose()  # after an overflow: closing the engine stream aborts the request
        except Exception as e:  # an engine fault fails this request only
            await self._queue.put((i, e))
        finally:
            await self._queue.put((i, _END))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        ended = 0
        while ended < len(self._tasks):
            i, item = await self._queue.get()
            if item is _END:
                ended += 1
                continue
            if isinstance(item, BaseException):
                raise self._api_error(item)
            self._observe(i, item)
            if item.finish_reason == "error":
                raise InternalError(f"generation failed: {item.error or 'engine error'}")
            if item.finish_reason == "abort" and not self._closed:  # the engine stopped under us
                raise Unavailable("the server shut down before this request finished", code="draining")
            yield i, item
        self.end = time.monotonic()

    def _observe(self, i: int, out: RequestOutput) -> None:
        t, now = self.tracks[i], time.monotonic()
        t.tokens[out.index] = out.completion_tokens
        t.chains = out.chains
        if t.first_token_s is None and out.token_ids:
            t.first_token_s = out.first_token_time if out.first_token_time is not None else now - self.arrival
        if t.queue_s is None and out.queue_time is not None:
            t.queue_s = out.queue_time
        if out.finish_reason is not None:
            t.finish[out.index] = out.finish_reason
        t.end = now

    @property
    def measured_s(self) -> float:
        return (self.end or time.monotonic()) - self.arrival

    @property
    def final_chains(self) -> int | None:
        chains = [t.chains for t in self.tracks if t.chains is not None]
        return min(chains) if chains else None

    def usage(self) -> Usage:
        prompt = sum(t.prompt_tokens for t in self.tracks)
        completion = sum(sum(t.tokens.values()) for t in self.tracks)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def close(self) -> None:
        """Abort the unfinished engine requests and record metrics (idempotent).

        Everything that must happen is synchronous and comes first: under a cancelled anyio scope (the
        client went away mid-stream) every later await raises CancelledError again."""
        if self._closed:
            return
        self._closed = True
        self.state.untrack(self)
        for task in self._tasks:
            task.cancel()  # closes the engine stream, which aborts the request in the engine
        for t, r in zip(self.tracks, self.requests):
            record_metrics(self.state, self.choice, t, r.params.n, self.arrival)
        for r, t in zip(self.requests, self.tracks):
            if len(t.finish) < r.params.n:
                await self.state.engine.abort(r.request_id)
        await asyncio.gather(*self._tasks, return_exceptions=True)


def record_metrics(state: ServerState, choice: ChainChoice, t: _Track, n: int, arrival: float) -> None:
    """Observe one engine request's latencies and counts, labelled by its admitted chain count.

    Completions that never finished count as finish_reason "abort"; end-to-end latency, time per output
    token and budget misses are observed for complete requests only."""
    m, k = state.metrics, str(choice.chains)
    for index in range(n):
        m.requests.labels(k, t.finish.get(index, "abort")).inc()
    m.prompt_tokens.labels(k).inc(t.prompt_tokens)
    m.generation_tokens.labels(k).inc(sum(t.tokens.values()))
    if t.queue_s is not None:
        m.queue.labels(k).observe(t.queue_s)
        state.queue_time.observe(t.queue_s, left_at=arrival + t.queue_s)
    if t.first_token_s is not None:
        m.ttft.labels(k).observe(t.first_token_s)
    complete = len(t.finish) == n and "abort" not in t.finish.values() and t.end is not None
    if not complete:
        return
    e2e = t.end - arrival
    m.e2e.labels(k).observe(e2e)
    if choice.predicted_s:
        state.correction.observe(e2e, choice.predicted_s / choice.correction)
    longest = max(t.tokens.values(), default=0)
    if t.first_token_s is not None and longest > 1:
        m.tpot.labels(k).observe(max(0.0, e2e - t.first_token_s) / (longest - 1))
    if choice.latency_budget_ms is not None and e2e * 1000 > choice.latency_budget_ms:
        m.budget_misses.inc()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it if the client goes away first (its RequestRun then aborts the
    engine requests). vLLM's with_cancellation, for non-streaming responses and the admission phase."""
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=499)  # nobody is listening; logged as 499 like nginx
