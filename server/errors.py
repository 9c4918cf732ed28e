"""The one place that maps error kinds to HTTP status, in OpenAI's shape.

Every error body is {"error": {"message", "type", "param", "code"}}. Client mistakes are 4xx (FastAPI's
422 validation errors become 400, as in OpenAI's API); overload is 429 and draining 503, both with
Retry-After; anything unexpected is a 500 with no detail (logged server-side).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from colm_runtime.engine.types import (EngineError, EngineOverloaded, EngineStopped, RequestTooLong)
from colm_runtime.engine.types import InvalidRequest as EngineInvalidRequest

log = logging.getLogger("colm.server")

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(APIError):
    """A parameter the server cannot accept (400)."""

    code = "invalid_value"


class ContextTooLong(APIError):
    """Prompt (+ max_tokens) beyond the context or the prompt limit (400)."""

    code = "context_length_exceeded"


class Unauthorized(APIError):
    status, code = 401, "invalid_api_key"


class ModelNotFound(APIError):
    status, code = 404, "model_not_found"


class BodyTooLarge(APIError):
    status, code = 413, "request_too_large"


class Overloaded(APIError):
    """The bounded queue is full (429, Retry-After)."""

    status, type, code = 429, "rate_limit_error", "queue_full"

    def __init__(self, message: str, **kw):
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)}, **kw)


class SlowClient(APIError):
    """A stream's client stopped reading and its buffer filled: the request was aborted (sent as the
    stream's error chunk, if the client ever reads again; 499 as nginx logs a client gone)."""

    status, type, code = 499, "timeout_error", "slow_client"


class Unavailable(APIError):
    """Not ready yet, or draining for shutdown (503, Retry-After)."""

    status, type, code = 503, "service_unavailable_error", "unavailable"

    def __init__(self, message: str, **kw):
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)}, **kw)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_engine_error(e: EngineError) -> APIError:
    """The API error an engine refusal maps to."""
    if isinstance(e, RequestTooLong):
        return ContextTooLong(str(e), param=e.param or "max_tokens")
    if isinstance(e, EngineOverloaded):
        return Overloaded(str(e) or "the waiting queue is full; retry later")
    if isinstance(e, EngineInvalidRequest):
        return InvalidRequest(str(e), param=e.param)
    if isinstance(e, EngineStopped):
        return Unavailable(str(e) or "the server is shutting down", code="draining")
    return InternalError(str(e))


class InternalError(APIError):
    status, type, code = 500, "internal_error", "internal_error"


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param): param is the top-level field; a union's alternatives are summarised."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return f"request body: {first.get('msg', 'invalid request')}", None
    param = loc[0]
    msgs = list(dict.fromkeys(e.get("msg", "") for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == [param]))
    return f"{param}: {'; or '.join(msgs[:4])}", param


_HTTP_ERRORS = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
                413: ("invalid_request_error", "request_too_large")}


_REJECT_REASONS = {(400, "context_length_exceeded"): "too_long", (429, "rate_limit_exceeded"): "rate_limited",
                   (429, "budget_unreachable"): "budget_unreachable",
                   (499, "slow_client"): "slow_client", 401: "unauthorized", 404: "not_found",
                   413: "body_too_large", 429: "queue_full", (503, "draining"): "draining", 503: "not_ready"}


def reject_reason(status: int, code: str | None) -> str:
    """The colm_rejected_requests_total{reason} label of an error response."""
    return _REJECT_REASONS.get((status, code)) or _REJECT_REASONS.get(status) or (
        "invalid" if status < 500 else "error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise through the mapping above (and count the rejection)."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None and err.status != 500:
            metrics.rejected.labels(reject_reason(err.status, err.code)).inc()
        return _response(err)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return respond(request, InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_, code = _HTTP_ERRORS.get(exc.status_code, ("invalid_request_error", None))
        err = APIError(str(exc.detail), code=code, headers=getattr(exc, "headers", None))
        err.status, err.type = exc.status_code, type_
        return respond(request, err)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError):
        return respond(request, from_engine_error(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return _response(InternalError("internal server error"))
