"""POST /v1/completions and POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.routes.deps import APIKey, ERROR_RESPONSES, State
from server.schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from server.serving import until_disconnect
from server.serving_chat import create_chat_completion
from server.serving_completions import create_completion

router = APIRouter(prefix="/v1", dependencies=[APIKey], tags=["generation"], responses=ERROR_RESPONSES)

# One server-sent event (OpenAPI 3.2's itemSchema for text/event-stream): `data` is a JSON chunk, an
# error object, or the final [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
    "data": {"type": "string", "description": "a chunk object (JSON), {\"error\": ...}, or [DONE]"}}}
_STREAM = {"content": {"text/event-stream": {"schema": {"type": "array", "items": _SSE_EVENT},
                                             "itemSchema": _SSE_EVENT}},
           "description": "JSON, or server-sent events when stream is true"}


@router.post("/completions", response_model=CompletionResponse, responses={200: _STREAM})
async def completions(body: CompletionRequest, request: Request, state: State):
    """OpenAI text completions, with chain selection (model `<base>:c<k>`, chains, tier, latency_budget_ms)."""
    return await until_disconnect(request, create_completion(state, body, request))


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: _STREAM})
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    """OpenAI chat completions; the prompt comes from the model's chat template."""
    return await until_disconnect(request, create_chat_completion(state, body, request))
