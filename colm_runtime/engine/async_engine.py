"""AsyncEngine: the EngineClient the server uses. The LLMEngine runs in one background thread (the
model computes off the event loop; torch releases the GIL in its kernels); requests and aborts reach
it through a command queue, and its outputs go back to each request's asyncio.Queue with
loop.call_soon_threadsafe. Only the engine thread touches the LLMEngine after start().
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import (EngineClient, EngineError, EngineRequest, EngineStats, EngineStopped,
                                       InvalidRequest, RequestOutput)
from colm_runtime.engine.validation import check_queue
from colm_runtime.model import cpu_kernels

log = logging.getLogger(__name__)


class _Stream:
    """Where one request's outputs go: a queue on the consumer's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


class AsyncEngine(EngineClient):
    """Streams RequestOutputs of an LLMEngine stepped by a background thread."""

    def __init__(self, engine: LLMEngine, idle_wait: float = 0.5):
        self.engine = engine
        self.config = engine.cfg
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self._idle_wait = idle_wait
        self._lock = threading.Lock()  # guards _commands, _streams, _stats and _taken
        self._wake = threading.Event()
        self._commands: deque[tuple[str, object]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._draining = False
        self._stop = False
        self._stats = engine.stats()
        self._taken = 0  # adds the thread took from _commands since it last published _stats

    @classmethod
    def from_model_dir(cls, path: str | Path, config: EngineConfig = EngineConfig()) -> "AsyncEngine":
        return cls(LLMEngine.from_model_dir(path, config))

    # ---- EngineClient --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            cpu_kernels.release_thread_pool()  # this thread's idle OpenMP pool slows the engine thread's
            self._thread = threading.Thread(target=self._loop, name="colm-engine", daemon=True)
            self._thread.start()

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        return self._generate(request)

    async def _generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self._draining or self._thread is None:
            raise EngineStopped("the engine is not running" if self._thread is None else "the engine is draining")
        self.engine.validate(request)  # pure: raises InvalidRequest / RequestTooLong here, in the caller
        stream = _Stream(asyncio.get_running_loop())
        rid = request.request_id
        with self._lock:
            if rid in self._streams:
                raise InvalidRequest(f"request id {rid!r} is already in flight")
            # The queue bound, checked here in the caller as well as in the engine thread: the caller
            # then learns of a full queue before the request streams (a 429, not a 200 whose stream
            # fails). Adds not yet taken by the thread, and those it took during the step whose stats
            # are not out yet, count as waiting.
            queued = self._stats.waiting + self._taken + sum(1 for c in self._commands if c[0] == "add")
            check_queue(queued, self.engine.config.max_waiting)
            self._streams[rid] = stream
            self._commands.append(("add", request))
        self._wake.set()
        remaining, done = request.params.n, False
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                remaining -= item.finished
            done = True
        finally:
            with self._lock:
                self._streams.pop(rid, None)
                if not done:  # the consumer went away (closed or cancelled): free its blocks
                    self._commands.append(("abort", rid))
            self._wake.set()

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._commands.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        alive = self._thread is not None and self._thread.is_alive() and not self._stop
        return dataclasses.replace(self._stats, alive=alive)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting, let running requests finish for up to drain_timeout seconds, abort the rest."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (self._streams or self._commands):
            await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            self._run_commands()
            if not eng.has_unfinished:
                self._publish()
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()  # a failed batch fails its own requests inside step()
            except Exception as e:  # a bug outside the step's batch: fail every request, keep serving
                log.exception("engine step failed")
                outputs = eng.fail_all(e)
            self._publish()  # before the outputs: a consumer woken by them sees this step
            self._dispatch(outputs)
            if not eng.last_step_ran and not outputs:  # nothing could run: do not spin
                self._wake.wait(0.005)
                self._wake.clear()
        self._close()

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                kind, arg = self._commands.popleft()
                self._taken += kind == "add"
            if kind == "abort":
                self.engine.abort(arg)  # type: ignore[arg-type]
                continue
            req: EngineRequest = arg  # type: ignore[assignment]
            try:
                # The caller already checked the queue bound, counting every add in flight: a second check
                # here could only refuse a request whose stream has begun.
                self.engine.add_request(req, check_queue=False)
            except EngineError as e:
                self._send(req.request_id, e)
            except Exception as e:  # a fault in this request's own processing: it alone fails
                self._dispatch(self.engine.fail(req, e))

    def _send(self, rid: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(rid)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one callback per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _close(self) -> None:
        """On stop: abort what runs, refuse what was still queued."""
        self._dispatch(self.engine.abort_all())
        with self._lock:
            queued, self._commands = list(self._commands), deque()
        for kind, arg in queued:
            if kind == "add":
                self._send(arg.request_id, EngineStopped("the engine stopped"))  # type: ignore[attr-defined]
        self._publish()

    def _publish(self) -> None:
        """New stats for callers; the adds taken so far are in them now."""
        stats = self.engine.stats()
        with self._lock:
            self._stats, self._taken = stats, 0


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
