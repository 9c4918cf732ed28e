"""Sampling: seeded runs reproduce whatever the batch; top-k/top-p/min-p never emit excluded tokens;
penalties; logprobs; n > 1 completions share one prefill; stop strings and stop token ids."""

from __future__ import annotations

import random

import torch

from colm_runtime.engine.sampler import SamplingRow, apply_penalties, apply_top_k_top_p, sample
from colm_runtime.engine.types import SamplingParams
from tests.engine._helpers import diverse_model, make_engine, prompt, req

V = 64


def draw(logits: torch.Tensor, params: SamplingParams, n: int = 3000, seed: int = 0) -> torch.Tensor:
    rows = [SamplingRow(params, None, (), ())] * n
    out = sample(logits.expand(n, -1).clone(), rows, torch.Generator().manual_seed(seed))
    return torch.tensor(out.token_ids)


def test_top_k_top_p_min_p_never_emit_excluded_tokens():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 2
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1])  # smallest prefix with mass >= 0.6
    cases = {
        "top_k": (SamplingParams(top_k=5), set(order[:5])),
        "top_p": (SamplingParams(top_p=0.6), nucleus),
        "min_p": (SamplingParams(min_p=0.3), {t for t in range(V) if probs[t] >= 0.3 * probs.max()}),
        "all": (SamplingParams(top_k=8, top_p=0.9, min_p=0.1, temperature=0.7), None),
    }
    for name, (params, allowed) in cases.items():
        got = set(draw(logits, params).tolist())
        if allowed is None:
            scaled = (logits[0] / 0.7).softmax(-1)
            top8 = set(scaled.argsort(descending=True)[:8].tolist())
            allowed = {t for t in top8 if scaled[t] >= 0.1 * scaled.max()}
        assert got <= allowed, f"{name}: emitted excluded tokens {got - allowed}"
        assert len(got) >= min(2, len(allowed)), f"{name}: not sampling"


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.bincount(draw(logits, SamplingParams(temperature=1.0), n=20000), minlength=4).float()
    assert torch.allclose(counts / counts.sum(), logits.softmax(-1)[0], atol=0.02)
    # Beside rows with top_k in the same batch, a plain row still samples the whole distribution.
    n = 20000
    rows = [SamplingRow(SamplingParams(top_k=1 if i % 2 else 0), None, (), ()) for i in range(n)]
    out = torch.tensor(sample(logits.expand(n, -1).clone(), rows, torch.Generator().manual_seed(3)).token_ids)
    assert set(out[1::2].tolist()) == {0}
    counts = torch.bincount(out[0::2], minlength=4).float()
    assert torch.allclose(counts / counts.sum(), logits.softmax(-1)[0], atol=0.02)


def test_unseeded_draws_never_pick_a_token_of_probability_zero():
    # Zero mass at both ends and in the middle, and a row whose whole mass is on the last token: the
    # inverse-CDF draw must land on a token with mass whatever its uniform (u never reaches the total).
    logits = torch.full((2, 4096), float("-inf"))
    logits[0, 1:-1:2] = torch.randn(2047, generator=torch.Generator().manual_seed(4))
    logits[1, -1] = 0.0
    n = 4000
    rows = [SamplingRow(SamplingParams(), None, (), ())] * (2 * n)
    out = torch.tensor(sample(logits.repeat(n, 1), rows, torch.Generator().manual_seed(5)).token_ids)
    assert (out[0::2] % 2 == 1).all() and out[0::2].max() < 4095
    assert (out[1::2] == 4095).all()
    counts = torch.bincount(out[0::2], minlength=4096)[1:-1:2].float()
    expected = logits[0, 1:-1:2].softmax(-1) * n
    assert ((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum() < 2047 + 5 * (2 * 2047) ** 0.5  # chi-square


def test_degenerate_rows_still_sample_a_token_id():
    # A tiny temperature or an extreme penalty turns logits into inf/NaN: every row must still get a
    # token id inside the vocabulary (a fuzzed request once got id V and failed the step).
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(8))
    logits[1, 3] = float("inf")
    logits[2] = float("nan")
    logits[3] = float("-inf")
    for gen in (None, torch.Generator().manual_seed(1)):
        rows = [SamplingRow(SamplingParams(temperature=1.175494351e-38), gen, (), ())] * 4
        out = sample(logits.clone(), rows, torch.Generator().manual_seed(0)).token_ids
        assert all(0 <= t < V for t in out), out


def test_a_seeded_row_draws_exponential_noise_from_its_own_generator():
    # Seeded rows keep argmax(p / E) with E from their own generator, so a seed gives the same tokens
    # as before unseeded rows moved to the inverse-CDF draw, whatever shares the batch.
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    rows = [SamplingRow(SamplingParams(), gens[0], (), ()), SamplingRow(SamplingParams(), None, (), ()),
            SamplingRow(SamplingParams(), gens[1], (), ())]
    got = sample(logits.clone(), rows, torch.Generator().manual_seed(0)).token_ids
    for row, seed in ((0, 11), (2, 12)):
        noise = torch.empty(V).exponential_(generator=torch.Generator().manual_seed(seed)).clamp_min_(1e-20)
        assert got[row] == int((logits[row].softmax(-1) / noise).argmax())


def test_top_k_top_p_touch_only_the_rows_that_set_them():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    out = apply_top_k_top_p(logits.clone(), [0, 3, V, 0], [1.0, 1.0, 1.0, 0.5])
    torch.testing.assert_close(out[[0, 2]], logits[[0, 2]], rtol=0, atol=0)  # no top_k/top_p: unchanged
    assert (out[1] > float("-inf")).sum() == 3 and set(out[1].topk(3).indices.tolist()) == set(logits[1].topk(3).indices.tolist())
    kept = out[3] > float("-inf")
    probs = logits[3].softmax(-1)
    assert probs[kept].sum() >= 0.5 and probs[kept].sum() - probs[kept].min() < 0.5  # the smallest nucleus
    assert apply_top_k_top_p(logits, [0] * 4, [1.0] * 4) is logits  # nothing to do: no sort, no copy


def test_penalties_follow_the_openai_and_vllm_formulas():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [SamplingRow(p, None, prompt_ids=[3], output_ids=[0, 0, 1])])
    expected = torch.tensor([[1.0 / 2 - 0.5 - 0.5, -1.0 * 2 - 0.5 - 0.25, 2.0, 0.5 / 2]])
    torch.testing.assert_close(out, expected)


