"""Pure ASGI middleware: the request body limit, and access logs + HTTP metrics.

Pure ASGI (not BaseHTTPMiddleware) so that streams and client disconnects pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.exceptions import HTTPException

from server.errors import BodyTooLarge
from server.metrics import ServerMetrics

access_log = logging.getLogger("colm.access")


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, by Content-Length up front or by counting a chunked body."""

    def __init__(self, app, max_bytes: int, metrics: ServerMetrics | None = None):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            err = BodyTooLarge(f"request body over the limit of {self.max_bytes} bytes")
            if self.metrics is not None:
                self.metrics.rejected.labels("body_too_large").inc()
            return await _send_json(send, err.status, err.body())
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI passes HTTPException through body parsing; errors.py gives it the OpenAI shape.
                    raise HTTPException(413, f"request body over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class AccessLogMiddleware:
    """One structured log line per request (no bodies, no headers but the request id), and the
    colm_http_requests_total / colm_http_request_duration_seconds metrics by route template."""

    def __init__(self, app, metrics: ServerMetrics, enabled: bool = True):
        self.app, self.metrics, self.enabled = app, metrics, enabled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, extra = 500, {}

        async def logging_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", ()))
                extra.update(request_id=headers.get(b"x-request-id", b"").decode() or None,
                             chains=headers.get(b"x-colm-chains", b"").decode() or None)
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            self._record(scope, status, time.perf_counter() - start, extra)

    def _record(self, scope, status: int, seconds: float, extra: dict) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.http_requests.labels(route, method, str(status)).inc()
        self.metrics.http_duration.labels(route, method, str(status)).observe(seconds)
        if self.enabled:
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({"event": "http_request", "method": method, "path": route,
                                        "status": status, "duration_ms": round(seconds * 1000, 2),
                                        "client": client[0], **{k: v for k, v in extra.items() if v}}))
