"""Automatic prefix caching, chain-aware: full KV blocks found again by the tokens they hold.

A full block is named by a hash chained over the blocks before it: h_i = H(h_{i-1}, tokens of block
i), with h_{-1} = H(cache_salt), so a block's name says the whole prefix up to its end. What else
decides a block's K/V is fixed per engine (the weights, the dtype) or per pool: in plain CoLM pool j
holds chain j's K/V, which depends on chains 1..j only, never on how many chains the request that
computed it ran at; CoLM-Air's one pool holds chain 1's K/V, the same at every chain count. So the
same name is looked up in every pool a request uses: a request at k chains reuses pools 1..k of a
prefix cached at any chain count, and only what is missing is computed (engine/block_manager.py).

Each pool keeps its own index (`CachedBlocks`): name -> block, and the unreferenced cached blocks in
least-recently-used order. They count as free: an allocation takes never-cached free blocks first,
then evicts the least recently used cached one, so the cache only ever holds memory nobody needs and
evicting always comes before preempting anyone. Only full blocks whose every position is computed
are named (a partial last block, or positions holding rolled-back draft tokens, never are).

The name is a cryptographic hash (blake2b, 128 bits) rather than Python's hash(): an int tuple's
hash is not randomised, and a crafted collision would let one client read another's K/V.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

BlockHash = bytes


def root_hash(salt: str | None) -> BlockHash:
    """The parent of a sequence's first block: requests with different salts share nothing."""
    return _hash(b"colm-prefix" + (salt or "").encode())


def hash_block(parent: BlockHash, tokens: list[int]) -> BlockHash:
    """The name of a full block holding `tokens` after the prefix named `parent`."""
    return _hash(parent + _token_bytes(tokens))


def _token_bytes(tokens: list[int]) -> bytes:
    return array("q", tokens).tobytes()  # 8 bytes a token


def _hash(data: bytes) -> BlockHash:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class SeqPrefix:
    """A sequence's prefix-cache state.

    hashes[i]: the name of its block i (full blocks of its tokens, extended as tokens come).
    named[p]: leading blocks of its pool-p table already offered to the cache (registration resumes
      there). kv_valid[p]: positions [0, kv_valid[p]) of pool p hold K/V from a cache hit, possibly
      beyond num_computed_tokens when the hit reached further in this pool than in another; the
      runner does not write them again (their writes go to the cache's sink block).
    """

    root: BlockHash
    hashes: list[BlockHash] = field(default_factory=list)
    named: list[int] = field(default_factory=list)
    kv_valid: list[int] = field(default_factory=list)

    def extend(self, token_ids: list[int], block_size: int) -> list[BlockHash]:
        """The names of every full block of token_ids (token_ids only grow, so earlier names stay)."""
        done, full = len(self.hashes), len(token_ids) // block_size
        if full > done:  # one conversion for all new blocks: a 1,024-token prompt names 64 blocks at once
            data, step = _token_bytes(token_ids[done * block_size : full * block_size]), 8 * block_size
            parent = self.hashes[-1] if self.hashes else self.root
            for i in range(full - done):
                parent = _hash(parent + data[i * step : (i + 1) * step])
                self.hashes.append(parent)
        return self.hashes

    def forget(self, pools: range | list[int]) -> None:
        """The tables of these pools were emptied or replaced: nothing there is known any more."""
        for p in pools:
            self.named[p] = 0
            self.kv_valid[p] = 0


class CachedBlocks:
    """One pool's cache index: name -> block for named blocks, and the named blocks nobody references
    (idle), least recently used first. Reference counts live in the pool (BlockPool)."""

    def __init__(self) -> None:
        self.by_hash: dict[BlockHash, int] = {}
        self.hash_of: dict[int, BlockHash] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.hash_of)

    def lookup(self, h: BlockHash) -> int | None:
        return self.by_hash.get(h)

    def name(self, block: int, h: BlockHash) -> None:
        """Name a full, computed, referenced block. A name already held by another block stays with that
        one (two sequences computed the same prefix at once): this block simply stays unnamed."""
        if block not in self.hash_of and h not in self.by_hash:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def named(self, block: int) -> bool:
        return block in self.hash_of

    def park(self, block: int) -> None:
        """A named block lost its last reference: keep it, most recently used."""
        self.idle[block] = None

    def revive(self, block: int) -> None:
        """A hit on an idle block: it is referenced again."""
        del self.idle[block]

    def evict(self) -> int:
        """Forget the least recently used idle block and return it for reuse."""
        block, _ = self.idle.popitem(last=False)
        del self.by_hash[self.hash_of.pop(block)]
        return block

    def evict_all(self) -> list[int]:
        """Empty the cache of idle blocks (referenced named blocks keep their names)."""
        return [self.evict() for _ in range(len(self.idle))]


@dataclass
class PrefixHit:
    """What a fresh sequence finds cached: blocks[p] the hit blocks of each pool it uses (leading
    blocks of its table), start the tokens it need not compute (the shortest hit over its pools)."""

    blocks: list[list[int]]
    start: int

    @property
    def empty(self) -> bool:
        return not any(self.blocks)


@dataclass
class PrefixCacheStats:
    """Tokens looked up and tokens found, per pool, since start (vLLM counts prefix caching in tokens)."""

    queries: list[int]
    hits: list[int]

    def record(self, num_tokens: int, hit: PrefixHit, block_size: int) -> None:
        for p, blocks in enumerate(hit.blocks):
            self.queries[p] += num_tokens
            self.hits[p] += len(blocks) * block_size
