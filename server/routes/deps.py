"""Annotated dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.errors import Unavailable
from server.ratelimit import current_api_key
from server.schemas import ErrorResponse
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "colm", None)
    if state is None:
        raise Unavailable("the model is not loaded yet", code="not_ready")
    return state


State = Annotated[ServerState, Depends(get_state)]


async def require_api_key(request: Request, state: State) -> None:
    """401 unless the request carries a configured key (no keys configured: open). Async so that the
    key it sets for the per-key rate limits stays in the context the endpoint runs in."""
    current_api_key.set(state.auth.check(request))


APIKey = Depends(require_api_key)

# Documented error responses of the generation endpoints (OpenAI's error shape).
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": what} for code, what in {
    400: "invalid parameters, or a prompt longer than the context",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    429: "waiting queue full, or a per-key rate limit reached (Retry-After)",
    503: "not ready, or draining for shutdown (Retry-After)",
}.items()}
