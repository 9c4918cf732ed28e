"""A request's greedy output does not depend on what else is in the batch.

Each request runs alone (a fresh engine, nothing else computed) and inside a busy continuous batch of
mixed chain counts, prompt lengths and arrival times, with prompts chunked across steps; the tokens
must be identical. The model (std 0.5 init) gives varied continuations, so a wrong K/V slot, a wrong
chain slice or a mixed-up row would change them.
"""

from __future__ import annotations

import random

import pytest

from tests.engine._helpers import diverse_model, make_engine, prompt, req


def run_staggered(engine, requests, per_step: int = 3, every: int = 2) -> dict[str, list[int]]:
    """Add `per_step` requests every `every` steps while the batch runs; collect each one's tokens."""
    pending, outs, step = list(requests), {r.request_id: [] for r in requests}, 0
    while pending or engine.has_unfinished:
        if pending and step % every == 0:
            for _ in range(per_step):
                if pending:
                    engine.add_request(pending.pop(0))
        for o in engine.step():
            outs[o.request_id].extend(o.token_ids)
        step += 1
    return outs


def alone(model, r) -> list[int]:
    out = make_engine(model).generate([req(r.prompt_token_ids, chains=r.chains, max_tokens=r.params.max_tokens)])
    return next(iter(out.values()))[0].token_ids


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["colm", "colm-air"])
def test_greedy_output_is_the_same_alone_and_in_a_busy_mixed_batch(kv_sharing):
    model = diverse_model(kv_sharing=kv_sharing)
    rng = random.Random(1)
    requests = [req(prompt(rng.randint(1, 40), seed=i), chains=rng.randint(1, 4), max_tokens=rng.randint(4, 20))
                for i in range(24)]
    busy = run_staggered(make_engine(model, max_num_batched_tokens=48), requests)
    outputs = set()
    for r in requests:
        assert busy[r.request_id] == alone(model, r), f"request at {r.chains} chains differs"
        outputs.add(tuple(busy[r.request_id]))
    assert len(outputs) > 20  # the continuations really vary: a mix-up could not go unnoticed


def test_the_chain_count_changes_the_output():
    """The property above would hold trivially if every chain count computed the same thing."""
    model = diverse_model()
    p = prompt(12, seed=3)
    outs = {tuple(alone(model, req(p, chains=k, max_tokens=12))) for k in (1, 2, 3, 4)}
    assert len(outs) == 4
