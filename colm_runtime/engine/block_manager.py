"""Who owns which KV block: one free list per pool, refcounts for blocks shared by forked sequences
and by sequences that found a cached prefix (prefix_cache.py: find_prefix, cache_computed).

A sequence at k chains holds blocks in pools 0..cfg.pools_for(k)-1 only. Resizing it to fewer chains
frees its upper pools' blocks (exact: lower chains never read upper chains' K/V). The block manager
moves blocks only: which chain count a sequence should run at is its ChainState's business. Blocks of a prompt
are shared by the n completions forked from it; a shared block that a sequence is about to write into
(the prompt's partial last block) is copied first (copy-on-write), so shared blocks are never written.
Shortage is an expected outcome: allocate_slots returns None and the scheduler relieves pressure.
Cached blocks nobody references count as free: taking a block evicts one before anything is short.
"""

from __future__ import annotations

from collections import deque

from colm_runtime.config import ModelConfig
from colm_runtime.engine.prefix_cache import CachedBlocks, PrefixCacheStats, PrefixHit
from colm_runtime.engine.sequence import Sequence
from colm_runtime.engine.step_types import BlockCopy


class BlockPool:
    """The blocks of one pool: a free list, a refcount per block, and the pool's prefix-cache index.

    Free blocks are the never-named ones (`free`) and the named ones nobody references (`cached.idle`,
    kept for reuse); take() uses the former first and evicts the latter least recently used first."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.cached = CachedBlocks()

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached.idle)

    def take(self, n: int) -> list[int]:
        assert n <= self.num_free, "caller checks the free count first"
        out = [self.free.popleft() if self.free else self.cached.evict() for _ in range(n)]
        for b in out:
            self.ref[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        """Another reference to each block: a fork's, or a prefix-cache hit's (which may revive an idle one)."""
        for b in blocks:
            if self.ref[b] == 0:
                self.cached.revive(b)
            self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref[b] > 0, "double free"
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.cached.named(b):
                    self.cached.park(b)
                else:
                    self.free.append(b)

    def evict_all(self) -> None:
        """Empty this pool's prefix cache: every unreferenced block becomes plain free."""
        self.free.extend(self.cached.evict_all())


