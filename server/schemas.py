"""OpenAI request and response shapes, plus CoLM's fields (chains, tier, latency_budget_ms, priority)
and the `colm` report object that says which chain count served a request and why.

Unknown request fields are ignored (logged by name), as vLLM does, so OpenAI clients that send newer
fields keep working. Values the server cannot honour are rejected with 400, never silently dropped.

Over 300 lines on purpose: this is the whole wire format, one declarative class per object, read side
by side with docs/api.md; split, a field's request and response forms would sit in different files.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16
MAX_STOP = 16
MAX_LOGPROBS = 20
MAX_SCHEDULE = 64

RouteReason = Literal["model", "chains", "tier", "budget", "default", "degraded"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # unknown fields: kept aside, ignored


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _Sampling(_Request):
    """Fields shared by both endpoints (OpenAI's, then vLLM's extra sampling fields, then CoLM's)."""

    model: str = Field(description="base model id, or `<base>:c<k>` to pin k chains")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_N, description="reproducible sampling")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="{token id: bias in [-100, 100]} added to the logits before sampling")
    user: str | None = None
    # vLLM extras
    top_k: int = Field(0, ge=-1, description="0 or -1: disabled")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    # Structured outputs (one of them; server/structured.py): OpenAI's, then vLLM's two forms
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text' | 'json_object' | 'json_schema', 'json_schema': {'schema': ...}}")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: output matches this JSON schema")
    guided_regex: str | None = Field(None, description="vLLM: output matches this regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM: output is exactly one of these strings")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM: {'json': schema} | {'regex': ...} | {'choice': [...]} | {'json_object': true}")
    # CoLM extras: chain selection (first match wins: model id, chains, tier, latency_budget_ms)
    chains: int | None = Field(None, description="pin this many chains (1..n)")
    tier: str | None = Field(None, description="a named tier of the server (economy, standard, premium)")
    latency_budget_ms: float | None = Field(None, gt=0, description="end-to-end target in milliseconds")
    priority: int | None = Field(None, description="scheduling priority (higher first); default: the tier's")
    chain_schedule: list[tuple[int, int]] | None = Field(
        None, max_length=MAX_SCHEDULE, description="[[generated_token, chains], ...] from [0, k]: the chain "
        "count of each generated token (pins the request; e.g. [[0, 4], [32, 2]])")
    speculative: bool | None = Field(None, description="self-speculative decoding (default: the server's)")
    # vLLM extra, after CoLM's so that merges of new fields above stay apart
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM: the logprob of every "
                                        "prompt token (the first null) with the top-N; not with stream")
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="vLLM: requests share "
                                   "cached prefixes only with requests of the same salt (tenant isolation)")

    @model_validator(mode="after")
    def _schedule_vs_chains(self):
        if self.chain_schedule and self.chains is not None and self.chains != self.chain_schedule[0][1]:
            raise ValueError("chains and chain_schedule[0] disagree (give one of them)")
        return self


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=0, description="default 16; null: up to the context; 0: only score "
                                   "the prompt (echo with logprobs, or prompt_logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="generate best_of candidates, return the n "
                                "with the highest cumulative logprob (>= n; not with stream)")
    suffix: str | None = Field(None, description="not supported: must be null")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: up to the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    tool_choice: Any = None
    add_generation_prompt: bool = True  # vLLM extra
    echo: bool = Field(False, description="not supported: must be false")
    continue_final_message: bool = False  # vLLM extra


# ---- responses ---------------------------------------------------------------------------------


class ColmReport(BaseModel):
    """What served the request and why."""

    chains: int = Field(description="chain count the request was admitted at")
    reason: RouteReason = Field(description="what decided it")
    requested_chains: int = Field(description="the router's choice before any degradation")
    degrade_reasons: list[str] = Field(default_factory=list, description="why chains were removed")
    tier: str | None = None
    priority: int = 0
    latency_budget_ms: float | None = None
    predicted_latency_ms: float | None = Field(None, description="queue + prefill + max_tokens x TPOT")
    measured_latency_ms: float | None = Field(None, description="arrival to last token (null in the first chunk)")
    final_chains: int | None = Field(None, description="chains of the last token (lower if the engine shrank it)")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one token of a prompt_logprobs entry (keyed by token id)."""

    logprob: float
    rank: int | None = Field(None, description="1: the most likely token")
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, {token id: PromptLogprob} (the token, then the top-N); the
# first entry is null (nothing predicts the first token).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    colm: ColmReport | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    colm: ColmReport | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM: of the rendered prompt, at the response level


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    colm: ColmReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "colm-serve"
    root: str = Field(description="the base model id")
    parent: str | None = Field(None, description="the base model, for per-chain ids")
    max_model_len: int
    chains: int = Field(description="chain count this id serves")
    parameters: int = Field(description="parameters used at this chain count")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's): a `prompt`, or chat `messages` rendered with the chat template."""

    model: str | None = Field(None, description="checked when given")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="the tokenizer's own special tokens (colm-tiny: none)")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's)."""

    model: str | None = Field(None, description="checked when given")
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
