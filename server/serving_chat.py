"""POST /v1/chat/completions: messages -> chat template -> RequestRun -> OpenAI chat objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from colm_runtime.engine.types import RequestOutput, TokenLogprob

from server.errors import InvalidRequest
from server.schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                            ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob, DeltaMessage,
                            ResponseMessage, TokenizeRequest, TopLogprob)
from server.serving import (RequestRun, guarded_sse, check_prompt_logprobs, colm_headers, colm_report, continuous_usage,
                            engine_extras, new_id, route_hints, sampling_params, sse, vllm_prompt_logprobs,
                            warn_unknown_fields)
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


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request):
    """Validate, render, admit, start; then stream or collect the answer."""
    arrival = time.monotonic()
    _check_unsupported(req)
    warn_unknown_fields(req)
    state.check_n(req.n)
    ids = _prompt_ids(state, req)
    requested = req.max_completion_tokens or req.max_tokens
    max_tokens = requested or max(1, state.max_model_len - len(ids))
    state.check_length(len(ids), max_tokens, "messages")
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                             state.cfg.vocab_size, prompt_logprobs=req.prompt_logprobs)
    grammar = await state.grammars.get(req)
    choice = state.admit(route_hints(req, raw.headers), len(ids), max_tokens)
    request_id = new_id("chatcmpl")
    run = RequestRun(state, request_id, [ids], params, choice, arrival, stream=req.stream, grammar=grammar,
                     **engine_extras(req))
    await run.start()
    headers = colm_headers(request_id, choice)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(guarded_sse(_stream(run, req, request_id, usage), run), headers=headers,
                                 media_type="text/event-stream")
    try:
        body = await _collect(run, req, request_id)
    finally:
        await run.close()
    # pydantic's JSON, not json.dumps: a -inf logprob becomes null instead of failing the response
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


async def _collect(run: RequestRun, req: ChatCompletionRequest, request_id: str) -> ChatCompletionResponse:
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


async def _stream(run: RequestRun, req: ChatCompletionRequest, request_id: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: a role chunk per choice (the first carries `colm`), content deltas, the
    finish_reason on each choice's last delta, then the usage chunk if asked, then [DONE]."""
    model, done = req.model, 0
    for j in range(req.n):
        role = ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
        yield _chunk(request_id, model, role, colm=colm_report(run.choice) if j == 0 else None)
    async for _, out in run:
        done += out.finished
        last = done == req.n and not include_usage
        delta = ChatChunkChoice(index=out.index, delta=DeltaMessage(content=out.text),
                                logprobs=_logprobs(out.logprobs) if req.logprobs else None,
                                finish_reason=out.finish_reason, stop_reason=out.stop_reason)
        report = colm_report(run.choice, run.measured_s, run.final_chains) if last else None
        yield _chunk(request_id, model, delta, colm=report, usage=run.usage() if continuous_usage(req) else None)
    if include_usage:
        yield sse(ChatCompletionChunk(id=request_id, model=model, choices=[], usage=run.usage(),
                                      colm=colm_report(run.choice, run.measured_s, run.final_chains)))
