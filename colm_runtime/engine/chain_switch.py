"""What moves chain counts between tokens: chain schedules, the load policy and memory relief.

Going down is free for both variants: lower chains never read upper chains, so the KV already in
pools 0..pools_for(k')-1 is exactly the k'-chain model's; plain CoLM releases the upper pools' blocks.
Going up: CoLM-Air needs nothing (every chain attends the KV computed from chain 1, which does not
depend on the chain count); plain CoLM must compute the missing chains' KV for the tokens so far,
and chain j's KV needs the hidden states of chains < j, so the sequence recomputes its tokens at the
new chain count (as a chunked prefill; BlockManager.resize; counted in recomputed_tokens_total).

Each controller writes its wish into the sequence's ChainState (chain_state.py), which decides the
target; ChainSwitcher.apply moves blocks to it. A request's chain schedule (EngineRequest.chain_schedule,
by generated-token index) is read from the ChainState. The load policy (EngineConfig.step_time_target)
reads the engine's one decode step-time average (StepMetrics): when it exceeds the target, the
lowest-priority unpinned sequence (min_chains < chains, no schedule) gets a load cap one chain lower;
when it falls below LOW_WATER * target, the highest-priority capped sequence gets one chain back. One
load change per COOLDOWN_STEPS, so the average reflects it. MemoryRelief caps a sequence when blocks
run short (the scheduler calls it); that cap is never lifted.
"""

from __future__ import annotations

from collections import Counter

from colm_runtime.engine.block_manager import BlockManager
from colm_runtime.engine.sequence import Sequence

COOLDOWN_STEPS = 8
LOW_WATER = 0.6


class ChainSwitcher:
    """Applies each sequence's target chain count before a step; the load policy; counts switches."""

    def __init__(self, blocks: BlockManager, step_time_target: float | None = None):
        self.blocks = blocks
        self.target = step_time_target
        self.switches: Counter[tuple[str, str]] = Counter()  # (direction, reason) -> count
        self.recomputed_tokens_total = 0
        self._cooldown = 0

    def apply(self, seqs: list[Sequence]) -> None:
        """Move every sequence to its target chain count (schedule, capped by load and memory)."""
        for seq in seqs:
            want = seq.chain_state.target(seq.num_generated)
            if want != seq.num_chains:
                self.switch(seq, want, seq.chain_state.reason)

    @staticmethod
    def next_switch(seq: Sequence) -> int | None:
        """Generated-token index of seq's next scheduled change (None: none)."""
        return seq.chain_state.next_switch(seq.num_generated)

    def switch(self, seq: Sequence, num_chains: int, reason: str) -> bool:
        """Run seq at `num_chains` from its next token; False (no change) if going up lacks blocks."""
        up = num_chains > seq.num_chains
        recompute = self.blocks.resize(seq, num_chains)
        if recompute is None:
            return False  # retried next step
        self.recomputed_tokens_total += recompute
        self.switches["up" if up else "down", reason] += 1
        return True

    def balance(self, running: list[Sequence], step_time: float | None) -> None:
        """One load change when the decode step time (StepMetrics.decode_step_time) is off target.
        running: priority order. Called once per step."""
        self._cooldown = max(0, self._cooldown - 1)
        if self.target is None or step_time is None or self._cooldown:
            return
        if step_time > self.target:
            cands = [s for s in running if s.chain_state.load_elastic(s.num_chains)]
            if cands:
                seq = cands[-1]  # lowest priority, latest arrival
                seq.chain_state.lower_load(seq.num_chains)
                self._cooldown = COOLDOWN_STEPS
        elif step_time < LOW_WATER * self.target:
            cands = [s for s in running if s.chain_state.load_capped]
            if cands:
                cands[0].chain_state.raise_load()
                self._cooldown = COOLDOWN_STEPS


class MemoryRelief:
    """Frees blocks for a sequence that needs them by shrinking another (the scheduler preempts when
    this cannot help)."""

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks

    def shrink_one(self, short: list[int], candidates: list[Sequence]) -> Sequence | None:
        """Shrink the lowest-priority candidate whose shrinking frees a short pool; None if none can."""
        cfg = self.blocks.cfg
        low = [p for p, s in enumerate(short) if s > 0]
        if not low or low[0] == 0:
            return None  # pool 0 is held by every sequence: shrinking never frees it
        for seq in reversed(candidates):
            lo, hi = cfg.pools_for(seq.min_chains), cfg.pools_for(seq.num_chains)
            targets = [p for p in low if lo <= p < hi and seq.block_tables[p]]
            if targets:
                # The fewest chains dropped that free every short pool this sequence holds.
                c = max(c for c in range(seq.min_chains, seq.num_chains) if cfg.pools_for(c) <= min(targets))
                seq.chain_state.cap_memory(c)
                self.blocks.resize(seq, c)
                return seq
        return None
