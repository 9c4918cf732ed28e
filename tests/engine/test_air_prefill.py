"""CoLM-Air prefill acceleration: prompts are computed at 1 chain (the KV cache comes from chain 1),
only each sequence's last prompt token at its chain count; outputs equal the full-chain reference."""

from __future__ import annotations

import random

import torch

from tests.engine._helpers import diverse_model, make_engine, prompt, req


def spy_chains(engine) -> list[tuple[int, int]]:
    """Record (chain count, tokens) of every sequence the model computes."""
    seen: list[tuple[int, int]] = []
    real = engine.model.forward_step

    def forward_step(batch, cache):
        starts = [0] + (batch.last_rows[:-1] + 1).tolist()
        seen.extend((c, last - s + 1) for c, s, last in zip(batch.seq_chains, starts, batch.last_rows.tolist()))
        return real(batch, cache)

    engine.model.forward_step = forward_step
    return seen


def test_air_prompts_run_at_one_chain_and_match_the_full_chain_reference():
    model = diverse_model(kv_sharing=True)
    rng = random.Random(5)
    requests = [req(prompt(rng.randint(8, 30), seed=i), chains=rng.randint(2, 4), max_tokens=6, rid=f"r{i}",
                    logprobs=3) for i in range(6)]
    fast = make_engine(model, max_num_batched_tokens=20)
    seen = spy_chains(fast)
    got = fast.generate(requests)
    assert any(c == 1 and n > 1 for c, n in seen), "no prompt chunk ran at one chain"
    assert all(c == 1 for c, n in seen if n > 1), "a prompt chunk ran above one chain"
    slow = make_engine(model, max_num_batched_tokens=20, air_prefill_one_chain=False).generate(requests)
    for r in requests:
        a, b = got[r.request_id][0], slow[r.request_id][0]
        assert a.token_ids == b.token_ids
        ids = torch.tensor([r.prompt_token_ids + a.token_ids])
        with torch.no_grad():  # the plain full causal forward at the request's chain count
            ref = model.logits(model(ids, chains=r.chains), r.chains).log_softmax(-1)[0, len(r.prompt_token_ids) - 1:]
        for step, lp in enumerate(a.logprobs):
            assert lp.token_id == int(ref[step].argmax())
            assert abs(lp.logprob - float(ref[step, lp.token_id])) < 1e-4


def test_plain_colm_prompts_keep_their_chain_count():
    model = diverse_model()
    eng = make_engine(model)
    seen = spy_chains(eng)
    eng.generate([req(prompt(12), chains=3, max_tokens=2)])
    assert seen[0] == (3, 12)


def test_air_prefill_is_chunked_so_a_long_prompt_never_stalls_running_decodes():
    model = diverse_model(kv_sharing=True)
    eng = make_engine(model, max_num_batched_tokens=16)
    seen = spy_chains(eng)
    eng.add_request(req(prompt(5, seed=1), chains=4, max_tokens=40, rid="decoding"))
    eng.step()
    eng.add_request(req(prompt(200, seed=2), chains=4, max_tokens=3, rid="long"))
    first, long_tokens = None, []
    for step in range(30):
        before = len(seen)
        outs = eng.step()
        assert any(o.request_id == "decoding" for o in outs), f"step {step}: the decode stalled"
        assert sum(n for _, n in seen[before:]) <= 16
        long_tokens += [t for o in outs if o.request_id == "long" for t in o.token_ids]
        if first is None and long_tokens:
            first = step
    assert first is not None and first >= 200 // 15 - 1, "the long prompt was not chunked"
    ref = make_engine(model, air_prefill_one_chain=False, max_num_batched_tokens=4096)
    got = ref.generate([req(prompt(200, seed=2), chains=4, max_tokens=3, rid="long")])
    assert long_tokens == got["long"][0].token_ids  # chunked 1-chain prefill == one full-chain prefill
