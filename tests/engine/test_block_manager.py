"""Block pool unit tests: per-pool allocation by chain count, shortage, shrink, fork and copy-on-write."""

from __future__ import annotations

from tests.engine._helpers import block_manager, make_seq


def test_a_request_at_k_chains_holds_blocks_in_pools_below_k_only():
    bm = block_manager(blocks=(8, 8, 8, 8), block_size=4)
    seq = make_seq(bm.cfg, n_tokens=10, chains=2)
    assert bm.allocate_slots(seq, 10) == []
    assert [len(t) for t in seq.block_tables] == [3, 3, 0, 0]  # ceil(10 / 4) blocks, pools 0 and 1
    assert bm.num_free == (5, 5, 8, 8)
    bm.free(seq)
    assert bm.num_free == (8, 8, 8, 8) and not any(seq.block_tables)


def test_colm_air_uses_one_shared_pool_at_every_chain_count():
    bm = block_manager(blocks=(8,), kv_sharing=True)
    seqs = [make_seq(bm.cfg, n_tokens=4, chains=k) for k in (1, 4)]
    for s in seqs:
        assert bm.allocate_slots(s, 4) == []
    assert bm.num_free == (6,)


def test_appending_allocates_a_block_only_at_a_block_boundary():
    bm = block_manager(block_size=4)
    seq = make_seq(bm.cfg, n_tokens=4, chains=1)
    bm.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    assert bm.blocks_needed(seq, 1)[0] == 1  # position 4 starts block 2
    bm.allocate_slots(seq, 1)
    seq.num_computed_tokens = 5
    assert bm.blocks_needed(seq, 1) == [0, 0, 0, 0]  # position 5 is in block 2 already


def test_shortage_returns_none_and_changes_nothing():
    bm = block_manager(blocks=(4, 2, 2, 2), block_size=4)
    seq = make_seq(bm.cfg, n_tokens=12, chains=4)
    assert bm.allocate_slots(seq, 12) is None
    assert not any(seq.block_tables) and bm.num_free == (4, 2, 2, 2)
    assert bm.shortage(seq, 12) == [0, 1, 1, 1]


def test_resizing_down_frees_the_upper_pools_only():
    bm = block_manager(blocks=(8, 8, 8, 8), block_size=4)
    seq = make_seq(bm.cfg, n_tokens=8, chains=4, min_chains=1)
    bm.allocate_slots(seq, 8)
    lower = [list(t) for t in seq.block_tables[:2]]
    assert bm.resize(seq, 2) == 0
    assert seq.num_chains == 2 and not seq.shrunk  # the block manager moves blocks, it sets no policy
    assert seq.block_tables[:2] == lower and seq.block_tables[2:] == [[], []]
    assert bm.num_free == (6, 6, 8, 8)


def test_resizing_up_recomputes_on_plain_colm_and_waits_for_blocks():
    bm = block_manager(blocks=(8, 8, 8, 2), block_size=4)
    seq = make_seq(bm.cfg, n_tokens=8, chains=2)
    bm.allocate_slots(seq, 8)
    seq.num_computed_tokens = 8
    assert bm.resize(seq, 3) == 8  # the new chain's KV needs every token again
    assert seq.num_chains == 3 and seq.num_computed_tokens == 0
    bm.allocate_slots(seq, 8)
    seq.num_computed_tokens = 8
    seq.token_ids.extend([1] * 4)  # 12 tokens need 3 blocks of pool 3, which has 2
    assert bm.resize(seq, 4) is None and seq.num_chains == 3 and seq.num_computed_tokens == 8
    air = block_manager(blocks=(8,), block_size=4, kv_sharing=True)
    shared = make_seq(air.cfg, n_tokens=8, chains=1)
    air.allocate_slots(shared, 8)
    shared.num_computed_tokens = 8
    assert air.resize(shared, 4) == 0 and shared.num_computed_tokens == 8  # CoLM-Air: one KV for all


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = block_manager(blocks=(8, 8, 8, 8), block_size=4)
    parent = make_seq(bm.cfg, n_tokens=6, chains=1)
    bm.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = make_seq(bm.cfg, n_tokens=6, chains=1)
    bm.fork(parent, child)
    assert child.block_tables[0] == parent.block_tables[0] and bm.num_free[0] == 6
    full, partial = parent.block_tables[0]
    assert bm.pools[0].ref[full] == 2 and bm.pools[0].ref[partial] == 2
    # The child writes position 6, inside the shared partial block: it gets a private copy.
    copies = bm.allocate_slots(child, 1)
    fresh = child.block_tables[0][1]
    assert copies == [(0, partial, fresh)] and fresh != partial
    assert child.block_tables[0][0] == full and bm.pools[0].ref[partial] == 1
    # The parent is the partial block's only owner now: it writes in place.
    assert bm.allocate_slots(parent, 1) == [] and parent.block_tables[0][1] == partial
    bm.free(parent)
    assert bm.pools[0].ref[full] == 1  # still the child's
    bm.free(child)
    assert bm.num_free == (8, 8, 8, 8) and not any(bm.pools[0].ref)


def test_fits_ever_compares_with_each_used_pool():
    bm = block_manager(blocks=(8, 4, 2, 1), block_size=4)
    assert bm.fits_ever(32, chains=1) and not bm.fits_ever(33, chains=1)
    assert bm.fits_ever(4, chains=4) and not bm.fits_ever(5, chains=4)
    assert bm.fits_ever(8, chains=3)
