"""Prompt logprobs: equal to `colm eval`'s per-token log-likelihoods (a full causal forward, no cache) at
every chain count, alone and inside a busy mixed-chain batch, through chunked prefill, on plain CoLM and
CoLM-Air; computed only for the requests that ask, each prompt token once."""

from __future__ import annotations

import pytest

from colm_runtime.engine import prompt_logprobs
from colm_runtime.engine.types import SamplingParams
from colm_runtime.training.evaluate import token_logprobs
from tests.engine._helpers import diverse_model, make_engine, make_seq, prompt, req

TOL = 1e-4


def check_against_reference(model, ids: list[int], chains: int, entries, top: int) -> None:
    """Every entry against the full forward: the token's logprob, its top-N (sorted, the best first) and
    its rank (1 exactly when it is the most likely token)."""
    ref = token_logprobs(model, ids, chains)
    assert entries[0] is None and len(entries) == len(ids)
    for t, (e, want) in enumerate(zip(entries[1:], ref), start=1):
        assert e.token_id == ids[t]
        assert abs(e.logprob - want) < TOL, (chains, t, e.logprob, want)
        assert len(e.top) == top and all(a[2] >= b[2] for a, b in zip(e.top, e.top[1:]))
        if top:
            assert e.top[0][2] >= e.logprob - TOL
            assert (e.rank == 1) == (e.top[0][0] == ids[t]) or abs(e.top[0][2] - e.logprob) < TOL


def run_one(engine, r) -> tuple:
    """(prompt logprobs of the first update, completion) of one request run to its end."""
    first = None
    engine.add_request(r)
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id == r.request_id and first is None:
                first = out.prompt_logprobs
    return first


@pytest.mark.parametrize("air", [False, True], ids=["plain", "air"])
def test_alone_at_every_chain_count_through_chunked_prefill(air):
    model = diverse_model(kv_sharing=air)
    engine = make_engine(model, max_num_batched_tokens=7)  # a 23-token prompt runs in 4 chunks
    ids = prompt(23, seed=3)
    for k in range(1, model.cfg.n_chains + 1):
        entries = run_one(engine, req(ids, chains=k, max_tokens=0, prompt_logprobs=3, rid=f"score-{k}"))
        check_against_reference(model, ids, k, entries, 3)
    assert engine.blocks.num_free == engine.blocks.num_total  # no leaked blocks


@pytest.mark.parametrize("air", [False, True], ids=["plain", "air"])
def test_inside_a_busy_mixed_chain_batch(air):
    """Decodes at every chain count run while prompts at every chain count are scored in the same steps;
    the scores still equal the reference, and the decodes equal their runs alone (the greedy tokens)."""
    model = diverse_model(kv_sharing=air)
    busy = [req(prompt(9, seed=50 + k), chains=k, max_tokens=40, rid=f"busy-{k}") for k in range(1, 5)]
    alone = make_engine(model).generate([req(b.prompt_token_ids, chains=b.chains, max_tokens=40, rid=b.request_id)
                                         for b in busy])
    engine = make_engine(model, max_num_batched_tokens=16)
    for b in busy:
        engine.add_request(b)
    outs = [o for _ in range(3) for o in engine.step()]  # the busy requests are decoding now
    scored = {f"s{k}": (prompt(19 + k, seed=k), k) for k in (4, 1, 3, 2)}
    for rid, (ids, k) in scored.items():
        engine.add_request(req(ids, chains=k, max_tokens=3, prompt_logprobs=2, rid=rid))
    firsts, tokens = {}, {b.request_id: [] for b in busy}
    while engine.has_unfinished:
        outs += engine.step()
        for out in outs:
            if out.request_id in scored and out.request_id not in firsts:
                firsts[out.request_id] = out.prompt_logprobs
            if out.request_id in tokens:
                tokens[out.request_id].extend(out.token_ids)
        outs = []
    for rid, (ids, k) in scored.items():
        check_against_reference(model, ids, k, firsts[rid], 2)
    for b in busy:
        assert tokens[b.request_id] == alone[b.request_id][0].token_ids


def test_only_requests_that_ask_return_more_than_one_logit_row():
    model = diverse_model()
    engine = make_engine(model, max_num_batched_tokens=64)
    seen = []
    real = engine.model.forward_step

    def spy(batch, cache):
        seen.append(batch.num_logits)
        return real(batch, cache)

    engine.model.forward_step = spy
    engine.generate([req(prompt(12, seed=1), chains=2, max_tokens=2), req(prompt(15, seed=2), chains=4, max_tokens=2)])
    assert seen and all(set(n) == {1} for n in seen), "a request that did not ask got prompt rows"
    seen.clear()
    engine.generate([req(prompt(12, seed=1), chains=2, max_tokens=2),
                     req(prompt(15, seed=2), chains=4, max_tokens=2, prompt_logprobs=0)])
    # the asking request's 15 rows: positions 0..13 score prompt tokens 1..14, position 14 samples
    assert sorted(seen[0]) == [1, 15], "only the asking request returns its prompt rows"


def test_a_recomputed_prompt_is_not_scored_again():
    """After a preemption the prompt is computed again from position 0: it asks for no rows then."""
    seq = make_seq(diverse_model().cfg, 10, chains=2)
    seq.request.prompt_scored = [None] + [(0.0, [], [], 1)] * 9  # every prompt token already scored
    assert prompt_logprobs.rows_needed(seq, 10) == 0
    seq.request.prompt_scored = [None] * 4  # positions 0..3 scored: a chunk from 0 over 8 tokens
    assert prompt_logprobs.rows_needed(seq, 8) == 8 - 4 + 1  # rows of positions 3..7 predict tokens 4..8


def test_generation_is_unchanged_by_scoring_and_air_scores_at_the_requests_chains():
    """Asking for prompt logprobs changes no generated token (plain and Air: the scored chunks of an Air
    request run at its own chains, whose K/V equals the first-chain prefill's)."""
    for air in (False, True):
        model = diverse_model(kv_sharing=air)
        rs = [req(prompt(17, seed=9), chains=k, max_tokens=6, rid=f"g{k}") for k in range(1, 5)]
        plain = make_engine(model, max_num_batched_tokens=8).generate(rs)
        scored = make_engine(model, max_num_batched_tokens=8).generate(
            [req(r.prompt_token_ids, chains=r.chains, max_tokens=6, rid=r.request_id, prompt_logprobs=1) for r in rs])
        for r in rs:
            assert scored[r.request_id][0].token_ids == plain[r.request_id][0].token_ids


def test_max_tokens_zero_only_scores_and_needs_one_completion():
    SamplingParams(max_tokens=0, prompt_logprobs=0)
    for bad in ({"max_tokens": 0}, {"max_tokens": 0, "prompt_logprobs": 1, "n": 2}, {"prompt_logprobs": 21}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    engine = make_engine(diverse_model())
    out = engine.generate([req(prompt(8), chains=3, max_tokens=0, prompt_logprobs=0, rid="only")])["only"][0]
    assert out.token_ids == [] and out.finish_reason == "length"
    assert not engine.has_unfinished and all(b == t for b, t in zip(engine.blocks.num_free, engine.blocks.num_total))
