"""No leak: after thousands of random add / abort / finish operations, with prefix caching on and prompts
that share prefixes, every block is free or cached-and-unreferenced, and the cache empties to full free
pools."""

from __future__ import annotations

import random

from colm_runtime.model import CoLMModel
from colm_runtime.testing import small_config
from tests.engine._helpers import assert_all_free, kv_bytes, make_engine, prompt, req


def test_random_add_abort_finish_leaves_every_block_free():
    # A 1-layer model keeps this fast; the bookkeeping is what is under test.
    for kv_sharing in (False, True):
        model = CoLMModel(small_config(n_layers=1, kv_sharing=kv_sharing)).init_weights(seed=0, std=0.5).eval()
        # A small cache, tapered, so that shrinking and preemption happen too.
        eng = make_engine(model, block_size=4, max_num_batched_tokens=40, max_num_seqs=12,
                          kv_cache_memory=kv_bytes(model.cfg, 24), pool_weights=(4, 3, 2, 1)[: model.cfg.n_kv_pools])
        rng = random.Random(kv_sharing)
        stems = [prompt(rng.randint(4, 14), seed=1000 + s) for s in range(5)]
        live: list[str] = []
        for i in range(2000):
            op = rng.random()
            if op < 0.45:
                n = rng.choice([1, 1, 1, 2, 3])
                chains = rng.randint(1, 4)
                shared = rng.choice(stems)[: rng.randint(1, 14)]  # prompts share prefixes: the cache is used
                r = req(shared + prompt(rng.randint(0, 8), seed=i), chains=chains, min_chains=rng.randint(1, chains),
                        max_tokens=rng.randint(1, 12), n=n, priority=rng.randint(0, 2),
                        temperature=rng.choice([0.0, 1.0]), stop_token_ids=(rng.randrange(512),))
                eng.add_request(r)
                live.append(r.request_id)
            elif op < 0.6 and live:
                eng.abort(live.pop(rng.randrange(len(live))))
            for o in eng.step():
                if o.finished and o.request_id not in eng.requests and o.request_id in live:
                    live.remove(o.request_id)
        while eng.has_unfinished:
            eng.step()
        assert_all_free(eng)
        s = eng.stats()
        assert s.steps_total > 1500 and sum(s.prefix_cache_hits) > 0
        assert s.preemptions_total > 0 and (kv_sharing or s.shrinks_total > 0), "pressure was not exercised"

