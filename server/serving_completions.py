"""POST /v1/completions: prompts (strings or token ids) -> RequestRun -> OpenAI completion objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from colm_runtime.engine.types import RequestOutput, TokenLogprob

from server.errors import InvalidRequest
from server.schemas import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.serving import (RequestRun, guarded_sse, colm_headers, colm_report, continuous_usage as _continuous,
                            engine_extras, new_id, route_hints, sampling_params, sse, warn_unknown_fields)
from server.state import ServerState


def _prompts(state: ServerState, prompt) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and text of each prompt; 400 for empty prompts and ids outside the vocabulary."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = state.cfg.vocab_size
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(state.encode(p, "prompt"))
            texts.append(p)
        else:
            if any(t < 0 or t >= vocab for t in p):
                raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            ids.append(list(p))
            texts.append(None)
        if not ids[-1]:
            raise InvalidRequest("prompt must not be empty", param="prompt")
    return ids, texts


def _check_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of < req.n:
        raise InvalidRequest("best_of must be at least n", param="best_of")
    if req.best_of is not None and req.best_of > req.n and req.stream:
        raise InvalidRequest("best_of > n cannot be streamed (the best candidates are known at the end)",
                             param="best_of")
    if req.echo and req.logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported (no prompt logprobs)", param="echo")


def _logprobs(entries: tuple[TokenLogprob, ...], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in entries:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({tok: l for _, tok, l in lp.top})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request):
    """Validate, admit, start the engine requests; then stream or collect the answer."""
    arrival = time.monotonic()
    _check_unsupported(req)
    warn_unknown_fields(req)
    n = req.best_of or req.n  # candidates per prompt the engine runs
    state.check_n(n)
    ids, texts = _prompts(state, req.prompt)
    longest = max(len(p) for p in ids)
    max_tokens = req.max_tokens or max(1, state.max_model_len - longest)
    for p in ids:
        state.check_length(len(p), max_tokens, "prompt")
    # best_of ranks candidates by cumulative logprob: the engine reports each chosen token's (logprobs 0)
    logprobs = req.logprobs if req.logprobs is not None or n == req.n else 0
    params = sampling_params(req, max_tokens, logprobs, state.cfg.vocab_size, n)
    grammar = await state.grammars.get(req)
    choice = state.admit(route_hints(req, raw.headers), longest, max_tokens)
    request_id = new_id("cmpl")
    run = RequestRun(state, request_id, ids, params, choice, arrival, stream=req.stream, grammar=grammar,
                     **engine_extras(req))
    await run.start()
    echo = [(t if t is not None else state.tokenizer.decode(p)) if req.echo else "" for p, t in zip(ids, texts)]
    headers = colm_headers(request_id, choice)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(guarded_sse(_stream(state, run, req, request_id, echo, usage), run), headers=headers,
                                 media_type="text/event-stream")
    try:
        body = await _collect(state, run, req, request_id, echo)
    finally:
        await run.close()
    # pydantic's JSON, not json.dumps: a -inf logprob becomes null instead of failing the response
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def best_of(lps: dict[int, list[TokenLogprob]], prompts: int, candidates: int, n: int) -> list[int]:
    """Per prompt, the n candidates (keys i * candidates + j) with the highest cumulative logprob, best
    first (OpenAI's best_of); all of them in order when candidates == n."""
    keep = []
    for i in range(prompts):
        keys = [i * candidates + j for j in range(candidates)]
        if candidates > n:
            keys = sorted(keys, key=lambda k: -sum(lp.logprob for lp in lps[k]))[:n]
        keep.extend(keys)
    return keep


async def _collect(state: ServerState, run: RequestRun, req: CompletionRequest, request_id: str,
                   echo: list[str]) -> CompletionResponse:
    n = req.best_of or req.n
    texts = {i * n + j: echo[i] for i in range(len(echo)) for j in range(n)}
    lps: dict[int, list[TokenLogprob]] = {k: [] for k in texts}
    finals: dict[int, RequestOutput] = {}
    async for i, out in run:
        idx = i * n + out.index
        texts[idx] += out.text
        lps[idx].extend(out.logprobs)
        if out.finished:
            finals[idx] = out
    choices = [CompletionChoice(index=index, text=texts[idx],
                                logprobs=_logprobs(tuple(lps[idx]), len(echo[idx // n]))
                                if req.logprobs is not None else None,
                                finish_reason=finals[idx].finish_reason if idx in finals else None,
                                stop_reason=finals[idx].stop_reason if idx in finals else None)
               for index, idx in enumerate(best_of(lps, len(echo), n, req.n))]
    return CompletionResponse(id=request_id, model=req.model, choices=choices, usage=run.usage(),
                              colm=colm_report(run.choice, run.measured_s, run.final_chains))


async def _stream(state: ServerState, run: RequestRun, req: CompletionRequest, request_id: str,
                  echo: list[str], include_usage: bool) -> AsyncIterator[str]:
    n, total, done = req.n, len(echo) * req.n, 0
    started: set[int] = set()
    offsets: dict[int, int] = {}
    first = True
    async for i, out in run:
        idx = i * n + out.index
        text = out.text if idx in started else echo[i] + out.text
        started.add(idx)
        done += out.finished
        if done == total and not include_usage:  # the last chunk carries the measured report
            report = colm_report(run.choice, run.measured_s, run.final_chains)
        else:
            report = colm_report(run.choice) if first else None
        first = False
        start = offsets.get(idx, 0) + len(text) - len(out.text)
        offsets[idx] = offsets.get(idx, 0) + len(text)
        chunk = CompletionResponse(
            id=request_id, model=req.model, colm=report, usage=run.usage() if _continuous(req) else None,
            choices=[CompletionChoice(index=idx, text=text, finish_reason=out.finish_reason,
                                      stop_reason=out.stop_reason,
                                      logprobs=_logprobs(out.logprobs, start)
                                      if req.logprobs is not None else None)])
        yield sse(chunk)
    if include_usage:
        yield sse(CompletionResponse(id=request_id, model=req.model, choices=[], usage=run.usage(),
                                     colm=colm_report(run.choice, run.measured_s, run.final_chains)))
