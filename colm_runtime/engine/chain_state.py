"""One sequence's chain state: who wants which chain count, and the count it should run at.

Three things lower a running sequence's chain count: its request's chain schedule, the engine's load
policy (ChainSwitcher.balance, from the decode step time) and memory relief (MemoryRelief, when blocks
run short). Each writes its own wish here; `target` combines them. The block manager only moves blocks
to a count (BlockManager.resize); it holds no policy.
"""

from __future__ import annotations

import bisect

Schedule = tuple[tuple[int, int], ...]  # ((generated-token index, chain count), ...), strictly increasing


def schedule_at(schedule: Schedule, generated: int) -> tuple[int, int | None]:
    """(chain count for generated-token index `generated`, index of the next change or None)."""
    starts = [s for s, _ in schedule]
    i = bisect.bisect_right(starts, generated) - 1
    return schedule[i][1], (starts[i + 1] if i + 1 < len(starts) else None)


class ChainState:
    """requested: the request's chain count; schedule: its chain schedule (None: none); load_cap: the
    load policy's cap (None: none); mem_cap: memory relief's cap (None: never shrunk; never raised)."""

    def __init__(self, requested: int, min_chains: int, schedule: Schedule | None):
        self.requested, self.min_chains, self.schedule = requested, min_chains, schedule
        self.load_cap: int | None = None
        self.mem_cap: int | None = None

    def target(self, generated: int) -> int:
        """The chain count to run at after `generated` output tokens."""
        count = schedule_at(self.schedule, generated)[0] if self.schedule else self.requested
        for cap in (self.load_cap, self.mem_cap):
            if cap is not None:
                count = min(count, cap)
        return count

    def next_switch(self, generated: int) -> int | None:
        """Generated-token index of the schedule's next change (None: none)."""
        return schedule_at(self.schedule, generated)[1] if self.schedule else None

    @property
    def reason(self) -> str:
        """What a switch to `target` is counted as (EngineStats.chain_switches)."""
        return "schedule" if self.schedule else "load"

    # ---- the load policy ------------------------------------------------------------------------------
    def load_elastic(self, current: int) -> bool:
        """Whether the load policy may take a chain from it (no schedule, above min_chains)."""
        return not self.schedule and current > self.min_chains

    @property
    def load_capped(self) -> bool:
        """Whether the load policy holds it below its wish (so it may give a chain back)."""
        return self.load_cap is not None

    def lower_load(self, current: int) -> None:
        self.load_cap = current - 1

    def raise_load(self) -> None:
        """One chain back; the cap goes once it reaches the requested count."""
        assert self.load_cap is not None
        self.load_cap = None if self.load_cap + 1 >= self.requested else self.load_cap + 1

    # ---- memory relief --------------------------------------------------------------------------------
    def cap_memory(self, chains: int) -> None:
        assert self.min_chains <= chains
        self.mem_cap = chains

    @property
    def shrunk(self) -> bool:
        """Ever lowered by memory relief (it then stays down)."""
        return self.mem_cap is not None

    def copy_caps(self, parent: "ChainState") -> None:
        """A fork runs where its parent runs: a shrunk parent's forks stay down."""
        self.load_cap, self.mem_cap = parent.load_cap, parent.mem_cap
