"""Prefix caching in the engine: greedy outputs with caching equal outputs without it, for prefixes
shared across chain counts (cached at 4 and reused at 2; cached at 2 and reused at 4, chains 3-4
computed), on plain CoLM and CoLM-Air, with chunked prefill, n > 1, self-speculation, multi-turn
prompts that contain earlier outputs, and a KV budget so small that cached blocks are evicted."""

from __future__ import annotations

import random

import pytest

from tests.engine._helpers import assert_all_free, diverse_model, kv_bytes, make_engine, prompt, req

VARIANTS = pytest.mark.parametrize("kv_sharing", [False, True], ids=["colm", "colm-air"])


def outputs(engine, requests) -> dict[str, list[tuple[list[int], list]]]:
    got = engine.generate(requests)
    return {rid: [(c.token_ids, c.logprobs, c.finish_reason) for c in comps] for rid, comps in got.items()}


def assert_same(a: dict, b: dict) -> None:
    """Same tokens; logprobs to 1e-4 (cached K/V was computed in another batch: fp32 sums in another order)."""
    assert a.keys() == b.keys()
    for rid in a:
        for (ta, la, fa), (tb, lb, fb) in zip(a[rid], b[rid], strict=True):
            assert ta == tb and fa == fb, rid
            assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(la, lb, strict=True)), rid


@VARIANTS
@pytest.mark.parametrize("first,then", [(4, 2), (2, 4), (1, 3), (3, 3)])
def test_a_prefix_cached_at_one_chain_count_serves_another_exactly(kv_sharing, first, then):
    model = diverse_model(kv_sharing=kv_sharing)
    system = prompt(27, seed=5)  # 6 full blocks of 4 and a partial one

    def turn(rid, chains, tail_seed):
        return [req(system + prompt(5, seed=tail_seed), chains=chains, max_tokens=10, rid=rid, logprobs=2)]

    cached = make_engine(model)
    outputs(cached, turn("a", first, 1))
    got = outputs(cached, turn("b", then, 2))
    want = outputs(make_engine(model, enable_prefix_caching=False), turn("b", then, 2))
    assert_same(got, want)
    stats = cached.blocks.cache_stats
    hit = [h // 4 for h in stats.hits]  # blocks found per pool (request b's lookup only: a found nothing)
    pools = 1 if kv_sharing else then
    assert hit[:pools] == [6 if kv_sharing or p < first else 0 for p in range(pools)], hit
    assert_all_free(cached)


@VARIANTS
def test_a_busy_mixed_batch_with_shared_prefixes_is_unchanged_by_caching(kv_sharing):
    model = diverse_model(kv_sharing=kv_sharing)
    rng = random.Random(3)
    stems = [prompt(rng.randint(9, 30), seed=s) for s in range(3)]

    def requests():
        r = random.Random(4)
        out = []
        for i in range(18):
            n = r.choice([1, 1, 2])
            out.append(req(r.choice(stems) + prompt(r.randint(1, 6), seed=100 + i), chains=r.randint(1, 4),
                           max_tokens=r.randint(3, 12), rid=f"r{i}", n=n, logprobs=1))
        return out

    config = dict(max_num_batched_tokens=20, num_speculative_tokens=3)  # chunked prompts, speculation
    cached = make_engine(model, **config)
    got = outputs(cached, requests())
    assert_same(got, outputs(make_engine(model, enable_prefix_caching=False, **config), requests()))
    assert sum(cached.blocks.cache_stats.hits) > 0 and cached.stats().spec_proposed_total > 0
    assert_all_free(cached)


@VARIANTS
def test_multi_turn_prompts_reuse_blocks_computed_while_decoding_and_speculating(kv_sharing):
    """Turn 2's prompt holds turn 1's output: its blocks were computed by decode and verify steps, so a
    block named while it held rolled-back draft K/V would change turn 2's output."""
    model = diverse_model(kv_sharing=kv_sharing)
    base = prompt(6, seed=8)
    engines = {on: make_engine(model, enable_prefix_caching=on, num_speculative_tokens=4) for on in (True, False)}
    results = {}
    for on, eng in engines.items():
        history, seen = list(base), []
        for t in range(3):
            out = outputs(eng, [req(history, chains=4 - t, max_tokens=13, rid=f"t{t}", logprobs=1)])
            seen.append(out)
            history = history + out[f"t{t}"][0][0] + prompt(3, seed=20 + t)
        results[on] = seen
    for a, b in zip(results[True], results[False]):
        assert_same(a, b)
    stats = engines[True].blocks.cache_stats
    assert stats.hits[0] >= 4 * 5 and engines[True].stats().spec_proposed_total > 0
    assert_all_free(engines[True])


@VARIANTS
def test_eviction_under_a_tiny_kv_budget_fails_nobody(kv_sharing):
    model = diverse_model(kv_sharing=kv_sharing)
    stems = [prompt(16, seed=s) for s in range(4)]

    def requests():
        return [req(stems[i % 4] + prompt(3, seed=i), chains=1 + i % 4, min_chains=1, max_tokens=8, rid=f"r{i}")
                for i in range(16)]

    # 10 blocks of 4 tokens per pool: two 27-token sequences fit at once, so requests wait, get
    # preempted, and cached blocks must be evicted for them.
    config = dict(kv_cache_memory=kv_bytes(model.cfg, 10), max_num_batched_tokens=16)
    cached = make_engine(model, **config)
    got = outputs(cached, requests())
    want = outputs(make_engine(model, enable_prefix_caching=False, **config), requests())
    assert_same(got, want)
    assert all(f == "length" for comps in got.values() for _, _, f in comps)
    assert sum(cached.blocks.cache_stats.hits) > 0
    assert_all_free(cached)


def test_a_request_asking_prompt_logprobs_computes_its_whole_prompt():
    model = diverse_model()
    system = prompt(20, seed=2)
    eng = make_engine(model)
    outputs(eng, [req(system, chains=4, max_tokens=2)])
    queries = list(eng.blocks.cache_stats.queries)
    scored = eng.generate([req(system, chains=4, max_tokens=2, prompt_logprobs=1)])
    assert eng.blocks.cache_stats.queries == queries, "no lookup"
    want = make_engine(model, enable_prefix_caching=False).generate([req(system, chains=4, max_tokens=2,
                                                                         prompt_logprobs=1)])
    assert [c.token_ids for c in next(iter(scored.values()))] == [c.token_ids for c in next(iter(want.values()))]
