"""Prefix cache bookkeeping: block names, idle cached blocks evicted LRU, chain-aware lookups per pool,
and no leak after thousands of random operations at block-manager level (no model)."""

from __future__ import annotations

import random

from colm_runtime.engine.block_manager import BlockPool
from colm_runtime.engine.prefix_cache import SeqPrefix, hash_block, root_hash
from tests.engine._helpers import assert_blocks_free, block_manager, make_seq, prompt


def compute(bm, seq, n: int | None = None) -> None:
    """Allocate and "compute" seq's uncomputed tokens (or n of them), as a step would, and name its blocks."""
    hit = bm.find_prefix(seq) if not any(seq.block_tables) else None
    start = seq.num_computed_tokens if hit is None else hit.start
    n = seq.num_tokens - start if n is None else n
    assert bm.allocate_slots(seq, n, hit) is not None
    seq.num_computed_tokens += n
    bm.cache_computed(seq)


def seq_with(bm, tokens: list[int], chains: int, salt: str | None = None, min_chains: int | None = None):
    s = make_seq(bm.cfg, 1, chains, min_chains=min_chains)
    s.token_ids = list(tokens)
    s.request.req.cache_salt = salt
    s.prefix.root = root_hash(salt)
    return s


def test_a_block_name_says_its_whole_prefix_and_salt():
    r = root_hash(None)
    a = hash_block(r, [1, 2, 3, 4])
    assert a == hash_block(root_hash(None), [1, 2, 3, 4])
    assert a != hash_block(r, [1, 2, 3, 5]) and a != hash_block(root_hash("tenant-b"), [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(r, [9, 2, 3, 4]), [5, 6, 7, 8])
    # A sequence names its blocks incrementally as tokens come, with the same names.
    named = SeqPrefix(r, [], [0], [0])
    tokens = prompt(30)
    named.extend(tokens[:9], 4)
    assert len(named.extend(tokens, 4)) == 7
    chain = [r]
    for i in range(7):
        chain.append(hash_block(chain[-1], tokens[4 * i : 4 * i + 4]))
    assert named.hashes == chain[1:]


def test_idle_cached_blocks_count_as_free_and_are_evicted_least_recently_used_last_resort():
    pool = BlockPool(4)
    a, b, c = pool.take(3)
    for blk, h in ((a, b"a"), (b, b"b")):
        pool.cached.name(blk, h)
    pool.release([b, a, c])  # a is released last: most recently used
    assert pool.num_free == 4 and list(pool.cached.idle) == [b, a]
    first = pool.take(2)
    assert set(first) == {3, c}, "never-named free blocks go first"
    assert pool.take(1) == [b] and pool.cached.lookup(b"b") is None, "then the least recently used"
    pool.share([a])  # a hit revives the other one
    assert pool.ref[a] == 1 and not pool.cached.idle and pool.num_free == 0


def test_a_prefix_cached_at_4_chains_is_reused_at_2_and_the_last_block_is_never_shared():
    bm = block_manager(blocks=(16, 16, 16, 16), block_size=4)
    tokens = prompt(14)
    first = seq_with(bm, tokens, chains=4)
    compute(bm, first)
    bm.free(first)
    assert bm.num_free == (16,) * 4 and bm.num_cached_free() == (3,) * 4  # 3 full blocks; the partial one is not
    again = seq_with(bm, tokens[:12] + [7, 7], chains=2)
    hit = bm.find_prefix(again)
    assert [len(b) for b in hit.blocks] == [3, 3] and hit.start == 12
    exact = seq_with(bm, tokens[:12], chains=2)  # a full-block prompt: its last token is computed anyway
    assert bm.find_prefix(exact).start == 8


def test_a_prefix_cached_at_2_chains_gives_4_chains_its_lower_pools_and_the_rest_is_computed():
    bm = block_manager(blocks=(16, 16, 16, 16), block_size=4)
    tokens = prompt(13)
    low = seq_with(bm, tokens, chains=2)
    compute(bm, low)
    high = seq_with(bm, tokens, chains=4)
    hit = bm.find_prefix(high)
    assert [len(b) for b in hit.blocks] == [3, 3, 0, 0] and hit.start == 0
    assert bm.allocate_slots(high, 13, hit) == []
    assert high.block_tables[0][:3] == low.block_tables[0][:3], "pool 0 shares the cached blocks"
    assert high.prefix.kv_valid == [12, 12, 0, 0] and high.num_computed_tokens == 0
    assert [len(t) for t in high.block_tables] == [4, 4, 4, 4]
    assert bm.pools[0].ref[low.block_tables[0][0]] == 2


def test_salts_do_not_share():
    bm = block_manager(blocks=(16, 16, 16, 16), block_size=4)
    tokens = prompt(9)
    compute(bm, seq_with(bm, tokens, chains=1, salt="a"))
    assert bm.find_prefix(seq_with(bm, tokens, chains=1, salt="b")).empty
    assert not bm.find_prefix(seq_with(bm, tokens, chains=1, salt="a")).empty


def test_allocation_counts_idle_hit_blocks_against_the_free_blocks():
    bm = block_manager(blocks=(4, 4, 4, 4), block_size=4)
    tokens = prompt(9)
    s = seq_with(bm, tokens, chains=1)
    compute(bm, s)
    bm.free(s)  # 2 named idle blocks + 2 free in pool 0
    again = seq_with(bm, tokens + prompt(8, seed=3), chains=1)  # 17 tokens: 5 blocks, 2 of them cached
    hit = bm.find_prefix(again)
    assert hit.start == 8 and bm.blocks_needed(again, 9, hit)[0] == 5
    assert bm.allocate_slots(again, 9, hit) is None and bm.num_cached_free()[0] == 2, "no change on shortage"
    assert bm.allocate_slots(again, 8, hit) == []  # 16 tokens fit


def test_random_operations_with_shared_prefixes_leave_every_block_free_or_cached():
    for kv_sharing in (False, True):
        bm = block_manager(blocks=(24, 18, 12, 6)[: 1 if kv_sharing else 4], block_size=4, kv_sharing=kv_sharing)
        rng = random.Random(7 + kv_sharing)
        stems = [prompt(rng.randint(4, 20), seed=s) for s in range(4)]
        live, hits = [], 0
        for i in range(4000):
            op = rng.random()
            if op < 0.3:
                chains = rng.randint(1, 4)
                s = seq_with(bm, rng.choice(stems) + prompt(rng.randint(0, 9), seed=i), chains,
                             salt=rng.choice([None, None, "t"]), min_chains=rng.randint(1, chains))
                hit = bm.find_prefix(s)
                n = s.num_tokens - hit.start
                if bm.allocate_slots(s, n, hit) is not None:
                    hits += hit.start > 0
                    s.num_computed_tokens += n
                    live.append(s)
            elif live:
                s = rng.choice(live)
                if op < 0.55:  # decode a token
                    s.token_ids.append(rng.randrange(1, 500))
                    if bm.allocate_slots(s, 1) is not None:
                        s.num_computed_tokens += 1
                    else:
                        s.token_ids.pop()
                elif op < 0.65 and s.num_chains > s.min_chains:
                    bm.resize(s, rng.randint(s.min_chains, s.num_chains - 1))  # shrink or step down
                elif op < 0.7 and s.num_chains < 4:
                    if bm.resize(s, s.num_chains + 1) and bm.allocate_slots(s, s.num_tokens) is not None:
                        s.num_computed_tokens = s.num_tokens  # the recompute at more chains
                elif op < 0.8:  # fork (n > 1)
                    child = make_seq(bm.cfg, 1, s.num_chains)
                    child.token_ids = list(s.token_ids)
                    bm.fork(s, child)
                    live.append(child)
                else:  # finish, abort or preempt: all free the blocks
                    live.remove(s)
                    bm.free(s)
                    if op < 0.85:  # a preempted one comes back and recomputes (from the cache)
                        s.num_computed_tokens = 0
                        hit = bm.find_prefix(s)
                        if bm.allocate_slots(s, s.num_tokens - hit.start, hit) is not None:
                            s.num_computed_tokens = s.num_tokens
                            live.append(s)
            for s in live:
                bm.cache_computed(s)
        for s in live:
            bm.free(s)
        assert hits > 10, "shared prefixes were not reused"
        assert_blocks_free(bm)


def test_an_up_switch_keeps_the_lower_pools_blocks_shared_and_recomputes_for_the_new_pools_only():
    bm = block_manager(blocks=(16, 16, 16, 16), block_size=4)
    tokens = prompt(10)
    first = seq_with(bm, tokens, chains=2)
    compute(bm, first)
    second = seq_with(bm, tokens + [5], chains=2)
    compute(bm, second)  # shares first's 2 full blocks in pools 0 and 1
    lower = [list(t) for t in second.block_tables[:2]]
    assert bm.resize(second, 4) == 11 and second.num_computed_tokens == 0
    assert second.block_tables[:2] == lower, "no private copies of the lower pools"
    assert second.prefix.kv_valid == [11, 11, 0, 0]
    assert bm.allocate_slots(second, 11) == [] and [len(t) for t in second.block_tables] == [3, 3, 3, 3]
