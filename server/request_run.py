"""RequestRun: the engine streams of one HTTP request, merged; per-request metrics and admission's
feedback when it closes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from colm_runtime.engine.types import EngineError, EngineRequest, RequestOutput

from server.admission import Finished
from server.errors import APIError, InternalError, SlowClient, Unavailable, from_engine_error
from server.metrics import ServerMetrics
from server.routing import ChainChoice
from server.schemas import Usage
from server.state import ServerState

log = logging.getLogger("colm.server")


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

    def e2e_s(self, n: int, arrival: float) -> float | None:
        """Arrival to last token when all n completions finished (none aborted), else None."""
        complete = len(self.finish) == n and "abort" not in self.finish.values() and self.end is not None
        return self.end - arrival if complete else None


_END = object()
ADMIT_WAIT_S = 0.25  # how long admission may take before a stream starts anyway


class RequestRun:
    """The engine streams of one HTTP request (one EngineRequest per prompt), merged in arrival order.

    start() admits every prompt (engine refusals become API errors before any byte is sent); iterating
    yields (prompt index, RequestOutput); close() aborts whatever has not finished (client gone) and
    records the metrics of every engine request exactly once.
    """

    def __init__(self, state: ServerState, requests: list[EngineRequest], choice: ChainChoice, arrival: float,
                 stream: bool = False):
        self.state, self.requests, self.choice, self.arrival = state, requests, choice, arrival
        # A stream's outputs wait for a network client: bounded. A collected answer is read in-process.
        self.buffer_limit = state.settings.max_stream_buffer if stream else None
        self.tracks = [_Track(len(r.prompt_token_ids)) for r in requests]
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
        finished = []
        for t, r in zip(self.tracks, self.requests):
            record_metrics(self.state.metrics, self.choice, t, r.params.n, self.arrival)
            finished.append(Finished(self.arrival, t.queue_s, t.e2e_s(r.params.n, self.arrival)))
        self.state.untrack(self, finished)
        for task in self._tasks:
            task.cancel()  # closes the engine stream, which aborts the request in the engine
        for r, t in zip(self.requests, self.tracks):
            if len(t.finish) < r.params.n:
                await self.state.engine.abort(r.request_id)
        await asyncio.gather(*self._tasks, return_exceptions=True)


def record_metrics(m: ServerMetrics, choice: ChainChoice, t: _Track, n: int, arrival: float) -> None:
    """Observe one engine request's latencies and counts, labelled by its admitted chain count.

    Completions that never finished count as finish_reason "abort"; end-to-end latency, time per output
    token and budget misses are observed for complete requests only."""
    k = str(choice.chains)
    for index in range(n):
        m.requests.labels(k, t.finish.get(index, "abort")).inc()
    m.prompt_tokens.labels(k).inc(t.prompt_tokens)
    m.generation_tokens.labels(k).inc(sum(t.tokens.values()))
    if t.queue_s is not None:
        m.queue.labels(k).observe(t.queue_s)
    if t.first_token_s is not None:
        m.ttft.labels(k).observe(t.first_token_s)
    e2e = t.e2e_s(n, arrival)
    if e2e is None:
        return
    m.e2e.labels(k).observe(e2e)
    longest = max(t.tokens.values(), default=0)
    if t.first_token_s is not None and longest > 1:
        m.tpot.labels(k).observe(max(0.0, e2e - t.first_token_s) / (longest - 1))
    if choice.latency_budget_ms is not None and e2e * 1000 > choice.latency_budget_ms:
        m.budget_misses.inc()
