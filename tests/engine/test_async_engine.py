"""AsyncEngine: concurrent streams, abort when the consumer goes away, admission errors, shutdown."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from colm_runtime.engine.async_engine import AsyncEngine
from colm_runtime.engine.types import EngineOverloaded, EngineStopped, RequestTooLong
from tests.engine._helpers import diverse_model, make_engine, prompt, req


@pytest.fixture
async def engine():
    eng = AsyncEngine(make_engine(diverse_model(), max_num_batched_tokens=64))
    await eng.start()
    yield eng
    await eng.shutdown()


async def collect(eng, r):
    outs = [o async for o in eng.generate(r)]
    return outs


async def wait_idle(eng, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        s = eng.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {eng.stats()}")


async def test_many_concurrent_generate_calls_match_the_synchronous_engine(engine):
    rng = random.Random(3)
    requests = [req(prompt(rng.randint(1, 30), seed=i), chains=rng.randint(1, 4), max_tokens=rng.randint(1, 16),
                    rid=f"r{i}", n=rng.choice([1, 1, 2])) for i in range(48)]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    expected = make_engine(diverse_model()).generate(
        [req(r.prompt_token_ids, chains=r.chains, max_tokens=r.params.max_tokens, rid=r.request_id, n=r.params.n)
         for r in requests])
    for r, outs in zip(requests, results):
        for i in range(r.params.n):
            mine = [o for o in outs if o.index == i]
            assert [o.finished for o in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1].finish_reason == "length"
            if r.params.n == 1:  # greedy: the same tokens as the synchronous engine gives
                assert [t for o in mine for t in o.token_ids] == expected[r.request_id][i].token_ids
                assert "".join(o.text for o in mine) == expected[r.request_id][i].text
    stats = await wait_idle(engine)
    assert stats.steps_total > 0 and stats.alive


async def test_closing_the_iterator_aborts_and_frees_the_blocks(engine):
    gen = engine.generate(req(prompt(20), max_tokens=400, rid="long"))
    first = await gen.__anext__()
    assert not first.finished
    assert engine.stats().kv_blocks_free != engine.stats().kv_blocks_total
    await gen.aclose()
    await wait_idle(engine)


async def test_cancelling_the_consumer_task_aborts(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(req(prompt(10), max_tokens=400, rid="cancelled")):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    s = engine.stats()
    assert s.running == 1 and s.kv_blocks_free[0] < s.kv_blocks_total[0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def test_admission_errors_are_raised_before_any_output(engine):
    with pytest.raises(RequestTooLong):
        await collect(engine, req(prompt(10), max_tokens=10_000))
    with pytest.raises(ValueError):
        await collect(engine, req(prompt(10), chains=9))


async def test_a_full_queue_is_refused_before_any_output():
    """Past max_waiting, generate() raises EngineOverloaded at once, in the caller, without waiting for
    the engine thread: so the server answers 429 instead of starting a stream that then fails."""
    eng = AsyncEngine(make_engine(diverse_model(), max_waiting=0))  # every request finds the queue full
    await eng.start()
    try:
        step = anext(eng.generate(req(prompt(8), rid="late"))).__await__()
        with pytest.raises(EngineOverloaded):
            next(step)  # the coroutine's first step, before it could await the engine thread
        await wait_idle(eng)
    finally:
        await eng.shutdown()


async def test_the_queue_bound_counts_requests_the_engine_thread_took_during_a_step():
    """Requests the engine thread has taken but not yet reported (it reports after each step) count as
    waiting: otherwise the caller admits past max_waiting and the engine refuses those requests later,
    inside a stream the server has already answered with 200."""
    engine = make_engine(diverse_model(), max_waiting=2, max_num_seqs=1)
    taken, release = threading.Event(), threading.Event()
    real = engine.runner.forward

    def held(so, *args):  # hold the step in which b and c are waiting (taken, not yet reported)
        if len(engine.scheduler.waiting) == 2 and not release.is_set():
            taken.set()
            release.wait(10)
        return real(so, *args)

    engine.runner.forward = held
    eng = AsyncEngine(engine)
    await eng.start()
    try:
        a = eng.generate(req(prompt(8), max_tokens=30, rid="a"))
        await a.__anext__()  # a runs (max_num_seqs 1: b and c will wait)
        b, c = (eng.generate(req(prompt(8, seed=i), max_tokens=2, rid=rid)) for i, rid in ((1, "b"), (2, "c")))
        firsts = [asyncio.ensure_future(g.__anext__()) for g in (b, c)]
        assert await asyncio.to_thread(taken.wait, 10)
        step = anext(eng.generate(req(prompt(8, seed=3), rid="d"))).__await__()
        with pytest.raises(EngineOverloaded):
            next(step)  # refused in the caller, although the last published stats show no waiting
        release.set()
        await asyncio.gather(*firsts)
        for g in (a, b, c):
            assert [o async for o in g][-1].finish_reason == "length"
        await wait_idle(eng)
    finally:
        release.set()
        await eng.shutdown()


async def test_shutdown_drains_then_aborts_and_refuses_new_requests():
    # The long request needs thousands of steps: it cannot finish within the drain timeout.
    eng = AsyncEngine(make_engine(diverse_model(max_position_embeddings=8192)))
    await eng.start()
    streams = {name: eng.generate(req(prompt(5), max_tokens=m, rid=name)) for name, m in (("short", 3), ("long", 8000))}
    firsts = {name: await g.__anext__() for name, g in streams.items()}  # both are running now
    rest = {name: asyncio.create_task(_drain(g)) for name, g in streams.items()}
    await eng.shutdown(drain_timeout=0.3)
    outs = {name: [firsts[name]] + await task for name, task in rest.items()}
    assert outs["short"][-1].finish_reason == "length" and len(outs["short"]) == 3
    assert outs["long"][-1].finish_reason == "abort" and len(outs["long"]) < 8000
    assert not eng.stats().alive
    with pytest.raises(EngineStopped):
        await collect(eng, req(prompt(5)))
    assert eng.engine.blocks.num_free == eng.engine.blocks.num_total


async def _drain(gen):
    return [o async for o in gen]


async def test_a_failing_step_ends_its_requests_with_error_and_the_engine_keeps_serving(engine):
    runner = engine.engine.runner
    real = runner.forward

    def broken(so, *args):  # a device error in the middle of a step, once
        runner.forward = real
        raise RuntimeError("simulated device failure")

    runner.forward = broken
    outs = await collect(engine, req(prompt(6), max_tokens=5, n=2, rid="unlucky"))
    assert sorted((o.index, o.finish_reason) for o in outs) == [(0, "error"), (1, "error")]
    assert all(o.error for o in outs)
    after = await collect(engine, req(prompt(6), max_tokens=5, rid="next"))
    assert after[-1].finish_reason == "length" and engine.stats().alive
    await wait_idle(engine)
