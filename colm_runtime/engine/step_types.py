"""The two objects that cross a step's seams: SchedulerOutput (scheduler -> runner, and back into
Scheduler.update_from_output) and RunnerOutput (runner -> scheduler), vLLM v1's names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from colm_runtime.engine.sequence import Sequence

BlockCopy = tuple[int, int, int]  # (pool, src block, dst block)
Logprob = tuple[float, list[int], list[float]] | None  # (chosen, top-N ids, top-N logprobs) or None


@dataclass
class SchedulerOutput:
    """One step's plan.

    scheduled: (sequence, tokens it computes), in the scheduler's order; copies: copy-on-write block
    copies the runner does before any forward; samples: scheduled index -> the sequences that sample a
    token from that entry's last logits row (the sequence itself, or, when an n > 1 prompt completes,
    it and its n - 1 new forks, which update_from_output attaches to the request).
    """

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)
    samples: dict[int, list[Sequence]] = field(default_factory=dict)
    num_preempted: int = 0
    num_shrunk: int = 0
    num_lookahead: int = 0  # speculative tokens among num_tokens (a verify computes 1 + lookahead)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled

    @property
    def decode_only(self) -> bool:
        """Every sequence computes one token (plus its speculative lookahead): no prompt chunk."""
        return self.num_tokens - self.num_lookahead == len(self.scheduled)


@dataclass
class RunnerOutput:
    """What a step's forward produced for the scheduler.

    tokens: seq_id -> the (token, logprob) pairs it gains: one for a plain sample; for a verify
    (scheduled index in `verified`) the accepted drafts plus one. prompt_rows: scheduled index -> the
    [R, V] logits scoring its prompt (prompt logprobs). failed: request id -> (sequence, exception) of
    requests whose own processing raised (their other entries are skipped). draft_seconds /
    draft_steps: the time and forwards of the step's drafts (for the speculative cost model).
    """

    tokens: dict[int, list[tuple[int, Logprob]]] = field(default_factory=dict)
    verified: set[int] = field(default_factory=set)
    prompt_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    failed: dict[str, tuple[Sequence, BaseException]] = field(default_factory=dict)
    draft_seconds: float = 0.0
    draft_steps: int = 0
