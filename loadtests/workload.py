"""The requests of a phase, drawn up front from a seeded generator (same seed, same traffic).

Drawing everything before the first send keeps the arrival process exact (no RNG work between
sends) and makes two phases with the same seed differ only in what the comparison changes, such as
elastic against pinned chain selection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtests.spec import LoadSpec, Selection

# Token ids below 256 exist in every byte-level BPE vocabulary (and in most others); the low ids
# are often special tokens, so prompts start above them.
TOKEN_RANGE = (32, 256)
_WORDS = ("the chain model serves many sizes from one copy of its weights while the scheduler batches "
          "requests of every width together and the cache keeps keys and values for each chain").split()


@dataclass(frozen=True)
class RequestPlan:
    """One request to send: when (seconds after the phase starts; open loop only), what, and whether
    its client disconnects after `cancel_after` streamed tokens (None: reads to the end)."""

    index: int
    send_at: float
    prompt: list[int] | str
    prompt_tokens: int
    max_tokens: int
    selection: Selection
    cancel_after: int | None = None


def _prompt(rng: random.Random, n: int, fmt: str, token_range: tuple[int, int]) -> list[int] | str:
    if fmt == "tokens":
        return [rng.randrange(*token_range) for _ in range(n)]
    return " ".join(rng.choice(_WORDS) for _ in range(n))  # about one token a word


def _arrivals(spec: LoadSpec, rng: random.Random):
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(spec.rate) if spec.arrival == "poisson" else 1.0 / spec.rate


def make_plans(spec: LoadSpec, token_range: tuple[int, int] = TOKEN_RANGE) -> list[RequestPlan]:
    """At most spec.max_requests plans; open-loop arrivals past duration_s are dropped."""
    rng = random.Random(spec.seed)
    weights = [s.weight for s in spec.mix]
    plans = []
    arrivals = _arrivals(spec, random.Random(spec.seed + 1))  # own stream: same arrivals for any mix
    for i in range(spec.max_requests):
        send_at = 0.0 if spec.arrival == "users" else next(arrivals)
        if send_at > spec.duration_s:
            break
        n_prompt, n_out = spec.prompt_tokens.sample(rng), spec.output_tokens.sample(rng)
        selection = rng.choices(spec.mix, weights)[0]
        cancel = None
        if spec.cancel_share and rng.random() < spec.cancel_share:
            cancel = rng.randint(1, n_out - 1) if n_out > 1 else 0
        plans.append(RequestPlan(i, send_at, _prompt(rng, n_prompt, spec.prompt_format, token_range),
                                 n_prompt, n_out, selection, cancel))
    return plans
