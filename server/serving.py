"""The request pipeline /v1/completions and /v1/chat/completions share: each endpoint parses its body
into a Generation (prompt ids, SamplingParams); generate() validates it once (engine/validation.py, 400
naming the field), admits it (server/admission), starts its RequestRun and streams or collects the
answer with the endpoint's formatter. Also: SSE framing and the client-disconnect race.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from colm_runtime.engine.types import EngineRequest, SamplingParams, TokenLogprob

from server.errors import APIError, InvalidRequest, error_body
from server.request_run import RequestRun
from server.routing import ChainChoice, RouteHints, parse_header_number
from server.schemas import ColmReport, PromptLogprob, PromptLogprobs, _Sampling
from server.state import ServerState
from server.structured import logit_bias

log = logging.getLogger("colm.server")


@dataclass(frozen=True)
class Generation:
    """One generation request as its endpoint parsed it; what generate() runs."""

    arrival: float  # monotonic time the request arrived (latencies are measured from here)
    prompts: list[list[int]]  # token ids, one list per prompt
    params: SamplingParams
    prompt_param: str  # the body field that holds the prompt ("prompt", "messages"), for errors
    id_prefix: str  # of the response id: "cmpl", "chatcmpl"


Stream = Callable[[RequestRun, str], AsyncIterator[str]]  # (run, response id) -> SSE events
Collect = Callable[[RequestRun, str], Awaitable[BaseModel]]  # (run, response id) -> the response body


async def generate(state: ServerState, req: _Sampling, raw: Request, gen: Generation, stream: Stream,
                   collect: Collect) -> Response:
    """Validate, admit, start the engine requests; then stream (SSE) or collect the answer."""
    hints = route_hints(req, raw.headers)
    chains = hints.chains if hints.chains is not None else state.cfg.n_chains  # routing may lower it later
    drafts = engine_requests("draft", gen, req, chains, floor=1)
    state.validate(drafts, gen.prompt_param)  # before admission: a 400 is never counted as routed
    grammar = await state.grammars.get(req)
    choice = state.admit(hints, max(len(p) for p in gen.prompts), gen.params.max_tokens)
    request_id = new_id(gen.id_prefix)
    # Prompt logprobs are scored at one chain count: such a request is never shrunk.
    floor = choice.chains if choice.pinned or gen.params.prompt_logprobs is not None else 1
    run = RequestRun(state, engine_requests(request_id, gen, req, choice.chains, floor, choice.priority, grammar),
                     choice, gen.arrival, stream=req.stream)
    await run.start()
    headers = colm_headers(request_id, choice)
    if req.stream:
        return StreamingResponse(guarded_sse(stream(run, request_id), run), headers=headers,
                                 media_type="text/event-stream")
    try:
        body = await collect(run, request_id)
    finally:
        await run.close()
    # pydantic's JSON, not json.dumps: a -inf logprob becomes null instead of failing the response
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def engine_requests(request_id: str, gen: Generation, req: _Sampling, chains: int, floor: int,
                    priority: int = 0, grammar=None) -> list[EngineRequest]:
    """One EngineRequest per prompt at `chains`, never shrunk below `floor` (a chain schedule's
    lowest count instead, when it has one)."""
    schedule = tuple(tuple(e) for e in req.chain_schedule) if req.chain_schedule is not None else None
    if schedule:
        floor = max(1, min(c for _, c in schedule))
    return [EngineRequest(f"{request_id}-{i}", p, gen.params, chains=chains, min_chains=floor, priority=priority,
                          arrival_time=gen.arrival, chain_schedule=schedule, speculative=req.speculative,
                          grammar=grammar, cache_salt=req.cache_salt)
            for i, p in enumerate(gen.prompts)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def default_max_tokens(state: ServerState, requested: int | None, prompts: list[list[int]]) -> int:
    """max_tokens as asked, else the room the context leaves after the longest prompt (at least 1)."""
    return requested if requested is not None else max(1, state.max_model_len - max(len(p) for p in prompts))


def route_hints(req: _Sampling, headers) -> RouteHints:
    """Body fields over their X-CoLM-* header twins."""
    chains = req.chains if req.chains is not None else parse_header_number(
        "X-CoLM-Chains", headers.get("x-colm-chains"), int)
    budget = req.latency_budget_ms if req.latency_budget_ms is not None else parse_header_number(
        "X-CoLM-Latency-Budget-Ms", headers.get("x-colm-latency-budget-ms"), float)
    tier = req.tier if req.tier is not None else headers.get("x-colm-tier")
    if req.chain_schedule and chains is None:
        chains = req.chain_schedule[0][1]  # a schedule pins the chain count it starts at
    return RouteHints(model=req.model, chains=chains, tier=tier, latency_budget_ms=budget, priority=req.priority)


def warn_unknown_fields(req: _Sampling) -> None:
    """Unknown fields are ignored, as vLLM does; their names (never values) are logged."""
    if req.model_extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(k[:40] for k in req.model_extra)[:10]))


def include_usage(req: _Sampling) -> bool:
    """stream_options.include_usage: a final chunk with the usage."""
    return req.stream_options is not None and req.stream_options.include_usage


def continuous_usage(req: _Sampling) -> bool:
    """vLLM's stream_options.continuous_usage_stats: usage so far in every chunk (with include_usage)."""
    return include_usage(req) and req.stream_options.continuous_usage_stats


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, n: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams from the shared OpenAI/vLLM fields; 400 naming the field if invalid. n: the
    completions the engine runs (best_of), default req.n."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(not s for s in stop):
        raise InvalidRequest("stop strings must not be empty", param="stop")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, min_p=req.min_p, seed=req.seed,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, stop=stop,
                              stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                              logprobs=logprobs, n=n or req.n, logit_bias=logit_bias(req),
                              prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise InvalidRequest(str(e), param=str(e).split(" ", 1)[0]) from None


