"""Seamless chain switching: a request whose chain count goes down and up mid-generation produces
exactly the tokens of the reference (each position's full forward at that position's chain count)."""

from __future__ import annotations

import pytest
import torch

from colm_runtime.engine.chain_state import schedule_at
from colm_runtime.engine.types import EngineRequest, InvalidRequest, SamplingParams
from tests.engine._helpers import assert_all_free, diverse_model, make_engine, prompt, req

SCHEDULE = ((0, 4), (3, 2), (7, 4), (10, 1), (12, 3))


def reference(model, ids: list[int], schedule, n: int) -> list[int]:
    """Greedy tokens where token g is the argmax of a full causal forward at schedule_at(g) chains."""
    ids = list(ids)
    for g in range(n):
        k = schedule_at(schedule, g)[0]
        with torch.no_grad():
            ids.append(int(model.logits(model(torch.tensor([ids]), chains=k), k)[0, -1].argmax()))
    return ids[-n:]


def scheduled(rid: str, ids: list[int], schedule=SCHEDULE, max_tokens: int = 16, **kw) -> EngineRequest:
    return EngineRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                         schedule[0][1], min_chains=1, chain_schedule=schedule, **kw)


@pytest.mark.parametrize("kv_sharing", [False, True])
@pytest.mark.parametrize("gamma", [0, 3])
def test_down_and_up_mid_request_equals_the_scheduled_reference(kv_sharing, gamma):
    model = diverse_model(kv_sharing=kv_sharing)
    ids = prompt(9, seed=3)
    eng = make_engine(model, num_speculative_tokens=gamma, max_num_batched_tokens=8)
    out = eng.generate([scheduled("a", ids), req(prompt(5, seed=1), chains=3, max_tokens=16, rid="b"),
                        scheduled("c", prompt(6, seed=2), ((0, 1), (2, 4)), max_tokens=6)])
    a = out["a"][0]
    assert a.token_ids == reference(model, ids, SCHEDULE, 16)
    assert a.token_chains == [schedule_at(SCHEDULE, g)[0] for g in range(16)]
    assert out["c"][0].token_ids == reference(model, prompt(6, seed=2), ((0, 1), (2, 4)), 6)
    st = eng.stats()
    assert st.chain_switches[("down", "schedule")] == 2 and st.chain_switches[("up", "schedule")] == 3
    # Going up recomputes on plain CoLM only (CoLM-Air's KV does not depend on the chain count).
    assert (st.recomputed_tokens_total > 0) == (not kv_sharing)
    assert_all_free(eng)


def test_going_down_frees_the_upper_pools_and_going_up_recomputes_the_tokens_so_far():
    model = diverse_model()
    eng = make_engine(model)
    eng.add_request(scheduled("a", prompt(10), ((0, 4), (2, 1), (4, 3)), max_tokens=6))
    seq = eng.requests["a"].seqs[0]
    eng.step(), eng.step()  # prompt + first token, second token: 2 generated
    assert all(seq.block_tables[p] for p in range(4))
    eng.step()  # generated 2: down to 1 chain
    assert seq.num_chains == 1 and not any(seq.block_tables[1:]) and eng.blocks.num_free[1] == eng.blocks.num_total[1]
    eng.step()  # 4 generated after this one
    tokens_before = seq.num_tokens - 1
    eng.step()  # up to 3 chains: the 14 tokens so far are recomputed
    assert seq.num_chains == 3 and eng.stats().recomputed_tokens_total == tokens_before
    while eng.has_unfinished:
        eng.step()
    assert_all_free(eng)


def test_the_load_policy_steps_unpinned_requests_down_and_back_up():
    model = diverse_model(kv_sharing=True)
    eng = make_engine(model, step_time_target=1e-9)  # every step misses the target
    eng.add_request(req(prompt(6), chains=4, min_chains=2, max_tokens=60, rid="elastic"))
    eng.add_request(req(prompt(6), chains=4, max_tokens=60, rid="pinned"))
    elastic, pinned = (eng.requests[r].seqs[0] for r in ("elastic", "pinned"))
    for _ in range(30):
        eng.step()
    assert elastic.num_chains == 2 and pinned.num_chains == 4  # never below min_chains; pinned untouched
    eng.switcher.target = 1e9  # load falls: every step is far below the target
    for _ in range(25):
        eng.step()
    assert elastic.num_chains == 4
    st = eng.stats()
    assert st.chain_switches[("down", "load")] == 2 and st.chain_switches[("up", "load")] == 2


@pytest.mark.parametrize("schedule, why", [
    (((1, 4),), "strictly increasing"), (((0, 4), (5, 2), (5, 3)), "strictly increasing"),
    (((0, 4), (3, 9)), "1..4"), (((0, 3), (2, 2)), "start at the request's chain count"), ((), "strictly"),
])
def test_invalid_schedules_are_client_errors(schedule, why):
    eng = make_engine(diverse_model())
    r = EngineRequest("x", prompt(4), SamplingParams(max_tokens=2), 4, min_chains=1, chain_schedule=schedule)
    with pytest.raises(InvalidRequest, match=why):
        eng.add_request(r)
