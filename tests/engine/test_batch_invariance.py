"""A request's greedy output does not depend on what else is in the batch.

Each request runs alone (a fresh engine, nothing else computed) and inside a busy continuous batch of
mixed chain counts, prompt lengths and arrival times, with prompts chunked across steps; the tokens
must be identical. The model (std 0.5 init) gives varied continuations, so a wrong K/V slot, a wrong
chain slice or a mixed-up row would change them.

The logits themselves are not bitwise identical: fp32 BLAS and SDPA kernels sum in an order that
depends on the batch shape (a lone row takes a GEMV path, a prompt in chunks attends in pieces), so
log-probabilities differ by ~1e-5. They are checked to 1e-4; a greedy token could only flip on a
near-tie closer than that, which these runs do not contain (checked, deterministic on a machine).
"""

from __future__ import annotations

import random

import pytest

from tests.engine._helpers import diverse_model, make_engine, prompt, req


def run_staggered(engine, requests, per_step: int = 3, every: int = 2) -> dict[str, tuple[list, list]]:
    """Add `per_step` requests every `every` steps while the batch runs; each one's tokens and logprobs."""
    pending, outs, step = list(requests), {r.request_id: ([], []) for r in requests}, 0
    while pending or engine.has_unfinished:
        if pending and step % every == 0:
            for _ in range(per_step):
                if pending:
                    engine.add_request(pending.pop(0))
        for o in engine.step():
            outs[o.request_id][0].extend(o.token_ids)
            outs[o.request_id][1].extend(o.logprobs)
        step += 1
    return outs


def alone(model, r) -> tuple[list, list]:
    out = make_engine(model).generate([req(r.prompt_token_ids, chains=r.chains, max_tokens=r.params.max_tokens,
                                           logprobs=r.params.logprobs)])
    c = next(iter(out.values()))[0]
    return c.token_ids, c.logprobs


def assert_close_logprobs(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert [t for t, _, _ in x.top] == [t for t, _, _ in y.top]
        assert max(abs(u - v) for (_, _, u), (_, _, v) in zip(x.top, y.top)) < 1e-4


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["colm", "colm-air"])
def test_greedy_output_is_the_same_alone_and_in_a_busy_mixed_batch(kv_sharing):
    model = diverse_model(kv_sharing=kv_sharing)
    rng = random.Random(1)
    requests = [req(prompt(rng.randint(1, 40), seed=i), chains=rng.randint(1, 4), max_tokens=rng.randint(4, 20),
                    logprobs=3) for i in range(24)]
    busy = run_staggered(make_engine(model, max_num_batched_tokens=48), requests)
    outputs = set()
    for r in requests:
        tokens, logprobs = alone(model, r)
        assert busy[r.request_id][0] == tokens, f"request at {r.chains} chains differs"
        assert_close_logprobs(busy[r.request_id][1], logprobs)
        outputs.add(tuple(tokens))
    assert len(outputs) > 20  # the continuations really vary: a mix-up could not go unnoticed


def test_the_chain_count_changes_the_output():
    """The property above would hold trivially if every chain count computed the same thing."""
    model = diverse_model()
    p = prompt(12, seed=3)
    outs = {tuple(alone(model, req(p, chains=k, max_tokens=12))[0]) for k in (1, 2, 3, 4)}
    assert len(outs) == 4