def check_prompt_logprobs(req: _Sampling) -> None:
    """vLLM's rule: prompt_logprobs come in the whole response, not in a stream."""
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidRequest("prompt_logprobs are not available with stream: true", param="prompt_logprobs")


def vllm_prompt_logprobs(entries: tuple[TokenLogprob | None, ...], top: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}}, the token
    first, then its top `top`; the first entry None."""
    out: PromptLogprobs = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        d = {str(lp.token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.token)}
        for r, (i, text, v) in enumerate(lp.top[:top], start=1):
            d.setdefault(str(i), PromptLogprob(logprob=v, rank=r, decoded_token=text))
        out.append(d)
    return out


def colm_report(choice: ChainChoice, measured_s: float | None = None, final_chains: int | None = None) -> ColmReport:
    return ColmReport(chains=choice.chains, reason=choice.reason, requested_chains=choice.requested_chains,
                      degrade_reasons=list(choice.degrade_reasons), tier=choice.tier, priority=choice.priority,
                      latency_budget_ms=choice.latency_budget_ms,
                      predicted_latency_ms=None if choice.predicted_s is None else round(choice.predicted_s * 1e3, 3),
                      measured_latency_ms=None if measured_s is None else round(measured_s * 1e3, 3),
                      final_chains=final_chains)


def colm_headers(request_id: str, choice: ChainChoice) -> dict[str, str]:
    return {"X-Request-Id": request_id, "X-CoLM-Chains": str(choice.chains), "X-CoLM-Route-Reason": choice.reason}


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def guarded_sse(events: AsyncIterator[str], run: "RequestRun") -> AsyncIterator[str]:
    """The SSE stream of one request: its events, then [DONE] whatever happens. An API error or an
    unexpected failure midway becomes an error event first; the run is closed (aborting whatever is
    unfinished) in every case."""
    try:
        async for event in events:
            yield event
    except asyncio.CancelledError:
        raise
    except APIError as e:
        yield sse(e.body())
    except Exception:  # never leave a stream hanging without its end marker
        log.exception("stream failed")
        yield sse(error_body("internal server error", "internal_error", None, "internal_error"))
    finally:
        await run.close()
    yield SSE_DONE


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it if the client goes away first (its RequestRun then aborts the
    engine requests). vLLM's with_cancellation, for non-streaming responses and the admission phase."""
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=499)  # nobody is listening; logged as 499 like nginx
