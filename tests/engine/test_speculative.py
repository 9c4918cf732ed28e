"""Self-speculative decoding: greedy outputs equal plain decoding token for token; sampled outputs
follow the target distribution (chi-square, with a negative control that a wrong rule fails)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from colm_runtime.engine import speculative
from colm_runtime.engine.speculative import Draft, accept_sampled, best_gamma
from colm_runtime.engine.types import EngineRequest, InvalidRequest, SamplingParams
from tests.engine._helpers import assert_all_free, diverse_model, make_engine, prompt, req


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty): a correct sampler fails 1 run in 1000."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: Counter, probs: dict[int, float], n: int) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom. The least likely cells are pooled until each group
    expects >= 5 draws; a draw outside the support gives infinity."""
    groups, cur = [], []
    for t in sorted(probs, key=probs.get):
        cur.append(t)
        if sum(probs[x] for x in cur) * n >= 5:
            groups.append(cur)
            cur = []
    if cur:
        groups[-1] += cur
    if sum(counts[t] for t in probs) != n:
        return math.inf, len(groups) - 1
    stat = 0.0
    for g in groups:
        e = n * sum(probs[t] for t in g)
        stat += (sum(counts[t] for t in g) - e) ** 2 / e
    return stat, len(groups) - 1


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_greedy_speculative_equals_greedy_plain_alone_and_in_mixed_batches(kv_sharing):
    model = diverse_model(kv_sharing=kv_sharing)
    rng = random.Random(1)

    def requests():
        rs = [req(prompt(rng_lens[i], seed=i), chains=c, max_tokens=14, rid=f"r{i}", logprobs=2)
              for i, c in enumerate([4, 3, 2, 1, 4, 2])]
        rs.append(req(prompt(30, seed=9), chains=4, max_tokens=6, rid="long"))  # a prefill mid-batch
        rs.append(req(prompt(7, seed=11), chains=3, max_tokens=9, rid="forks", n=2))
        rs[4].speculative = False  # a plain request inside the speculating batch
        return rs

    rng_lens = [rng.randint(3, 20) for _ in range(6)]
    plain = make_engine(model, max_num_batched_tokens=24).generate(requests())
    for draft_chains, gamma in [(1, 4), (2, 3)]:
        eng = make_engine(model, max_num_batched_tokens=24, num_speculative_tokens=gamma,
                          speculative_draft_chains=draft_chains)
        got = eng.generate(requests())
        for rid, comps in plain.items():
            for a, b in zip(comps, got[rid]):
                assert a.token_ids == b.token_ids, (rid, draft_chains)
                assert [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs]
                for x, y in zip(a.logprobs, b.logprobs):
                    assert abs(x.logprob - y.logprob) < 1e-4
        assert eng.stats().spec_proposed_total > 0
        assert 0 <= eng.stats().spec_accepted_total <= eng.stats().spec_proposed_total
        assert_all_free(eng)
    for rid in ("r0", "r1", "r2", "r4"):  # alone too
        alone = make_engine(model, num_speculative_tokens=3).generate([r for r in requests() if r.request_id == rid])
        assert alone[rid][0].token_ids == plain[rid][0].token_ids


