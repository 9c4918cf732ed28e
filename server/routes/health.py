"""GET /health (alive), GET /ready (model loaded, engine running, not draining), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pydantic import BaseModel

from server.errors import Unavailable, error_body
from server.schemas import ErrorResponse

router = APIRouter(tags=["health"])
_503 = {503: {"model": ErrorResponse, "description": "not alive / not ready or draining (Retry-After)"}}


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str = "ready"
    model: str
    chains: int


def _state(request: Request):
    return getattr(request.app.state, "colm", None)


@router.get("/health", response_model=Health, responses=_503)
async def health(request: Request) -> JSONResponse:
    """200 while the process and its engine loop are alive and the engine healthy (liveness probe); 503
    once the loop stopped or too many engine steps failed in a row, so that the orchestrator restarts it."""
    state = _state(request)
    stats = state.stats() if state is not None else None
    if stats is not None and not stats.alive:
        return JSONResponse(error_body("the engine loop has stopped", "service_unavailable_error", None,
                                       "engine_dead"), status_code=503)
    if stats is not None and not stats.healthy:
        return JSONResponse(error_body(f"{stats.step_failures_total} engine steps failed; restart the process",
                                       "service_unavailable_error", None, "engine_unhealthy"), status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=Ready, responses=_503)
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine runs; 503 before that and while draining."""
    state = _state(request)
    if state is None or not state.ready or state.draining or not state.stats().alive:
        why = "draining" if state is not None and state.draining else "not_ready"
        err = Unavailable("the server is draining" if why == "draining" else "the model is not ready", code=why)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    return JSONResponse({"status": "ready", "model": state.base_name, "chains": state.cfg.n_chains})


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (with --metrics-auth)"}})
async def metrics(request: Request) -> Response:
    """Prometheus text format (API key required only with metrics_auth)."""
    app_metrics = request.app.state.metrics
    state = _state(request)
    if state is not None and state.settings.metrics_auth:
        state.auth.check(request)
    return Response(generate_latest(app_metrics.registry), media_type=CONTENT_TYPE_LATEST)
