"""One streamed request and what it measured (RequestRecord).

Timing follows vLLM's benchmark client: TTFT is send to the first chunk with a choice; inter-token
latencies are the gaps between such chunks; TPOT is (end-to-end - TTFT) / (output tokens - 1), with
the output token count taken from the server's usage (stream_options.include_usage).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from loadtests.workload import RequestPlan

PENDING, OK, ERROR, REJECTED, CANCELLED = "pending", "ok", "error", "rejected", "cancelled"
_REJECT_STATUS = (429, 503)  # the server said "not now" (queue full, draining): load shedding


@dataclass
class RequestRecord:
    """The outcome of one request. outcome stays "pending" if the phase cancelled it at its deadline.

    chains / reason / predicted_ms come from the server's `colm` report in the first chunk (None for
    servers without one); final_chains from the last report (lower if the engine shrank the request).
    """

    index: int
    selection: str
    budget_ms: float | None
    max_tokens: int
    planned_s: float = 0.0  # when the arrival process meant to send it, seconds after the phase start
    sent_at: float = 0.0  # monotonic
    outcome: str = PENDING
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    chains: int | None = None
    final_chains: int | None = None
    reason: str | None = None
    degrade_reasons: tuple[str, ...] = ()
    predicted_ms: float | None = None

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count when it sent usage, else the text chunks seen."""
        return self.output_tokens if self.output_tokens is not None else self.chunks

    @property
    def tpot_s(self) -> float | None:
        if self.outcome != OK or self.ttft_s is None or self.e2e_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)

    @property
    def budget_met(self) -> bool | None:
        """None without a budget; a request that did not finish missed it."""
        if self.budget_ms is None:
            return None
        return self.outcome == OK and self.e2e_s is not None and self.e2e_s * 1000 <= self.budget_ms


def request_body(plan: RequestPlan, base_model: str, endpoint: str) -> dict:
    """The OpenAI body (plus CoLM's selection fields) for one plan. ignore_eos fixes output lengths."""
    body = {"model": plan.selection.model_id(base_model), "max_tokens": plan.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True,
            **plan.selection.body_fields()}
    if endpoint == "chat":
        text = plan.prompt if isinstance(plan.prompt, str) else " ".join(map(str, plan.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = plan.prompt
    return body


def _is_token(chunk: dict) -> bool:
    """As vLLM's client, any choice chunk is a token event (its text may be empty while the detokenizer
    holds back a partial character), except a chat chunk that only announces the assistant role."""
    return any(not ((c.get("delta") or {}).get("role") and not c["delta"].get("content"))
               for c in chunk.get("choices") or ())


def _observe(rec: RequestRecord, chunk: dict, now: float, last: list[float]) -> None:
    report = chunk.get("colm")
    if report:
        if rec.chains is None:
            rec.chains, rec.reason = report.get("chains"), report.get("reason")
            rec.degrade_reasons = tuple(report.get("degrade_reasons") or ())
            rec.predicted_ms = report.get("predicted_latency_ms")
        if report.get("final_chains") is not None:
            rec.final_chains = report["final_chains"]
    usage = chunk.get("usage")
    if usage:
        rec.output_tokens, rec.prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if _is_token(chunk):
        rec.chunks += 1
        if rec.ttft_s is None:
            rec.ttft_s = now - rec.sent_at
        else:
            rec.itl_s.append(now - last[0])
        last[0] = now


async def send(client: httpx.AsyncClient, url: str, plan: RequestPlan, base_model: str, endpoint: str,
               rec: RequestRecord) -> None:
    """Stream one request into `rec` (filled in place, so a cancelled task leaves what it measured)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    rec.sent_at = time.monotonic()
    last = [rec.sent_at]
    try:
        async with client.stream("POST", url + path, json=request_body(plan, base_model, endpoint)) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                rec.outcome = REJECTED if resp.status_code in _REJECT_STATUS else ERROR
                rec.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if done := data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.outcome, rec.error = ERROR, f"stream error: {chunk['error'].get('message', '')[:200]}"
                    return
                _observe(rec, chunk, time.monotonic(), last)
                if plan.cancel_after is not None and rec.chunks >= plan.cancel_after:
                    rec.outcome = CANCELLED  # leaving the block closes the connection mid-stream
                    return
        rec.e2e_s = time.monotonic() - rec.sent_at
        rec.outcome = OK if rec.chunks and done else ERROR
        if rec.outcome == ERROR:
            rec.error = "stream ended without [DONE]" if not done else "stream ended without any token"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.outcome, rec.error = ERROR, f"{type(e).__name__}: {str(e)[:200]}"
