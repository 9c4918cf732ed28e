"""Who owns which KV block: one free list per pool, refcounts for blocks shared by forked sequences.

A sequence at k chains holds blocks in pools 0..cfg.pools_for(k)-1 only. Resizing it to fewer chains
frees its upper pools' blocks (exact: lower chains never read upper chains' K/V). The block manager
moves blocks only: which chain count a sequence should run at is its ChainState's business. Blocks of a prompt
are shared by the n completions forked from it; a shared block that a sequence is about to write into
(the prompt's partial last block) is copied first (copy-on-write), so shared blocks are never written.
Shortage is an expected outcome: allocate_slots returns None and the scheduler relieves pressure.
"""

from __future__ import annotations

from collections import deque

from colm_runtime.config import ModelConfig
from colm_runtime.engine.sequence import Sequence
from colm_runtime.engine.step_types import BlockCopy


class BlockPool:
    """The blocks of one pool: a free list and a refcount per block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free), "caller checks the free count first"
        out = [self.free.popleft() for _ in range(n)]
        for b in out:
            self.ref[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref[b] > 0
            self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref[b] > 0, "double free"
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)


class BlockManager:
    """Allocation of every pool's blocks to sequences."""

    def __init__(self, cfg: ModelConfig, num_blocks: tuple[int, ...], block_size: int):
        assert len(num_blocks) == cfg.n_kv_pools
        self.cfg, self.block_size = cfg, block_size
        self.pools = [BlockPool(n) for n in num_blocks]

    # ---- queries -------------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> list[int]:
        """New blocks per pool (all pools listed) for seq to compute num_tokens more tokens."""
        start = seq.num_computed_tokens
        nb = -(-(start + num_tokens) // self.block_size)
        need = [0] * len(self.pools)
        for p in range(self.cfg.pools_for(seq.num_chains)):
            table = seq.block_tables[p]
            need[p] = max(0, nb - len(table))
            if num_tokens and self._shared_tail(p, table, start):
                need[p] += 1  # copy-on-write of the shared partial block
        return need

    def _shared_tail(self, p: int, table: list[int], start: int) -> bool:
        return bool(table) and start < len(table) * self.block_size and self.pools[p].ref[table[-1]] > 1

    def shortage(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Per pool, how many blocks are missing (0 where enough are free)."""
        need = self.blocks_needed(seq, num_tokens)
        return [max(0, n - pool.num_free) for n, pool in zip(need, self.pools)]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def fits_ever(self, num_tokens: int, chains: int) -> bool:
        """Whether one sequence of num_tokens tokens at `chains` fits the empty cache."""
        nb = self.blocks_for_tokens(num_tokens)
        return all(self.pools[p].num_blocks >= nb for p in range(self.cfg.pools_for(chains)))

    @property
    def num_free(self) -> tuple[int, ...]:
        return tuple(p.num_free for p in self.pools)

    @property
    def num_total(self) -> tuple[int, ...]:
        return tuple(p.num_blocks for p in self.pools)

    def usage(self) -> tuple[float, ...]:
        """Used / total blocks of each pool."""
        return tuple(1.0 - p.num_free / p.num_blocks for p in self.pools)

    # ---- changes ------------------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_tokens: int) -> list[BlockCopy] | None:
        """Give seq blocks for num_tokens more tokens; None (and no change) on shortage.
        Returns the block copies (copy-on-write) the runner must do before the step."""
        need = self.blocks_needed(seq, num_tokens)
        if not any(need):  # the common decode step: room in the last block, nothing shared
            return []
        if any(n > pool.num_free for n, pool in zip(need, self.pools)):
            return None
        copies: list[BlockCopy] = []
        start = seq.num_computed_tokens
        for p in range(self.cfg.pools_for(seq.num_chains)):
            pool, table = self.pools[p], seq.block_tables[p]
            if num_tokens and self._shared_tail(p, table, start):
                (fresh,) = pool.take(1)
                copies.append((p, table[-1], fresh))
                pool.release([table[-1]])
                table[-1] = fresh
                need[p] -= 1
            table.extend(pool.take(need[p]))
        return copies

    def free(self, seq: Sequence) -> None:
        """Release every block of seq (shared blocks stay with their other owners)."""
        for p, table in enumerate(seq.block_tables):
            self.pools[p].release(table)
            table.clear()

    def resize(self, seq: Sequence, num_chains: int) -> int | None:
        """Move seq's blocks to `num_chains` chains. Returns the tokens it must recompute: 0 going down (its
        upper pools' blocks are released: lower chains never read them) and going up when its pools
        already hold every chain's KV (CoLM-Air, or nothing computed yet); None (no change) when going
        up lacks blocks.

        Plain CoLM going up: the new pools' KV needs the lower chains' hidden states, so the sequence
        recomputes all its tokens (num_computed_tokens = 0) at the new chain count. Every position is
        rewritten before it is read, so shared lower blocks are swapped for private ones without a copy."""
        assert 1 <= num_chains <= self.cfg.n_chains
        lo, hi = self.cfg.pools_for(seq.num_chains), self.cfg.pools_for(num_chains)
        done = seq.num_computed_tokens
        if num_chains <= seq.num_chains or lo == hi or done == 0:
            for p in range(self.cfg.pools_for(num_chains), self.cfg.pools_for(seq.num_chains)):
                self.pools[p].release(seq.block_tables[p])
                seq.block_tables[p].clear()
            seq.num_chains = num_chains
            return 0
        nb = self.blocks_for_tokens(seq.num_tokens)
        shared = [[i for i, b in enumerate(seq.block_tables[p]) if self.pools[p].ref[b] > 1] for p in range(lo)]
        if any(self.pools[p].num_free < nb for p in range(lo, hi)) or \
                any(self.pools[p].num_free < len(shared[p]) for p in range(lo)):
            return None
        for p in range(lo):
            table = seq.block_tables[p]
            for i in shared[p]:
                self.pools[p].release([table[i]])
                (table[i],) = self.pools[p].take(1)
        seq.num_chains = num_chains
        seq.num_computed_tokens = 0
        return done

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past seq's computed tokens (rejected speculative positions)."""
        keep = self.blocks_for_tokens(seq.num_computed_tokens)
        for p, table in enumerate(seq.block_tables):
            if len(table) > keep:
                self.pools[p].release(table[keep:])
                del table[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (same tokens computed, same chains)."""
        assert not any(child.block_tables)
        for p, table in enumerate(parent.block_tables):
            self.pools[p].share(table)
            child.block_tables[p] = list(table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_chains = parent.num_chains
