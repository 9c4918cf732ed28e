"""LLMEngine admission and abort: overload, aborting waiting / running / n > 1 requests, priorities."""

from __future__ import annotations

import pytest

from colm_runtime.engine.types import EngineOverloaded, InvalidRequest
from tests.engine._helpers import assert_all_free, make_engine, prompt, req


def test_a_full_waiting_queue_raises_engine_overloaded():
    eng = make_engine(max_waiting=2)
    eng.add_request(req(prompt(4)))
    eng.add_request(req(prompt(4)))
    with pytest.raises(EngineOverloaded):
        eng.add_request(req(prompt(4)))
    eng.step()  # both admitted: the queue has room again
    eng.add_request(req(prompt(4)))


@pytest.mark.parametrize("bad", [dict(chains=5), dict(chains=2, min_chains=3), dict(prompt=[]),
                                 dict(prompt=[512]), dict(n=65)])
def test_malformed_requests_are_invalid(bad):
    eng = make_engine()
    with pytest.raises(InvalidRequest):
        eng.add_request(req(bad.pop("prompt", prompt(4)), **bad))


def test_duplicate_request_ids_are_invalid():
    eng = make_engine()
    eng.add_request(req(prompt(4), rid="same"))
    with pytest.raises(InvalidRequest):
        eng.add_request(req(prompt(4), rid="same"))


def test_abort_running_waiting_and_forked_requests_ends_every_completion_and_frees_blocks():
    eng = make_engine(max_num_seqs=3)
    running = req(prompt(8), rid="running", max_tokens=50)
    forked = req(prompt(8), rid="forked", max_tokens=50, n=2, temperature=1.0, seed=1)
    waiting = req(prompt(8), rid="waiting", max_tokens=50)
    for r in (running, forked, waiting):
        eng.add_request(r)
    for _ in range(3):
        eng.step()
    assert len(eng.scheduler.running) == 3 and len(eng.scheduler.waiting) == 1
    for rid in ("running", "forked", "waiting"):
        assert eng.abort(rid)
    assert not eng.abort("running")  # already gone
    outs = eng.step()
    ends = sorted((o.request_id, o.index, o.finish_reason) for o in outs)
    assert ends == [("forked", 0, "abort"), ("forked", 1, "abort"), ("running", 0, "abort"),
                    ("waiting", 0, "abort")]
    assert [o for o in outs if o.request_id == "running"][0].completion_tokens == 3
    assert_all_free(eng)


def test_higher_priority_requests_finish_first_when_only_one_fits():
    eng = make_engine(max_num_seqs=1)
    for i, prio in enumerate([0, 2, 1]):
        eng.add_request(req(prompt(4, seed=i), rid=f"p{prio}", priority=prio, max_tokens=3))
    order = []
    while eng.has_unfinished:
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["p2", "p1", "p0"]
