"""The real app with the real engine in the test process, behind httpx's ASGITransport: for HTTP tests
where a separate process is not the point (lifecycle, signals, the CLI and client disconnects keep
their `colm serve` subprocess).

The app's event loop runs in a background thread, where the lifespan is entered explicitly
(ASGITransport does not run it); `InProcessServer.client` is a plain synchronous httpx.Client whose
transport hands each request to ASGITransport on that loop, so tests read like the subprocess ones.
ASGITransport returns a response once the app has sent all of it: streams arrive whole.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx

from server.app import create_app
from server.settings import ServerSettings

BASE_URL = "http://colm.test"


class _AsyncBody(httpx.AsyncByteStream):
    """A request body written by a synchronous client, read by ASGITransport (chunk by chunk, as sent)."""

    def __init__(self, stream: httpx.SyncByteStream):
        self.stream = stream

    async def __aiter__(self):
        for chunk in self.stream:
            yield chunk


class _LoopTransport(httpx.BaseTransport):
    """A synchronous transport that runs ASGITransport's request on the app's loop."""

    def __init__(self, server: "InProcessServer"):
        self.server = server
        self.asgi = httpx.ASGITransport(app=server.app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.stream = _AsyncBody(request.stream)

        async def send() -> httpx.Response:
            response = await self.asgi.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content,
                                  request=request)

        return self.server.run(send())


class InProcessServer:
    """create_app(settings) started in a background event loop; .client, .app, .state, .stop()."""

    def __init__(self, model_dir: Path, **settings):
        self.app = create_app(ServerSettings(model=str(model_dir), **settings))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="app-loop", daemon=True)
        self._thread.start()
        self._lifespan: AbstractAsyncContextManager = self.app.router.lifespan_context(self.app)
        self.run(self._lifespan.__aenter__())
        self.client = httpx.Client(transport=_LoopTransport(self), base_url=BASE_URL, timeout=60)

    @property
    def state(self):
        """The app's ServerState (admission, engine, settings)."""
        return self.app.state.colm

    def run(self, coro: Coroutine, timeout: float = 120.0):
        """Run a coroutine on the app's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.client.close()
        self.run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
