"""The scheduler: each step, how many tokens each sequence computes (vLLM v1 style, no phases).

Running sequences go first (decodes, then prompt chunks), in priority order, each asking for all its
uncomputed tokens (1 for a decode, a chunk for a prompt) within the step's token budget; then waiting
sequences are admitted in priority order while blocks, budget and max_num_seqs allow (shrinking, then
preempting, running sequences of strictly lower priority when the head does not fit), their prompts
chunked to the budget left, so a long prompt never stalls the decodes. When a running sequence cannot get its blocks,
MemoryRelief first shrinks running sequences that allow it (freeing their upper pools), then preempts
the lowest-priority ones (they recompute later).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from colm_runtime.engine.block_manager import BlockCopy, BlockManager
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's plan. scheduled: (sequence, tokens it computes); copies: blocks to copy first."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)
    num_preempted: int = 0
    num_shrunk: int = 0
    num_lookahead: int = 0  # speculative tokens among num_tokens (a verify computes 1 + lookahead)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class MemoryRelief:
    """Frees blocks for a sequence that needs them: shrink first, then preempt (lowest priority first)."""

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks

    def shrink_one(self, short: list[int], candidates: list[Sequence]) -> Sequence | None:
        """Shrink the lowest-priority candidate whose shrinking frees a short pool; None if none can."""
        cfg = self.blocks.cfg
        low = [p for p, s in enumerate(short) if s > 0]
        if not low or low[0] == 0:
            return None  # pool 0 is held by every sequence: shrinking never frees it
        for seq in reversed(candidates):
            lo, hi = cfg.pools_for(seq.min_chains), cfg.pools_for(seq.chains)
            targets = [p for p in low if lo <= p < hi and seq.block_tables[p]]
            if targets:
                # The fewest chains dropped that free every short pool this sequence holds.
                c = max(c for c in range(seq.min_chains, seq.chains) if cfg.pools_for(c) <= min(targets))
                self.blocks.shrink(seq, c)
                return seq
        return None


class Scheduler:
    """Owns the waiting and running sequences and the block manager."""

    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.relief = MemoryRelief(blocks)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions_total = 0
        self.shrinks_total = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (it shares the parent's blocks)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=Sequence.sort_key)
        done: set[int] = set()  # seq_ids scheduled this step
        # Decodes first, so that no prompt chunk (even of a higher-priority request) stalls them.
        for decodes in (True, False):
            for seq in list(self.running):
                if budget <= 0:
                    break
                if seq.seq_id in done or seq.status is not SequenceStatus.RUNNING or \
                        (seq.num_uncomputed == 1) != decodes:
                    continue
                # A speculating decode reserves budget and slots for its drafted tokens as well.
                n = min(seq.num_uncomputed + (seq.lookahead if decodes else 0), budget)
                copies = self._allocate(seq, n, out, done)
                if copies is None:  # seq itself was preempted
                    continue
                out.num_lookahead += n - min(n, seq.num_uncomputed)
                out.scheduled.append((seq, n))
                out.copies.extend(copies)
                done.add(seq.seq_id)
                budget -= n
        if not out.num_preempted:
            self._admit(out, budget)
        return out

    def _allocate(self, seq: Sequence, n: int, out: SchedulerOutput, done: set[int]) -> list[BlockCopy] | None:
        """Blocks for a running seq, relieving pressure as needed; None if seq itself got preempted."""
        while True:
            copies = self.blocks.allocate_slots(seq, n)
            if copies is not None:
                return copies
            short = self.blocks.shortage(seq, n)
            if self.relief.shrink_one(short, self.running) is not None:
                out.num_shrunk += 1
                self.shrinks_total += 1
                continue
            # The lowest-priority sequence not scheduled this step (seq itself at worst).
            victim = next(s for s in reversed(self.running) if s.seq_id not in done)
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.preempted += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.preemptions_total += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=Sequence.sort_key)
        seats = sum(map(_seats, self.running))
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            hit = self.blocks.find_prefix(seq)  # cached blocks it can start from (prefix caching)
            n = min(seq.num_tokens - (seq.num_computed_tokens if hit is None else hit.start), budget)
            fits = seats + _seats(seq) <= self.config.max_num_seqs
            copies = self.blocks.allocate_slots(seq, n, hit) if fits else None
            if copies is None:
                lower = [r for r in self.running if r.priority < seq.priority]
                if fits and self.relief.shrink_one(self.blocks.shortage(seq, n, hit), lower) is not None:
                    out.num_shrunk += 1
                    self.shrinks_total += 1
                    continue
                refund = self._evict_for(seq, out)
                if refund is None:
                    break  # strict priority order: nobody overtakes the head of the queue
                budget, seats = budget + refund, sum(map(_seats, self.running))
                continue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            out.copies.extend(copies)
            budget -= n
            seats += _seats(seq)

    def _evict_for(self, seq: Sequence, out: SchedulerOutput) -> int | None:
        """Preempt the lowest-priority running sequence if its priority is below seq's (higher priority
        is preempted last); returns the step tokens it gave back, None if nobody ranks below seq."""
        victim = max(self.running, key=Sequence.sort_key, default=None)  # lowest priority, latest arrival
        if victim is None or victim.priority >= seq.priority:
            return None
        refund = 0
        for i, (s, n) in enumerate(out.scheduled):
            if s is victim:
                refund = n
                out.num_lookahead -= n - min(n, s.num_uncomputed)
                del out.scheduled[i]
                break
        self._preempt(victim)
        out.num_preempted += 1
        return refund


def _seats(seq: Sequence) -> int:
    """Running sequences seq stands for: an n > 1 request not yet forked counts its forks to come."""
    return 1 if seq.request.forked else seq.params.n
