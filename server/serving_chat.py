"""POST /v1/chat/completions: messages -> chat template -> RequestRun -> OpenAI chat objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from functools import partial

from fastapi import Request
from fastapi.responses import Response

from colm_runtime.engine.types import RequestOutput, TokenLogprob

from server.errors import InvalidRequest
from server.request_run import RequestRun
from server.schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                            ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob, DeltaMessage,
                            ResponseMessage, TokenizeRequest, TopLogprob)
from server.serving import (Generation, check_prompt_logprobs, colm_report, continuous_usage, default_max_tokens,
                            generate, include_usage, sampling_params, sse, vllm_prompt_logprobs, warn_unknown_fields)
from server.state import ServerState


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise InvalidRequest("tools are not supported by this server", param="tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if req.echo:
        raise InvalidRequest("echo is not supported on chat completions (use /v1/completions with echo, or "
                             "prompt_logprobs)", param="echo")
    check_prompt_logprobs(req)


def render_chat(state: ServerState, req: ChatCompletionRequest | TokenizeRequest) -> str:
    """The prompt text of chat messages, through the model's chat template."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    return state.template.render(messages, add_generation_prompt=req.add_generation_prompt,
                                 continue_final_message=req.continue_final_message)


def _prompt_ids(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    ids = state.encode(render_chat(state, req), "messages")
    if not ids:
        raise InvalidRequest("the rendered chat prompt is empty", param="messages")
    return ids


def _logprobs(entries: tuple[TokenLogprob, ...]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                         top_logprobs=[TopLogprob(token=t, logprob=l, bytes=list(t.encode())) for _, t, l in lp.top])
        for lp in entries])


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    """Render the messages, parse the sampling fields, then run the shared pipeline (serving.generate)."""
    arrival = time.monotonic()
    _check_unsupported(req)
    warn_unknown_fields(req)
    ids = _prompt_ids(state, req)
    max_tokens = default_max_tokens(state, req.max_completion_tokens or req.max_tokens or None, [ids])
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                             prompt_logprobs=req.prompt_logprobs)
    return await generate(state, req, raw, Generation(arrival, [ids], params, "messages", "chatcmpl"),
                          stream=partial(_stream, req=req), collect=partial(_collect, req=req))


async def _collect(run: RequestRun, request_id: str, *, req: ChatCompletionRequest) -> ChatCompletionResponse:
    texts = {j: "" for j in range(req.n)}
    lps: dict[int, list[TokenLogprob]] = {j: [] for j in range(req.n)}
    finals: dict[int, RequestOutput] = {}
    prompt_lps = None
    async for _, out in run:
        texts[out.index] += out.text
        lps[out.index].extend(out.logprobs)
        prompt_lps = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_lps
        if out.finished:
            finals[out.index] = out
    choices = [ChatChoice(index=j, message=ResponseMessage(content=texts[j]),
                          logprobs=_logprobs(tuple(lps[j])) if req.logprobs else None,
                          finish_reason=finals[j].finish_reason if j in finals else None,
                          stop_reason=finals[j].stop_reason if j in finals else None)
               for j in range(req.n)]
    return ChatCompletionResponse(id=request_id, model=req.model, choices=choices, usage=run.usage(),
                                  colm=colm_report(run.choice, run.measured_s, run.final_chains),
                                  prompt_logprobs=vllm_prompt_logprobs(prompt_lps, req.prompt_logprobs)
                                  if req.prompt_logprobs is not None else None)


def _chunk(request_id: str, model: str, choice: ChatChunkChoice, **kw) -> str:
    return sse(ChatCompletionChunk(id=request_id, model=model, choices=[choice], **kw))


async def _stream(run: RequestRun, request_id: str, *, req: ChatCompletionRequest) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: a role chunk per choice (the first carries `colm`), content deltas, the
    finish_reason on each choice's last delta, then the usage chunk if asked, then [DONE]."""
    model, done, usage = req.model, 0, include_usage(req)
    for j in range(req.n):
        role = ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
        yield _chunk(request_id, model, role, colm=colm_report(run.choice) if j == 0 else None)
    async for _, out in run:
        done += out.finished
        last = done == req.n and not usage
        delta = ChatChunkChoice(index=out.index, delta=DeltaMessage(content=out.text),
                                logprobs=_logprobs(out.logprobs) if req.logprobs else None,
                                finish_reason=out.finish_reason, stop_reason=out.stop_reason)
        report = colm_report(run.choice, run.measured_s, run.final_chains) if last else None
        yield _chunk(request_id, model, delta, colm=report, usage=run.usage() if continuous_usage(req) else None)
    if usage:
        yield sse(ChatCompletionChunk(id=request_id, model=model, choices=[], usage=run.usage(),
                                      colm=colm_report(run.choice, run.measured_s, run.final_chains)))