def test_a_seeded_request_reproduces_alone_and_in_a_busy_batch():
    model = diverse_model()
    p = prompt(9, seed=5)
    mine = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, chains=3)
    alone = make_engine(model).generate([req(p, rid="mine", **mine)])["mine"][0].token_ids
    rng = random.Random(0)
    others = [req(prompt(rng.randint(1, 30), seed=i), chains=rng.randint(1, 4), temperature=1.0,
                  seed=rng.choice([None, i]), max_tokens=rng.randint(2, 20)) for i in range(12)]
    busy = make_engine(model, max_num_batched_tokens=24).generate(others[:6] + [req(p, rid="mine", **mine)] + others[6:])
    assert busy["mine"][0].token_ids == alone
    other_seed = make_engine(model).generate([req(p, rid="mine", **{**mine, "seed": 99})])["mine"][0].token_ids
    assert other_seed != alone


def test_n_completions_share_one_prefill():
    model = diverse_model()
    p, n, m = prompt(30, seed=2), 3, 10
    eng = make_engine(model)
    eng.add_request(req(p, rid="once", n=n, temperature=1.0, seed=7, max_tokens=m))
    eng.step()  # the prompt, once: then the n completions share its blocks
    r = eng.requests["once"]
    assert r.forked and [s.num_computed_tokens for s in r.seqs] == [len(p)] * n
    assert all(eng.blocks.pools[0].ref[b] == n for b in r.seqs[0].block_tables[0][:-1])
    eng.abort("once")
    eng.take_pending()
    out = eng.generate([req(p, rid="r", n=n, temperature=1.0, seed=7, max_tokens=m)])["r"]
    assert len({tuple(c.token_ids) for c in out}) == n
    for i, c in enumerate(out):  # completion i samples as a lone request seeded seed + i would
        single = make_engine(model).generate([req(p, rid="s", temperature=1.0, seed=7 + i, max_tokens=m)])
        assert c.token_ids == single["s"][0].token_ids
    assert eng.blocks.num_free == eng.blocks.num_total


def test_logprobs_are_the_models_top_n():
    model = diverse_model()
    p = prompt(7, seed=1)
    out = make_engine(model).generate([req(p, rid="r", chains=2, max_tokens=3, logprobs=4)])["r"][0]
    ids = torch.tensor([p + out.token_ids])
    with torch.no_grad():
        ref = model.logits(model(ids, chains=2), 2).log_softmax(-1)[0, len(p) - 1 : -1]  # [3, V]
    for step, lp in enumerate(out.logprobs):
        top = ref[step].topk(4)
        assert [t for t, _, _ in lp.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, _, v in lp.top]), top.values, atol=1e-4, rtol=0)
        assert lp.token_id == out.token_ids[step] == top.indices[0]  # greedy picks the top token
        assert abs(lp.logprob - ref[step, lp.token_id]) < 1e-4


def test_stop_strings_and_stop_token_ids_end_a_completion():
    model = diverse_model()
    p = prompt(6, seed=4)
    eng = make_engine(model)
    full = eng.generate([req(p, rid="a", max_tokens=24)])["a"][0]
    assert len(full.text) > 12
    tok = eng.tokenizer
    # A stop string across a token boundary: the end of token 3's text plus the start of token 4's.
    texts = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    i = next(i for i in range(2, 20) if len(texts[i]) > len(texts[i - 1]) + 1 and len(texts[i + 1]) > len(texts[i]))
    stop = texts[i][-2:] + texts[i + 1][len(texts[i])]
    cut = make_engine(model).generate([req(p, rid="b", max_tokens=24, stop=(stop,))])["b"][0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    tid = full.token_ids[5]
    by_id = make_engine(model).generate([req(p, rid="c", max_tokens=24, stop_token_ids=(tid,))])["c"][0]
    first = full.token_ids.index(tid)
    assert by_id.token_ids == full.token_ids[: first + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tid
    assert by_id.text == tok.decode(full.token_ids[:first])  # the stop token's text is not output
    assert full.finish_reason == "length"