class BlockManager:
    """Allocation of every pool's blocks to sequences."""

    def __init__(self, cfg: ModelConfig, num_blocks: tuple[int, ...], block_size: int, caching: bool = True):
        assert len(num_blocks) == cfg.n_kv_pools
        self.cfg, self.block_size = cfg, block_size
        self.pools = [BlockPool(n) for n in num_blocks]
        self.caching = caching  # automatic prefix caching (prefix_cache.py)
        self.cache_stats = PrefixCacheStats([0] * len(num_blocks), [0] * len(num_blocks))

    # ---- queries -------------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int, hit: PrefixHit | None = None) -> list[int]:
        """Free blocks per pool (all pools listed) seq takes to compute num_tokens more tokens (after
        the prefix `hit`, when given: its idle blocks leave the free count too)."""
        if hit is not None:
            nb = self.blocks_for_tokens(hit.start + num_tokens)
            need = [0] * len(self.pools)
            for p, found in enumerate(hit.blocks):
                need[p] = max(0, nb - len(found)) + sum(self.pools[p].ref[b] == 0 for b in found)
            return need
        start = seq.num_computed_tokens
        nb = -(-(start + num_tokens) // self.block_size)
        need = [0] * len(self.pools)
        for p in range(self.cfg.pools_for(seq.num_chains)):
            table = seq.block_tables[p]
            need[p] = max(0, nb - len(table))
            if num_tokens and self._shared_tail(p, table, max(start, seq.prefix.kv_valid[p])):
                need[p] += 1  # copy-on-write of the shared partial block
        return need

    def _shared_tail(self, p: int, table: list[int], start: int) -> bool:
        return bool(table) and start < len(table) * self.block_size and self.pools[p].ref[table[-1]] > 1

    def shortage(self, seq: Sequence, num_tokens: int, hit: PrefixHit | None = None) -> list[int]:
        """Per pool, how many blocks are missing (0 where enough are free)."""
        need = self.blocks_needed(seq, num_tokens, hit)
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
    def allocate_slots(self, seq: Sequence, num_tokens: int, hit: PrefixHit | None = None) -> list[BlockCopy] | None:
        """Give seq blocks for num_tokens more tokens; None (and no change) on shortage.
        Returns the block copies (copy-on-write) the runner must do before the step.
        hit (find_prefix's, for a sequence holding no blocks): reuse those blocks first, and compute
        num_tokens from hit.start."""
        if hit is not None:
            return self._allocate_after(seq, num_tokens, hit)
        need = self.blocks_needed(seq, num_tokens)
        if not any(need):  # the common decode step: room in the last block, nothing shared
            return []
        if any(n > pool.num_free for n, pool in zip(need, self.pools)):
            return None
        copies: list[BlockCopy] = []
        start = seq.num_computed_tokens
        for p in range(self.cfg.pools_for(seq.num_chains)):
            pool, table = self.pools[p], seq.block_tables[p]
            if num_tokens and self._shared_tail(p, table, max(start, seq.prefix.kv_valid[p])):
                (fresh,) = pool.take(1)
                copies.append((p, table[-1], fresh))
                pool.release([table[-1]])
                table[-1] = fresh
                need[p] -= 1
            table.extend(pool.take(need[p]))
        return copies

    def free(self, seq: Sequence) -> None:
        """Release every block of seq (shared blocks stay with their other owners; its full computed
        blocks stay cached until their memory is needed)."""
        self.cache_computed(seq)
        for p, table in enumerate(seq.block_tables):
            self.pools[p].release(table)
            table.clear()
        seq.prefix.forget(range(len(self.pools)))

    # ---- prefix caching (prefix_cache.py) -----------------------------------------------------------
    def find_prefix(self, seq: Sequence) -> PrefixHit | None:
        """The cached blocks a sequence holding none can start from, pool by pool (a lookup only: no
        change). None when caching is off or the request asks for prompt logprobs (those need the
        logits of every prompt position, so it computes its whole prompt). The last token is never
        taken from the cache: its logits are what the step samples from."""
        if not self.caching or seq.params.prompt_logprobs is not None or any(seq.block_tables):
            return None
        hashes = seq.prefix.extend(seq.token_ids, self.block_size)[: (seq.num_tokens - 1) // self.block_size]
        found = []
        for p in range(self.cfg.pools_for(seq.num_chains)):
            blocks = []
            for h in hashes:
                b = self.pools[p].cached.lookup(h)
                if b is None:
                    break
                blocks.append(b)
            found.append(blocks)
        return PrefixHit(found, min(map(len, found)) * self.block_size)

    def _allocate_after(self, seq: Sequence, num_tokens: int, hit: PrefixHit) -> list[BlockCopy] | None:
        """allocate_slots for a fresh sequence after a lookup: take references on the hit blocks (pool p
        is valid up to its own hit, which may pass hit.start: the runner does not rewrite it there),
        then fresh blocks up to hit.start + num_tokens. Counts the lookup in cache_stats."""
        assert not any(seq.block_tables)
        need = self.blocks_needed(seq, num_tokens, hit)
        if any(n > pool.num_free for n, pool in zip(need, self.pools)):
            return None
        nb = self.blocks_for_tokens(hit.start + num_tokens)
        for p, found in enumerate(hit.blocks):
            self.pools[p].share(found)
            seq.block_tables[p] = found + self.pools[p].take(max(0, nb - len(found)))
            seq.prefix.named[p] = len(found)
            seq.prefix.kv_valid[p] = len(found) * self.block_size
        seq.num_computed_tokens = hit.start
        self.cache_stats.record(seq.num_tokens, hit, self.block_size)
        return []

    def cache_computed(self, seq: Sequence) -> None:
        """Name seq's full computed blocks in every pool it holds, so later sequences find them."""
        # A verify computes its accepted drafts before they are appended; a stop among them leaves
        # num_computed_tokens past the tokens kept.
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if not self.caching or not full:
            return
        hashes = None
        for p in range(self.cfg.pools_for(seq.num_chains)):
            table, done = seq.block_tables[p], seq.prefix.named[p]
            upto = min(full, len(table))
            if done < upto:
                hashes = hashes or seq.prefix.extend(seq.token_ids, self.block_size)
                for i in range(done, upto):
                    self.pools[p].cached.name(table[i], hashes[i])
                seq.prefix.named[p] = upto

    def evict_all(self) -> None:
        """Empty the prefix cache: every unreferenced block is plain free again."""
        for pool in self.pools:
            pool.evict_all()

    def num_cached_free(self) -> tuple[int, ...]:
        """Per pool, blocks nobody references that hold a cached prefix (free, reusable by a hit)."""
        return tuple(len(p.cached.idle) for p in self.pools)

    def resize(self, seq: Sequence, num_chains: int) -> int | None:
        """Move seq's blocks to `num_chains` chains. Returns the tokens it must recompute: 0 going down (its
        upper pools' blocks are released: lower chains never read them) and going up when its pools
        already hold every chain's KV (CoLM-Air, or nothing computed yet); None (no change) when going
        up lacks blocks.

        Plain CoLM going up: the new pools' K/V needs the lower chains' hidden states, so the sequence
        recomputes all its tokens (num_computed_tokens = 0) at the new chain count. Its lower pools keep
        their blocks and K/V (shared and cached blocks included): the recompute writes the new pools
        only (prefix.kv_valid: the rows' lower-pool writes go to the cache's sink block)."""
        assert 1 <= num_chains <= self.cfg.n_chains
        lo, hi = self.cfg.pools_for(seq.num_chains), self.cfg.pools_for(num_chains)
        done = seq.num_computed_tokens
        if num_chains <= seq.num_chains or lo == hi or done == 0:
            for p in range(self.cfg.pools_for(num_chains), self.cfg.pools_for(seq.num_chains)):
                self.pools[p].release(seq.block_tables[p])
                seq.block_tables[p].clear()
            seq.prefix.forget(range(self.cfg.pools_for(num_chains), self.cfg.pools_for(seq.num_chains)))
            seq.num_chains = num_chains
            return 0
        if any(self.pools[p].num_free < self.blocks_for_tokens(seq.num_tokens) for p in range(lo, hi)):
            return None
        for p in range(lo):
            seq.prefix.kv_valid[p] = max(seq.prefix.kv_valid[p], done)
        seq.prefix.forget(range(lo, hi))
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
        child.prefix.hashes, child.prefix.named = list(parent.prefix.hashes), list(parent.prefix.named)
        child.num_chains = parent.num_chains
