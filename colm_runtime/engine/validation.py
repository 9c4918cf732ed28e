"""The checks a request must pass before it may queue: one set, used by the engine (LLMEngine.validate,
for every caller, offline ones included) and by the HTTP server before admission, so that a client
gets one message per mistake, naming the request field (`param`) it concerns.

What needs the engine's live state (a duplicate request id, the whole KV cache, the queue bound)
is checked by the engine alone; check_queue() is the queue bound, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from colm_runtime.config import ModelConfig
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.types import EngineOverloaded, EngineRequest, InvalidRequest, RequestTooLong


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against. max_prompt_tokens: a server's prompt limit (None: none)."""

    n_chains: int
    vocab_size: int
    max_num_seqs: int
    model_len: int
    speculative: bool  # whether speculative decoding is enabled
    max_prompt_tokens: int | None = None

    @classmethod
    def of(cls, cfg: ModelConfig, config: EngineConfig, max_prompt_tokens: int | None = None) -> "RequestLimits":
        """The limits of an engine with this model and configuration."""
        return cls(cfg.n_chains, cfg.vocab_size, config.max_num_seqs, config.model_len(cfg),
                   bool(config.num_speculative_tokens), max_prompt_tokens)


def validate(req: EngineRequest, limits: RequestLimits, prompt_param: str = "prompt") -> None:
    """Raise InvalidRequest / RequestTooLong (with .param) for a request that can never run.

    prompt_param names the prompt's request field in the error (the server's chat endpoint: messages)."""
    n = limits.n_chains
    if not isinstance(req.chains, int) or not 1 <= req.chains <= n:
        raise InvalidRequest(f"chains must be an integer in 1..{n}, got {req.chains!r}", param="chains")
    if not isinstance(req.min_chains, int) or not 1 <= req.min_chains <= req.chains:
        raise InvalidRequest(f"min_chains must be in 1..chains ({req.chains}), got {req.min_chains!r}",
                             param="min_chains")
    if req.params.n > limits.max_num_seqs:
        raise InvalidRequest(f"n must be at most {limits.max_num_seqs} on this server (max_num_seqs), got "
                             f"{req.params.n}", param="n")
    _check_prompt(req.prompt_token_ids, limits, prompt_param)
    _check_length(len(req.prompt_token_ids), req.params.max_tokens, limits, prompt_param)
    if req.chain_schedule is not None:
        _check_schedule(req, n)
    _check_constraints(req, limits.vocab_size)
    if req.speculative and not limits.speculative:
        raise InvalidRequest("speculative decoding is not enabled on this server", param="speculative")


def _check_prompt(ids: list[int], limits: RequestLimits, param: str) -> None:
    if not ids:
        raise InvalidRequest("the prompt is empty", param=param)
    if min(ids) < 0 or max(ids) >= limits.vocab_size:
        raise InvalidRequest(f"prompt token ids must be in 0..{limits.vocab_size - 1}", param=param)


def _check_length(prompt_tokens: int, max_tokens: int, limits: RequestLimits, param: str) -> None:
    """OpenAI's context_length_exceeded message, naming the limit."""
    cap = limits.max_prompt_tokens
    if cap is not None and prompt_tokens > cap:
        raise RequestTooLong(f"The prompt is {prompt_tokens} tokens; this server accepts at most {cap} "
                             f"prompt tokens (max_prompt_tokens).", param=param)
    total, limit = prompt_tokens + max_tokens, limits.model_len
    if total > limit:
        raise RequestTooLong(
            f"This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
            f"({prompt_tokens} in the {param}, {max_tokens} in the completion). Please reduce the length of "
            f"the {param} or max_tokens.", param=param if prompt_tokens >= limit else "max_tokens")


def _check_schedule(req: EngineRequest, n: int) -> None:
    sched = req.chain_schedule
    ok = bool(sched) and all(isinstance(e, tuple) and len(e) == 2 for e in sched)
    if not ok or sched[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(sched, sched[1:])):
        raise InvalidRequest("chain_schedule must be [[0, chains], [generated_tokens, chains], ...] "
                             "with strictly increasing token indices", param="chain_schedule")
    if any(not isinstance(c, int) or not 1 <= c <= n for _, c in sched):
        raise InvalidRequest(f"chain_schedule chain counts must be integers in 1..{n}", param="chain_schedule")
    if sched[0][1] != req.chains or req.min_chains > min(c for _, c in sched):
        raise InvalidRequest("chain_schedule must start at the request's chain count, and min_chains "
                             "may not exceed any scheduled chain count", param="chain_schedule")


def _check_constraints(req: EngineRequest, vocab_size: int) -> None:
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t, _ in req.params.logit_bias):
        raise InvalidRequest(f"logit_bias token ids must be in 0..{vocab_size - 1}", param="logit_bias")
    if req.grammar is not None and req.grammar.vocab_size != vocab_size:
        raise InvalidRequest(f"the grammar was compiled for a vocabulary of {req.grammar.vocab_size} "
                             f"tokens, the model has {vocab_size}")


def check_queue(waiting: int, max_waiting: int) -> None:
    """The waiting-queue bound: EngineOverloaded when `waiting` requests already fill it."""
    if waiting >= max_waiting:
        raise EngineOverloaded(f"{waiting} requests are waiting; retry later")