@pytest.mark.parametrize("kv_sharing, draft_chains", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_drafts_are_the_draft_chain_models_own_greedy_continuation(kv_sharing, draft_chains):
    """The draft reads the KV the request's k chains wrote (pool 0 / the shared pool) and writes its own:
    its tokens must equal a full causal forward of the draft_chains model from the same context."""
    model = diverse_model(kv_sharing=kv_sharing)
    eng = make_engine(model, num_speculative_tokens=4, speculative_draft_chains=draft_chains)
    real, checked = eng.spec.propose, []

    def propose(runner, entries):
        contexts = [list(seq.token_ids) for seq, _ in entries]
        drafts = real(runner, entries)
        for ids, draft, (_, gamma) in zip(contexts, drafts, entries):
            ref = list(ids)
            for _ in range(gamma):
                with torch.no_grad():
                    h = model(torch.tensor([ref]), chains=draft_chains)
                ref.append(int(model.logits(h, draft_chains)[0, -1].argmax()))
            checked.append(ref[len(ids):] == draft.tokens)
        return drafts

    eng.spec.propose = propose
    eng.generate([req(prompt(9, seed=s), chains=4, max_tokens=20, rid=f"r{s}") for s in range(3)])
    assert len(checked) >= 3 and all(checked)


def test_plain_colm_drafts_write_pool_zero_only():
    """A 1-chain draft of a plain-CoLM request touches no upper pool: its KV memory is pool 0's."""
    eng = make_engine(diverse_model(), num_speculative_tokens=3)
    real, seen = eng.spec.propose, []

    def propose(runner, entries):
        before = [(k.clone(), v.clone()) for k, v in zip(runner.cache.k, runner.cache.v)]
        drafts = real(runner, entries)
        seen.append([not (torch.equal(k, b[0]) and torch.equal(v, b[1]))
                     for (k, v), b in zip(zip(runner.cache.k, runner.cache.v), before)])
        return drafts

    eng.spec.propose = propose
    eng.generate([req(prompt(7), chains=4, max_tokens=12, rid="a")])
    assert seen and all(changed == [True, False, False, False] for changed in seen)


def test_gamma_follows_the_acceptance_rate():
    assert best_gamma(0.999, 6, 0.25) == 6  # drafts always accepted: draft as far as allowed
    assert best_gamma(0.05, 6, 0.25) == 1  # almost never: the smallest lookahead
    assert best_gamma(0.8, 8, 0.25) < best_gamma(0.9, 8, 0.25)


def test_rejected_drafts_roll_back_their_blocks():
    model = diverse_model()
    eng = make_engine(model, num_speculative_tokens=4)
    eng.add_request(req(prompt(6), chains=4, max_tokens=30, rid="a"))
    while eng.has_unfinished:
        eng.step()
        for seq in eng.scheduler.running:  # tables cover the computed tokens, nothing past them
            nb = eng.blocks.blocks_for_tokens(seq.num_computed_tokens)
            assert [len(t) for t in seq.block_tables] == [nb] * 4
    assert eng.stats().spec_accepted_total < eng.stats().spec_proposed_total  # some were rejected
    assert_all_free(eng)


def test_speculative_requests_need_an_engine_that_has_it():
    eng = make_engine(diverse_model())
    r = EngineRequest("x", prompt(4), SamplingParams(max_tokens=2), 4, speculative=True)
    with pytest.raises(InvalidRequest, match="speculative"):
        eng.add_request(r)


# ---- distribution -------------------------------------------------------------------------------
def test_acceptance_rule_outputs_the_target_distribution_and_a_wrong_rule_fails():
    """accept_sampled on fixed p and q (V = 6): the first emitted token follows p[0], and after two
    accepted drafts the bonus follows p[2]. Negative control: accepting every draft gives q, not p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[.40, .25, .15, .10, .06, .04], [.1, .2, .3, .2, .1, .1], [.05, .05, .1, .2, .3, .3]])
    q = torch.tensor([[.05, .10, .15, .20, .20, .30], [.3, .1, .1, .1, .2, .2]])
    n = 20000
    first, bonus, wrong = Counter(), Counter(), Counter()
    for _ in range(n):
        x = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        out = accept_sampled(p, Draft(x, q), gen)
        first[out[0]] += 1
        if len(out) == 3:
            bonus[out[2]] += 1
        wrong[x[0]] += 1  # the broken rule "always accept" emits the draft
    pdist = {t: float(v) for t, v in enumerate(p[0])}
    stat, df = chi2(first, pdist, n)
    assert stat < chi2_critical(df), stat
    nb = sum(bonus.values())
    stat, df = chi2(bonus, {t: float(v) for t, v in enumerate(p[2])}, nb)
    assert stat < chi2_critical(df), stat
    stat, df = chi2(wrong, pdist, n)
    assert stat > 10 * chi2_critical(df), "the negative control should fail clearly"


def _marginal_second_token(model, ids: list[int], chains: int, top_k: int) -> dict[int, float]:
    """Exact P(second generated token) at temperature 1 with top-k, from full forwards."""
    def dist(seq):
        with torch.no_grad():
            lg = model.logits(model(torch.tensor([seq]), chains=chains), chains)[0, -1]
        v, i = lg.topk(top_k)
        return dict(zip(i.tolist(), v.softmax(-1).tolist()))
    out: dict[int, float] = {}
    for t1, p1 in dist(ids).items():
        for t2, p2 in dist(ids + [t1]).items():
            out[t2] = out.get(t2, 0.0) + p1 * p2
    return out


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_speculative_sampling_in_the_engine_follows_the_target(kv_sharing, monkeypatch):
    model = diverse_model(kv_sharing=kv_sharing)
    ids, n, k = prompt(5, seed=4), 1200, 3
    exact = _marginal_second_token(model, ids, 4, k)

    def second_tokens() -> Counter:
        eng = make_engine(model, num_speculative_tokens=1, max_num_seqs=400, max_num_batched_tokens=4096,
                          kv_cache_memory=1 << 24, max_waiting=n, seed=7)
        eng.spec.throughput_gate = False  # verify every second token, however fast plain decoding is
        eng.spec.cost_ratio = lambda chains: 0.0  # and whatever the measured draft cost (timing-dependent)
        reqs = [EngineRequest(f"s{i}", list(ids), SamplingParams(max_tokens=3, temperature=1.0, top_k=k,
                                                                 ignore_eos=True), 4) for i in range(n)]
        out = eng.generate(reqs)
        assert eng.stats().spec_proposed_total == n  # every second token went through verification
        return Counter(c[0].token_ids[1] for c in out.values())

    stat, df = chi2(second_tokens(), exact, n)
    assert stat < chi2_critical(df), stat

    def accept_all(p, draft, gen):  # negative control: a broken acceptance rule
        return draft.tokens + [int(torch.multinomial(p[-1] / p[-1].sum(), 1, generator=gen))]

    monkeypatch.setattr(speculative, "accept_sampled", accept_all)
    stat, df = chi2(second_tokens(), exact, n)
    assert stat > 3 * chi2_critical(df), "a broken rule must fail the same test clearly"


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_speculation_under_memory_pressure_stays_exact(kv_sharing):
    """A KV cache too small for the batch: sequences are shrunk (plain CoLM) and preempted while they
    speculate; greedy tokens still equal plain decoding at the chain counts each token ran at."""
    from tests.engine._helpers import kv_bytes

    model = diverse_model(kv_sharing=kv_sharing)
    reqs = lambda: [req(prompt(10, seed=i), chains=4, min_chains=2 if i % 2 else None, max_tokens=24,  # noqa: E731
                        rid=f"p{i}") for i in range(5)]
    eng = make_engine(model, num_speculative_tokens=3, kv_cache_memory=kv_bytes(model.cfg, 24))
    got = eng.generate(reqs())
    st = eng.stats()
    assert st.preemptions_total + st.shrinks_total > 0, "the cache was not under pressure"
    assert st.spec_proposed_total > 0
    for r in reqs():
        c = got[r.request_id][0]
        ids = list(r.prompt_token_ids)
        for tok, k in zip(c.token_ids, c.token_chains):
            with torch.no_grad():
                assert int(model.logits(model(torch.tensor([ids]), chains=k), k)[0, -1].argmax()) == tok
            ids.append(tok)
    assert_all_free(eng)
