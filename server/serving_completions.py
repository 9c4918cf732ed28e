"""POST /v1/completions: prompts (strings or token ids) -> RequestRun -> OpenAI completion objects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from functools import partial

from fastapi import Request
from fastapi.responses import Response

from colm_runtime.engine.types import RequestOutput, TokenLogprob

from server.errors import InvalidRequest
from server.request_run import RequestRun
from server.schemas import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.serving import (Generation, check_prompt_logprobs, colm_report, continuous_usage, default_max_tokens,
                            generate, include_usage, sampling_params, sse, vllm_prompt_logprobs, warn_unknown_fields)
from server.state import ServerState


def _prompts(state: ServerState, prompt) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and text of each prompt (their ids are checked with the rest: engine/validation.py)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    texts = [p if isinstance(p, str) else None for p in prompt]
    return [state.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompt], texts


def _check_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of < req.n:
        raise InvalidRequest("best_of must be at least n", param="best_of")
    if req.best_of is not None and req.best_of > req.n and req.stream:
        raise InvalidRequest("best_of > n cannot be streamed (the best candidates are known at the end)",
                             param="best_of")
    check_prompt_logprobs(req)
    if req.max_tokens == 0 and _prompt_top(req) is None:
        raise InvalidRequest("max_tokens 0 only scores the prompt: it needs echo with logprobs, or "
                             "prompt_logprobs", param="max_tokens")
    if req.max_tokens == 0 and (req.best_of or req.n) > 1:
        raise InvalidRequest("max_tokens 0 (scoring the prompt) needs n = 1", param="n")


def _prompt_top(req: CompletionRequest) -> int | None:
    """The top-N the engine scores the prompt with (None: no prompt logprobs): echo + logprobs wants
    the prompt in the logprobs object, prompt_logprobs in vLLM's field."""
    wanted = [x for x in (req.logprobs if req.echo else None, req.prompt_logprobs) if x is not None]
    return max(wanted) if wanted else None


def _logprobs(entries: tuple[TokenLogprob, ...], offset: int, prompt: list[TokenLogprob | None] | None = None,
              top: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object from offset; with echo, the prompt's entries come first (the first
    with a null logprob and null top_logprobs)."""
    out = CompletionLogprobs()
    for lp in (prompt or []) + list(entries):
        if isinstance(lp, str):  # the first prompt token: nothing predicts it
            token, logprob, tops = lp, None, None
        else:
            token, logprob, tops = lp.token, lp.logprob, {tok: l for _, tok, l in lp.top[:top]}
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(tops)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def _echoed(state: ServerState, ids: list[int], entries: tuple[TokenLogprob | None, ...]) -> list:
    """The prompt's logprob entries for echo: the first token's text, then its TokenLogprobs."""
    return [state.tokenizer.decode(ids[:1], skip_special_tokens=False)] + list(entries[1:])


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    """Parse the prompts and sampling fields, then run the shared pipeline (serving.generate)."""
    arrival = time.monotonic()
    _check_unsupported(req)
    warn_unknown_fields(req)
    n = req.best_of or req.n  # candidates per prompt the engine runs
    ids, texts = _prompts(state, req.prompt)
    # best_of ranks candidates by cumulative logprob: the engine reports each chosen token's (logprobs 0)
    logprobs = req.logprobs if req.logprobs is not None or n == req.n else 0
    params = sampling_params(req, default_max_tokens(state, req.max_tokens, ids), logprobs, n, _prompt_top(req))
    return await generate(state, req, raw, Generation(arrival, ids, params, "prompt", "cmpl"),
                          stream=partial(_stream, state, req=req, prompt_texts=texts, ids=ids),
                          collect=partial(_collect, state, req=req, prompt_texts=texts, ids=ids))


def _echo(state: ServerState, req: CompletionRequest, ids: list[list[int]], texts: list[str | None]) -> list[str]:
    """The text each prompt's completions start with: the prompt with echo, else "". Token-id prompts
    echo every token's text, special ones included (as their logprob entries do)."""
    return [(t if t is not None else state.tokenizer.decode(p, skip_special_tokens=False)) if req.echo else ""
            for p, t in zip(ids, texts)]


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


