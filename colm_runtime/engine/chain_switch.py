"""Seamless chain switching: a sequence's chain count changes between tokens.

Going down is free for both variants: lower chains never read upper chains, so the KV already in
pools 0..pools_for(k')-1 is exactly the k'-chain model's; plain CoLM releases the upper pools' blocks.
Going up: CoLM-Air needs nothing (every chain attends the KV computed from chain 1, which does not
depend on the chain count); plain CoLM must compute the missing chains' KV for the tokens so far,
and chain j's KV needs the hidden states of chains < j, so the sequence recomputes its tokens at the
new chain count (as a chunked prefill; BlockManager.grow; counted in recomputed_tokens_total).

Two things move chains: a request's chain schedule (EngineRequest.chain_schedule, by generated-token
index), and the load policy (EngineConfig.step_time_target): when the moving average of the decode
step time exceeds the target, the lowest-priority unpinned sequence (min_chains < chains, no schedule)
steps down one chain; when it falls below LOW_WATER * target, the highest-priority sequence the policy
stepped down steps back up one chain. One load switch per COOLDOWN_STEPS, so the average reflects it.
"""

from __future__ import annotations

import bisect
from collections import Counter

from colm_runtime.engine.block_manager import BlockManager
from colm_runtime.engine.sequence import Sequence

COOLDOWN_STEPS = 8
LOW_WATER = 0.6
STEP_EMA = 0.2


def schedule_at(schedule: tuple[tuple[int, int], ...], generated: int) -> tuple[int, int | None]:
    """(chain count for generated-token index `generated`, index of the next change or None)."""
    starts = [s for s, _ in schedule]
    i = bisect.bisect_right(starts, generated) - 1
    return schedule[i][1], (starts[i + 1] if i + 1 < len(starts) else None)


class ChainSwitcher:
    """Applies chain schedules and the load policy before each step; counts switches."""

    def __init__(self, blocks: BlockManager, step_time_target: float | None = None):
        self.blocks = blocks
        self.target = step_time_target
        self.switches: Counter[tuple[str, str]] = Counter()  # (direction, reason) -> count
        self.recomputed_tokens_total = 0
        self.step_ema: float | None = None
        self._cooldown = 0

    # ---- per step -------------------------------------------------------------------------------------
    def apply(self, seqs: list[Sequence]) -> None:
        """Move every sequence to its target chain count (schedule, capped by load and memory)."""
        for seq in seqs:
            want = self.target_chains(seq)
            if want != seq.chains:
                self.switch(seq, want, "schedule" if seq.schedule else "load")

    def target_chains(self, seq: Sequence) -> int:
        base = seq.request.req.chains
        if seq.schedule:
            base = schedule_at(seq.schedule, len(seq.token_ids) - seq.num_prompt_tokens)[0]
        for cap in (seq.load_cap, seq.mem_cap):
            if cap is not None:
                base = min(base, cap)
        return base

    def next_switch(self, seq: Sequence) -> int | None:
        """Generated-token index of seq's next scheduled change (None: none)."""
        if not seq.schedule:
            return None
        return schedule_at(seq.schedule, len(seq.token_ids) - seq.num_prompt_tokens)[1]

    def switch(self, seq: Sequence, chains: int, reason: str) -> bool:
        """Run seq at `chains` from its next token; False (no change) if going up lacks blocks."""
        if chains < seq.chains:
            self.blocks.drop_pools(seq, chains)
            self.switches["down", reason] += 1
            return True
        recompute = self.blocks.grow(seq, chains)
        if recompute is None:
            return False  # retried next step
        self.recomputed_tokens_total += recompute
        self.switches["up", reason] += 1
        return True

    # ---- load policy ------------------------------------------------------------------------------
    def observe(self, seconds: float, decode_only: bool) -> None:
        """Feed one step's wall time (decode-only steps: prefill chunks would swamp the signal)."""
        if decode_only:
            self.step_ema = seconds if self.step_ema is None else self.step_ema + STEP_EMA * (seconds - self.step_ema)
        self._cooldown = max(0, self._cooldown - 1)

    def balance(self, running: list[Sequence]) -> None:
        """One load step down or up when the step time is off target (running: priority order)."""
        if self.target is None or self.step_ema is None or self._cooldown:
            return
        if self.step_ema > self.target:
            cands = [s for s in running if not s.schedule and s.chains > s.min_chains]
            if cands:
                seq = cands[-1]  # lowest priority, latest arrival
                seq.load_cap = seq.chains - 1
                self._cooldown = COOLDOWN_STEPS
        elif self.step_ema < LOW_WATER * self.target:
            cands = [s for s in running if s.load_cap is not None]
            if cands:
                seq = cands[0]
                seq.load_cap = None if seq.load_cap + 1 >= seq.request.req.chains else seq.load_cap + 1
                self._cooldown = COOLDOWN_STEPS
