"""Scheduler unit tests: token budget, chunked prefill, priorities, shrink-then-preempt, limits."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.scheduler import Scheduler
from colm_runtime.engine.sequence import SequenceStatus
from colm_runtime.engine.types import RequestTooLong
from colm_runtime.model import ChainKVCache
from tests.engine._helpers import block_manager, make_engine, make_seq, prompt, req


def scheduler(blocks=(64, 64, 64, 64), block_size=4, **config):
    bm = block_manager(blocks=blocks, block_size=block_size)
    return Scheduler(EngineConfig(block_size=block_size, **config), bm), bm


def advance(so):
    """What the engine does after a step: count computed tokens, append a sampled token at the end."""
    for seq, n in so.scheduled:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1)


def test_decodes_go_first_and_a_long_prompt_is_chunked_to_the_budget():
    sched, bm = scheduler(max_num_batched_tokens=16)
    decoders = [make_seq(bm.cfg, 3, chains=k) for k in (1, 4)]
    for s in decoders:
        sched.add(s)
    advance(sched.schedule())  # both prompts in one step (6 tokens)
    long = make_seq(bm.cfg, 40, chains=2)
    sched.add(long)
    for n_long in (14, 14, 12):
        so = sched.schedule()
        got = {s.seq_id: n for s, n in so.scheduled}
        assert got[decoders[0].seq_id] == 1 and got[decoders[1].seq_id] == 1  # decodes never stall
        assert got[long.seq_id] == n_long
        advance(so)
    assert long.num_computed_tokens == 40 and long.num_tokens == 41


def test_a_higher_priority_prompt_does_not_stall_running_decodes():
    sched, bm = scheduler(max_num_batched_tokens=8)
    decoders = [make_seq(bm.cfg, 2, chains=2) for _ in range(3)]
    for s in decoders:
        sched.add(s)
    advance(sched.schedule())
    urgent = make_seq(bm.cfg, 30, chains=4, priority=9)
    sched.add(urgent)
    for _ in range(4):
        so = sched.schedule()
        got = {s.seq_id: n for s, n in so.scheduled}
        assert all(got[d.seq_id] == 1 for d in decoders)
        assert got[urgent.seq_id] == 5  # the budget left after the decodes
        advance(so)


def test_higher_priority_is_admitted_first():
    sched, bm = scheduler(max_num_seqs=1)
    low = make_seq(bm.cfg, 4, chains=1, priority=0)
    high = make_seq(bm.cfg, 4, chains=1, priority=5)
    sched.add(low)
    sched.add(high)
    so = sched.schedule()
    assert [s for s, _ in so.scheduled] == [high]
    assert low.status is SequenceStatus.WAITING


def test_max_num_seqs_bounds_the_running_set():
    sched, bm = scheduler(max_num_seqs=3)
    for _ in range(5):
        sched.add(make_seq(bm.cfg, 2, chains=1))
    assert len(sched.schedule().scheduled) == 3 and len(sched.waiting) == 2


def test_pressure_shrinks_a_shrinkable_request_before_preempting_anyone():
    # Pool 3 (the 4th chain's K/V) is the scarce one: room for two 8-token sequences.
    sched, bm = scheduler(blocks=(32, 32, 32, 4), max_num_batched_tokens=64)
    elastic = make_seq(bm.cfg, 8, chains=4, min_chains=2, priority=0)
    pinned = make_seq(bm.cfg, 8, chains=4, priority=1)
    sched.add(elastic)
    sched.add(pinned)
    advance(sched.schedule())
    assert bm.num_free[3] == 0
    so = sched.schedule()  # position 8 needs a 3rd block in every pool the sequences use
    assert {s.seq_id for s, _ in so.scheduled} == {elastic.seq_id, pinned.seq_id}
    assert pinned.chains == 4 and elastic.chains == 3 and elastic.shrunk
    assert elastic.block_tables[3] == [] and len(pinned.block_tables[3]) == 3
    assert sched.shrinks_total == 1 and sched.preemptions_total == 0
    assert so.num_shrunk == 1


def test_pressure_preempts_the_lowest_priority_when_nobody_can_shrink():
    sched, bm = scheduler(blocks=(4, 4, 4, 4), max_num_batched_tokens=64)
    high = make_seq(bm.cfg, 7, chains=2, priority=2)
    low = make_seq(bm.cfg, 7, chains=2, priority=1)
    sched.add(high)
    sched.add(low)
    advance(sched.schedule())  # 2 blocks each: pool 0 is full
    assert bm.num_free[0] == 0
    advance(sched.schedule())  # position 7 fits the 2nd block; both decode
    so = sched.schedule()  # position 8 needs a 3rd block each: the low one goes
    assert [s for s, _ in so.scheduled] == [high]
    assert low.status is SequenceStatus.WAITING and low.num_computed_tokens == 0 and low.preempted == 1
    assert sched.preemptions_total == 1 and sched.shrinks_total == 0


def test_a_higher_priority_arrival_preempts_lower_priority_running_sequences():
    sched, bm = scheduler(blocks=(4, 4, 4, 4), max_num_batched_tokens=64)
    low = [make_seq(bm.cfg, 6, chains=1, priority=p) for p in (0, 1)]  # 2 blocks each: pool 0 full
    for s in low:
        sched.add(s)
    advance(sched.schedule())
    assert bm.num_free[0] == 0
    urgent = make_seq(bm.cfg, 6, chains=1, priority=5)
    equal = make_seq(bm.cfg, 6, chains=1, priority=1)
    sched.add(urgent)
    so = sched.schedule()
    assert urgent.status is SequenceStatus.RUNNING and (urgent, 6) in so.scheduled
    assert low[0].status is SequenceStatus.WAITING and low[0].preempted == 1  # the lowest went
    assert low[1].status is SequenceStatus.RUNNING
    assert all(s is not low[0] for s, _ in so.scheduled)
    advance(so)
    sched.add(equal)  # priority 1 does not outrank the running priority-1 sequence: it waits
    sched.schedule()
    assert equal.status is SequenceStatus.WAITING and low[1].preempted == 0


def test_a_higher_priority_arrival_shrinks_an_elastic_running_sequence_before_preempting():
    sched, bm = scheduler(blocks=(32, 32, 32, 2), max_num_batched_tokens=64)
    elastic = make_seq(bm.cfg, 6, chains=4, min_chains=1, priority=0)
    sched.add(elastic)
    advance(sched.schedule())
    assert bm.num_free[3] == 0
    urgent = make_seq(bm.cfg, 6, chains=4, priority=5)
    sched.add(urgent)
    so = sched.schedule()
    assert urgent.status is SequenceStatus.RUNNING and elastic.status is SequenceStatus.RUNNING
    assert elastic.chains == 3 and so.num_shrunk == 1 and so.num_preempted == 0


def test_a_request_that_can_never_fit_is_rejected():
    eng = make_engine(max_model_len=64)
    with pytest.raises(RequestTooLong):
        eng.add_request(req(prompt(60), max_tokens=8))  # 68 tokens > max_model_len
    per_block = sum(ChainKVCache.block_bytes(eng.cfg, 4, torch.float32))
    small = make_engine(kv_cache_memory=4 * per_block, block_size=4)  # 4 blocks of 4 tokens per pool
    assert small.num_blocks == (4, 4, 4, 4)
    with pytest.raises(RequestTooLong):
        small.add_request(req(prompt(14), max_tokens=4))  # 18 tokens
    small.add_request(req(prompt(12), max_tokens=4))  # 16 tokens fit exactly
    while small.has_unfinished:
        small.step()
