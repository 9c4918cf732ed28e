"""Request and sequence state inside the engine.

A Request is one EngineRequest; its Sequences are its completions (n of them). Until its prompt is
computed a request has one sequence; the other n - 1 are forked from it after the prefill, sharing
its prompt blocks, so the prompt is computed once.
"""

from __future__ import annotations

import enum
import itertools

import torch

from colm_runtime.engine.chain_state import ChainState
from colm_runtime.engine.detokenizer import IncrementalDetokenizer
from colm_runtime.engine.prefix_cache import SeqPrefix, root_hash
from colm_runtime.engine.types import EngineRequest, FinishReason, SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion: its tokens, how many are in the KV cache, its chain count and blocks.

    block_tables[p]: the physical blocks of pool p, covering positions 0..len*block_size-1.
    num_computed_tokens: tokens whose K/V is in the cache. After a preemption it drops to 0 and the
    sequence recomputes prompt + output so far (recompute preemption).
    """

    def __init__(self, request: "Request", index: int, token_ids: list[int], n_pools: int,
                 generator: torch.Generator | None, detok: IncrementalDetokenizer):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.token_ids = list(token_ids)
        self.num_computed_tokens = 0
        self.num_chains = request.req.chains
        self.block_tables: list[list[int]] = [[] for _ in range(n_pools)]
        self.status = SequenceStatus.WAITING
        self.generator = generator
        self.detok = detok
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.preempted = 0  # times preempted (recomputed)
        # Who wants which chain count (chain_state.py); self.num_chains is the count its blocks are at.
        self.chain_state = ChainState(request.req.chains, self.min_chains, request.req.chain_schedule)
        # Speculative decoding (speculative.py): whether it may speculate, the tokens it drafts this
        # step (set before scheduling; the scheduler reserves them), its acceptance-rate average.
        self.speculative = False
        self.lookahead = 0
        self.spec_alpha: float | None = None
        # Structured outputs (grammar.py): the grammar state after this sequence's output tokens.
        self.matcher = request.req.grammar.matcher() if request.req.grammar is not None else None
        # Prefix caching (prefix_cache.py): its blocks' names, what it offered the cache, what a hit gave.
        self.prefix = SeqPrefix(root_hash(request.req.cache_salt), [], [0] * n_pools, [0] * n_pools)

    # ---- views ------------------------------------------------------------------------------------
    @property
    def params(self) -> SamplingParams:
        return self.request.req.params

    @property
    def priority(self) -> int:
        return self.request.req.priority

    @property
    def min_chains(self) -> int:
        return self.request.req.min_chains  # type: ignore[return-value]

    @property
    def shrunk(self) -> bool:
        """Ever run at fewer chains than requested because blocks ran short."""
        return self.chain_state.shrunk

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token: int, eos_token_ids, model_len: int) -> None:
        """Append a sampled token and set finish_reason when it ends the completion. A stop token (or
        EOS) ends it without adding its text (OpenAI / vLLM)."""
        if self.matcher is not None:
            self.matcher.consume(token)
        self.token_ids.append(token)
        p = self.params
        if token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif token in eos_token_ids and not p.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.detok.add(token)
            if self.detok.stopped_by is not None:
                self.finish_reason, self.stop_reason = "stop", self.detok.stopped_by
            elif self.num_generated >= p.max_tokens or self.num_tokens >= model_len:
                self.finish_reason = "length"

    def sort_key(self) -> tuple:
        """Scheduling order: higher priority first, then earlier arrival, then completion index."""
        return (-self.priority, self.request.req.arrival_time, self.request.seq_no, self.index)

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, chains={self.num_chains}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens}, {self.status.value})")


class Request:
    """Engine-side state of one EngineRequest: its sequences and its timing."""

    _counter = itertools.count()

    def __init__(self, req: EngineRequest):
        self.req = req
        self.seq_no = next(self._counter)  # breaks arrival-time ties in submission order
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.seqs: list[Sequence] = []
        self.forked = req.params.n == 1
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.fault_marked = False  # the test-only fault hook fires on it (faults.py)
        # Prompt logprobs (prompt_logprobs.py): one entry per prompt position scored so far, [None] for
        # position 0; None when the request did not ask.
        self.prompt_scored: list | None = None if req.params.prompt_logprobs is None else [None]
        self.prompt_out: tuple | None = None  # the same as TokenLogprobs, once complete (output.py)

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def finished(self) -> bool:
        return self.forked and all(s.is_finished for s in self.seqs)
