"""An exception inside one request's processing fails that request alone (finish_reason "error"),
frees its blocks, and leaves the engine serving the others. The fault comes from the test-only hook
(COLM_FAULT_INJECT), which is off unless the environment sets it."""

from __future__ import annotations

import pytest

from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.faults import ENV, FaultInjector
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams

MARKER = "zq-fault-marker"


def _engine(model_dir, monkeypatch, spec: str | None) -> LLMEngine:
    if spec is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, spec)
    return LLMEngine.from_model_dir(model_dir, EngineConfig(kv_cache_memory=4 << 20, cpu_threads=1))


def _requests(engine: LLMEngine, n: int = 2) -> list[EngineRequest]:
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, n=n)
    good = [EngineRequest(f"good-{i}", engine.tokenizer.encode(f"a good prompt {i}"), p, chains=1 + i % 4)
            for i in range(3)]
    bad = EngineRequest("bad", engine.tokenizer.encode(f"hello {MARKER} there"), p, chains=4)
    return [good[0], bad, *good[1:]]


def test_hook_is_off_by_default(plain_model_dir, monkeypatch):
    engine = _engine(plain_model_dir, monkeypatch, None)
    assert not engine.faults.enabled
    done = engine.generate(_requests(engine))
    assert all(c.finish_reason == "length" for cs in done.values() for c in cs)


def test_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "backward:x")
    with pytest.raises(ValueError, match=ENV):
        FaultInjector.from_env()


def test_step_fault_fails_one_request(plain_model_dir, monkeypatch):
    engine = _engine(plain_model_dir, monkeypatch, f"step:{MARKER}")
    ref = _engine(plain_model_dir, monkeypatch, None).generate(
        [r for r in _requests(engine) if r.request_id != "bad"])
    done = engine.generate(_requests(engine))
    assert [c.finish_reason for c in done["bad"]] == ["error", "error"]
    for rid, completions in ref.items():  # the others: exactly what they give without the faulty one
        assert [c.token_ids for c in done[rid]] == [c.token_ids for c in completions]
        assert all(c.finish_reason == "length" for c in done[rid])
    assert not engine.has_unfinished and engine.blocks.num_free == engine.blocks.num_total


def test_add_fault_fails_one_request(plain_model_dir, monkeypatch):
    engine = _engine(plain_model_dir, monkeypatch, f"add:{MARKER}")
    reqs = _requests(engine)
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.add_request(reqs[1])
    engine.fail_request(engine.requests["bad"], RuntimeError("x"))  # what AsyncEngine does on that raise
    done = engine.generate([r for r in reqs if r.request_id != "bad"])
    assert all(c.finish_reason == "length" for cs in done.values() for c in cs)
    assert engine.blocks.num_free == engine.blocks.num_total


def test_forward_fault_fails_its_batch_only(plain_model_dir, monkeypatch):
    """A fault in the batched forward cannot be pinned on one request: the requests of that batch fail,
    the others go on. With one sequence a step (max_num_seqs=1) that is the faulty request alone."""
    monkeypatch.setenv(ENV, f"forward:{MARKER}")
    engine = LLMEngine.from_model_dir(plain_model_dir, EngineConfig(kv_cache_memory=4 << 20, cpu_threads=1,
                                                                    max_num_seqs=1))
    reqs = _requests(engine, n=1)
    done = engine.generate(reqs)
    assert [c.finish_reason for c in done["bad"]] == ["error"]
    ref = _engine(plain_model_dir, monkeypatch, None).generate([r for r in reqs if r.request_id != "bad"])
    for rid, completions in ref.items():
        assert [c.token_ids for c in done[rid]] == [c.token_ids for c in completions]
    assert not engine.has_unfinished and engine.blocks.num_free == engine.blocks.num_total


def test_failed_steps_in_a_row_make_the_engine_unhealthy(plain_model_dir, monkeypatch):
    monkeypatch.setenv(ENV, f"forward:{MARKER}")
    engine = LLMEngine.from_model_dir(plain_model_dir, EngineConfig(kv_cache_memory=4 << 20, cpu_threads=1,
                                                                    max_step_failures=2))
    reqs = _requests(engine, n=1)
    bad = reqs[1]

    def fail_one(rid: str) -> None:
        done = engine.generate([EngineRequest(rid, bad.prompt_token_ids, bad.params, chains=2)])
        assert done[rid][0].finish_reason == "error"

    fail_one("bad-1")
    assert engine.stats().healthy and engine.stats().step_failures_total == 1
    engine.generate([reqs[0]])  # a good step between: the run starts again
    fail_one("bad-2")
    assert engine.stats().healthy
    fail_one("bad-3")
    st = engine.stats()
    assert not st.healthy and st.step_failures_total == 3
    done = engine.generate([reqs[2]])  # unhealthy for good, but it still serves what it can
    assert done[reqs[2].request_id][0].finish_reason == "length" and not engine.stats().healthy
