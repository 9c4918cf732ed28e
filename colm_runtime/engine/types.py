"""The objects that cross the engine's public seam (server -> engine -> server).

The server builds an EngineRequest, iterates the async stream of RequestOutput that the engine yields
for it, and reads EngineStats for routing, metrics and readiness. Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from colm_runtime.config import ModelConfig
    from colm_runtime.engine.grammar import CompiledGrammar
    from colm_runtime.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineError(Exception):
    """Base class of errors the engine reports about a request (mapped to HTTP by the server).
    param: the request field the error concerns (None: the request as a whole)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestTooLong(EngineError):
    """The request can never fit: prompt + max_tokens exceed the context or the whole KV cache."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; retry later."""


class EngineStopped(EngineError):
    """The engine is draining or stopped and admits no new requests."""


class InvalidRequest(EngineError, ValueError):
    """The request itself is malformed (empty prompt, token id outside the vocabulary, chain count
    outside 1..n_chains, min_chains above chains, a request id already in flight): a client error."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, OpenAI/vLLM semantics.

    temperature 0 means greedy. top_k <= 0 disables top-k; top_p 1 and min_p 0 disable theirs.
    seed makes a request's sampling reproducible whatever else is in the batch. logprobs: return the
    top-N log-probabilities of each generated token (None: none). n: completions sharing one prompt.
    logit_bias: (token id, bias in [-100, 100]) pairs added to the logits before sampling (OpenAI's).
    prompt_logprobs: the log-probability of every prompt token after the first, with the top-N (None:
    none; computed in the prefill only for requests that ask). max_tokens 0 (only with prompt_logprobs
    and n 1) scores the prompt and generates nothing.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None and self.n == 1),
             "max_tokens", "must be >= 1 (0 only to score a prompt: with prompt_logprobs and n 1)"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0 or self.top_k == -1, "top_k", "must be >= 0 (0 or -1: disabled)"),
            (math.isfinite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (math.isfinite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "must be in [-2, 2]"),
            (math.isfinite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "must be in [-2, 2]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.n >= 1, "n", "must be >= 1"),
            (all(math.isfinite(b) and -100 <= b <= 100 for _, b in self.logit_bias), "logit_bias",
             "values must be in [-100, 100]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "must be in [0, 20]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class EngineRequest:
    """One generation request as the engine sees it.

    chains: the chain count to run at. min_chains: the engine may shrink the request down to this
    many chains under memory pressure (== chains: never shrunk; the server sets it from whether the
    client pinned a chain count). priority: higher is admitted first and preempted last.
    chain_schedule: ((generated-token index, chains), ...), starting at (0, chains), indices strictly
    increasing: the chain count of each generated token (None: `chains` throughout). speculative: use
    self-speculative decoding (None: the engine's default; True needs an engine that has it enabled).
    grammar: a CompiledGrammar (engine/grammar.py) the output must match (structured outputs), compiled
    by the caller off the engine thread; None: free text. cache_salt: requests share cached prefixes
    only with requests of the same salt (None: the common one), so tenants who must not (timing side
    channels) do not.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    chains: int
    min_chains: int | None = None
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    chain_schedule: tuple[tuple[int, int], ...] | None = None
    speculative: bool | None = None
    grammar: "CompiledGrammar | None" = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.min_chains is None:
            self.min_chains = self.chains


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (token_id, token text, logprob) of the top-N
    rank: int | None = None  # the token's rank in the distribution (1: most likely); prompt tokens only


@dataclass(frozen=True)
class RequestOutput:
    """One streamed update of one completion (index in 0..n-1) of a request.

    text: the new text since the previous update (already cut at a stop string, never ending in a
    partial UTF-8 character); token_ids: the new tokens. finish_reason is set on the completion's last
    update. chains: the chain count the latest token was computed at (it may drop under pressure).
    """

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    chains: int
    prompt_tokens: int
    completion_tokens: int  # so far, for this completion
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    queue_time: float | None = None  # seconds waiting before the first scheduled step
    first_token_time: float | None = None  # seconds from arrival to first token
    error: str | None = None  # set with finish_reason "error"
    # With SamplingParams.prompt_logprobs, on each completion's first update: one entry per prompt
    # token, the first None (nothing predicts it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for routing, metrics and /ready.

    step_time_per_chains[k]: moving average of the wall time of a decode step whose largest chain
    count is k, at the current load (seconds); prefill_time_per_token[k]: seconds per prompt token.
    kv_usage[p]: used / total blocks of pool p (free blocks holding a cached prefix count as free).
    """

    running: int
    waiting: int
    kv_usage: tuple[float, ...]
    kv_blocks_total: tuple[int, ...]
    kv_blocks_free: tuple[int, ...]
    step_time_per_chains: dict[int, float]
    prefill_time_per_token: dict[int, float]
    preemptions_total: int
    shrinks_total: int
    steps_total: int
    alive: bool
    # Self-speculative decoding: draft tokens proposed / accepted by verification, since start.
    spec_proposed_total: int = 0
    spec_accepted_total: int = 0
    # Chain switches since start by (direction "up" | "down", reason "schedule" | "load"), and the
    # tokens recomputed to raise plain-CoLM sequences to more chains.
    chain_switches: dict[tuple[str, str], int] = field(default_factory=dict)
    recomputed_tokens_total: int = 0
    # Prefix caching, per pool: prompt tokens looked up and tokens found cached (vLLM counts in tokens),
    # and free blocks that hold a cached prefix (counted in kv_blocks_free too: reused or evicted on demand).
    prefix_cache_queries: tuple[int, ...] = ()
    prefix_cache_hits: tuple[int, ...] = ()
    kv_blocks_cached_free: tuple[int, ...] = ()
    # Steps whose batched work raised (each failed its requests), and whether the engine is still
    # healthy: False for good after EngineConfig.max_step_failures such steps in a row (/health: 503).
    step_failures_total: int = 0
    healthy: bool = True


class EngineClient(ABC):
    """What the HTTP server needs from an engine. The engine's AsyncEngine implements it.

    generate() yields the RequestOutput updates of every completion (index 0..n-1) of one request,
    in order, ending once all are finished. Closing or cancelling the iterator before that (the client
    went away) aborts the request, freeing its KV blocks at the next step. It raises RequestTooLong,
    EngineOverloaded or EngineStopped before yielding anything when the request cannot be admitted.
    """

    config: "ModelConfig"
    tokenizer: "Tokenizer"
    model_name: str

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting, let running requests finish for up to drain_timeout seconds, abort the rest."""