async def _collect(state: ServerState, run: RequestRun, request_id: str, *, req: CompletionRequest,
                   prompt_texts: list[str | None], ids: list[list[int]]) -> CompletionResponse:
    echo = _echo(state, req, ids, prompt_texts)
    n = req.best_of or req.n
    texts = {i * n + j: echo[i] for i in range(len(echo)) for j in range(n)}
    lps: dict[int, list[TokenLogprob]] = {k: [] for k in texts}
    prompt_lps: dict[int, tuple] = {}  # prompt index -> its prompt logprobs (the same for its n choices)
    finals: dict[int, RequestOutput] = {}
    async for i, out in run:
        idx = i * n + out.index
        texts[idx] += out.text
        lps[idx].extend(out.logprobs)
        if out.prompt_logprobs is not None:
            prompt_lps[i] = out.prompt_logprobs
        if out.finished:
            finals[idx] = out
    choices = []
    for index, idx in enumerate(best_of(lps, len(echo), n, req.n)):
        i = idx // n
        echoed = _echoed(state, ids[i], prompt_lps[i]) if req.echo and req.logprobs is not None else None
        choices.append(CompletionChoice(
            index=index, text=texts[idx],
            logprobs=_logprobs(tuple(lps[idx]), 0 if echoed else len(echo[i]), echoed, req.logprobs or 0)
            if req.logprobs is not None else None,
            finish_reason=finals[idx].finish_reason if idx in finals else None,
            stop_reason=finals[idx].stop_reason if idx in finals else None,
            prompt_logprobs=vllm_prompt_logprobs(prompt_lps[i], req.prompt_logprobs)
            if req.prompt_logprobs is not None else None))
    return CompletionResponse(id=request_id, model=req.model, choices=choices, usage=run.usage(),
                              colm=colm_report(run.choice, run.measured_s, run.final_chains))


async def _stream(state: ServerState, run: RequestRun, request_id: str, *, req: CompletionRequest,
                  prompt_texts: list[str | None], ids: list[list[int]]) -> AsyncIterator[str]:
    echo = _echo(state, req, ids, prompt_texts)
    n, total, done, usage = req.n, len(echo) * req.n, 0, include_usage(req)
    started: set[int] = set()
    offsets: dict[int, int] = {}
    first = True
    async for i, out in run:
        idx = i * n + out.index
        text = out.text if idx in started else echo[i] + out.text
        # echo + logprobs: a completion's first chunk carries the prompt's entries too (offsets from 0)
        echoed = None
        if idx not in started and req.echo and req.logprobs is not None:
            echoed = _echoed(state, ids[i], out.prompt_logprobs)
        started.add(idx)
        done += out.finished
        if done == total and not usage:  # the last chunk carries the measured report
            report = colm_report(run.choice, run.measured_s, run.final_chains)
        else:
            report = colm_report(run.choice) if first else None
        first = False
        start = 0 if echoed else offsets.get(idx, 0) + len(text) - len(out.text)
        offsets[idx] = offsets.get(idx, 0) + len(text)
        chunk = CompletionResponse(
            id=request_id, model=req.model, colm=report, usage=run.usage() if continuous_usage(req) else None,
            choices=[CompletionChoice(index=idx, text=text, finish_reason=out.finish_reason,
                                      stop_reason=out.stop_reason,
                                      logprobs=_logprobs(out.logprobs, start, echoed, req.logprobs or 0)
                                      if req.logprobs is not None else None)])
        yield sse(chunk)
    if usage:
        yield sse(CompletionResponse(id=request_id, model=req.model, choices=[], usage=run.usage(),
                                     colm=colm_report(run.choice, run.measured_s, run.final_chains)))
