"""Scheduler unit tests: token budget, chunked prefill, priorities, shrink-then-preempt, limits, and
update_from_output (computed tokens, forks, stops), driven without a model through sampled()."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.engine.sequence import SequenceStatus
from colm_runtime.engine.types import RequestTooLong
from colm_runtime.model import ChainKVCache
from tests.engine._helpers import make_engine, make_seq, prompt, req, sampled, scheduler


def run(sched, token: int = 1):
    """One step of the real scheduler, the runner's part played by sampled(): the step's plan."""
    so = sched.schedule()
    sched.update_from_output(so, sampled(so, token))
    return so


def test_decodes_go_first_and_a_long_prompt_is_chunked_to_the_budget():
    sched, bm = scheduler(max_num_batched_tokens=16)
    decoders = [make_seq(bm.cfg, 3, chains=k) for k in (1, 4)]
    for s in decoders:
        sched.add(s)
    run(sched)  # both prompts in one step (6 tokens)
    long = make_seq(bm.cfg, 40, chains=2)
    sched.add(long)
    for n_long in (14, 14, 12):
        so = sched.schedule()
        got = {s.seq_id: n for s, n in so.scheduled}
        assert got[decoders[0].seq_id] == 1 and got[decoders[1].seq_id] == 1  # decodes never stall
        assert got[long.seq_id] == n_long
        sched.update_from_output(so, sampled(so))
    assert long.num_computed_tokens == 40 and long.num_tokens == 41


def test_a_higher_priority_prompt_does_not_stall_running_decodes():
    sched, bm = scheduler(max_num_batched_tokens=8)
    decoders = [make_seq(bm.cfg, 2, chains=2) for _ in range(3)]
    for s in decoders:
        sched.add(s)
    run(sched)
    urgent = make_seq(bm.cfg, 30, chains=4, priority=9)
    sched.add(urgent)
    for _ in range(4):
        so = sched.schedule()
        got = {s.seq_id: n for s, n in so.scheduled}
        assert all(got[d.seq_id] == 1 for d in decoders)
        assert got[urgent.seq_id] == 5  # the budget left after the decodes
        sched.update_from_output(so, sampled(so))


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
    run(sched)
    assert bm.num_free[3] == 0
    so = sched.schedule()  # position 8 needs a 3rd block in every pool the sequences use
    assert {s.seq_id for s, _ in so.scheduled} == {elastic.seq_id, pinned.seq_id}
    assert pinned.num_chains == 4 and elastic.num_chains == 3 and elastic.shrunk
    assert elastic.block_tables[3] == [] and len(pinned.block_tables[3]) == 3
    assert sched.shrinks_total == 1 and sched.preemptions_total == 0
    assert so.num_shrunk == 1


def test_pressure_preempts_the_lowest_priority_when_nobody_can_shrink():
    sched, bm = scheduler(blocks=(4, 4, 4, 4), max_num_batched_tokens=64)
    high = make_seq(bm.cfg, 7, chains=2, priority=2)
    low = make_seq(bm.cfg, 7, chains=2, priority=1)
    sched.add(high)
    sched.add(low)
    run(sched)  # 2 blocks each: pool 0 is full
    assert bm.num_free[0] == 0
    run(sched)  # position 7 fits the 2nd block; both decode
    so = sched.schedule()  # position 8 needs a 3rd block each: the low one goes
    assert [s for s, _ in so.scheduled] == [high]
    assert low.status is SequenceStatus.WAITING and low.num_computed_tokens == 0 and low.preempted == 1
    assert sched.preemptions_total == 1 and sched.shrinks_total == 0


def test_a_higher_priority_arrival_preempts_lower_priority_running_sequences():
    sched, bm = scheduler(blocks=(4, 4, 4, 4), max_num_batched_tokens=64)
    low = [make_seq(bm.cfg, 6, chains=1, priority=p) for p in (0, 1)]  # 2 blocks each: pool 0 full
    for s in low:
        sched.add(s)
    run(sched)
    assert bm.num_free[0] == 0
    urgent = make_seq(bm.cfg, 6, chains=1, priority=5)
    equal = make_seq(bm.cfg, 6, chains=1, priority=1)
    sched.add(urgent)
    so = sched.schedule()
    assert urgent.status is SequenceStatus.RUNNING and (urgent, 6) in so.scheduled
    assert low[0].status is SequenceStatus.WAITING and low[0].preempted == 1  # the lowest went
    assert low[1].status is SequenceStatus.RUNNING
    assert all(s is not low[0] for s, _ in so.scheduled)
    sched.update_from_output(so, sampled(so))
    sched.add(equal)  # priority 1 does not outrank the running priority-1 sequence: it waits
    sched.schedule()
    assert equal.status is SequenceStatus.WAITING and low[1].preempted == 0


def test_a_higher_priority_arrival_shrinks_an_elastic_running_sequence_before_preempting():
    sched, bm = scheduler(blocks=(32, 32, 32, 2), max_num_batched_tokens=64)
    elastic = make_seq(bm.cfg, 6, chains=4, min_chains=1, priority=0)
    sched.add(elastic)
    run(sched)
    assert bm.num_free[3] == 0
    urgent = make_seq(bm.cfg, 6, chains=4, priority=5)
    sched.add(urgent)
    so = sched.schedule()
    assert urgent.status is SequenceStatus.RUNNING and elastic.status is SequenceStatus.RUNNING
    assert elastic.num_chains == 3 and so.num_shrunk == 1 and so.num_preempted == 0


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


def test_update_counts_computed_tokens_and_samples_only_at_the_end_of_a_prompt():
    sched, bm = scheduler(max_num_batched_tokens=8)
    seq = make_seq(bm.cfg, 12, chains=2)
    sched.add(seq)
    so = run(sched)
    assert so.scheduled == [(seq, 8)] and not so.samples  # a chunk that does not end the prompt
    assert seq.num_computed_tokens == 8 and seq.num_tokens == 12
    so = run(sched, token=7)
    assert list(so.samples) == [0] and so.samples[0] == [seq]
    assert seq.num_computed_tokens == 12 and seq.output_token_ids == [7]


def test_update_forks_n_completions_once_the_prompt_is_computed_and_finishes_them():
    sched, bm = scheduler()
    seq = make_seq(bm.cfg, 6, chains=2, n=3, max_tokens=2)
    sched.add(seq)
    r = seq.request
    so = sched.schedule()
    assert [s.index for s in so.samples[0]] == [0, 1, 2] and not r.forked  # forks made to sample with it
    outs = sched.update_from_output(so, sampled(so))
    assert r.forked and [s.index for s in r.seqs] == [0, 1, 2] and len(sched.running) == 3
    assert [(o.index, o.token_ids) for o in outs] == [(0, (1,)), (1, (1,)), (2, (1,))]
    assert all(s.block_tables[0] == seq.block_tables[0] for s in r.seqs)  # the prompt's blocks, shared
    assert bm.pools[0].ref[seq.block_tables[0][0]] == 3
    outs = run_outputs(sched)
    assert [o.finish_reason for o in outs] == ["length"] * 3 and r.finished
    assert not sched.running and bm.num_free == bm.num_total


def test_update_stops_at_a_stop_token_without_its_text():
    sched, bm = scheduler()
    seq = make_seq(bm.cfg, 4, chains=1, stop_token_ids=(5,), max_tokens=8)
    sched.add(seq)
    run(sched, token=9)
    outs = run_outputs(sched, token=5)
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == 5 and outs[0].text == ""
    assert seq.is_finished and bm.num_free == bm.num_total


def run_outputs(sched, token: int = 1):
    so = sched.schedule()
    return sched.update_from_output(so, sampled(so, token))
