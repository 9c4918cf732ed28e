"""Prompt logprobs: the log-probability of every prompt token (and its top-N), computed in the prefill
and only for the requests that ask (SamplingParams.prompt_logprobs); every other request's prefill
still returns one logit row.

The logit row of position p predicts token p + 1. A prefill chunk over positions [s, e) of a P-token
prompt therefore scores tokens max(s + 1, scored)..min(e, P - 1), where `scored` is how many prompt
positions already have an entry (position 0 has None: nothing predicts it). Its trailing rows from
position (first token scored) - 1 are returned (SeqSpec.num_logits); the last one is the usual
sampling row, which at e == P predicts the first generated token and is not a prompt entry. A chunk
computed again (preemption, recompute to more chains) scores nothing twice.
"""

from __future__ import annotations

import torch

from colm_runtime.engine.sampler import logprobs_of
from colm_runtime.engine.sequence import Sequence

# One scored prompt token: (logprob, top-N ids, top-N logprobs, rank of the token, 1 = most likely).
Scored = tuple[float, list[int], list[float], int]


def rows_needed(seq: Sequence, n: int) -> int:
    """Logit rows a chunk of n tokens from seq.num_computed_tokens must return to score the prompt
    tokens it predicts for the first time (0: it scores none, or the request did not ask)."""
    scored = seq.request.prompt_scored
    if scored is None:
        return 0
    s, e, P = seq.num_computed_tokens, seq.num_computed_tokens + n, seq.num_prompt_tokens
    first, last = max(s + 1, len(scored)), min(e, P - 1)
    if first > last:
        return 0
    assert first == len(scored), "prompt chunks are scored in order"
    return e - first + 1


def record(seq: Sequence, rows: torch.Tensor) -> None:
    """Score the prompt tokens a chunk predicts, from the rows_needed rows it returned: [R, V] fp32."""
    scored = seq.request.prompt_scored
    first = len(scored)
    # rows are positions first-1 .. first+len-2, predicting tokens first .. first+len-1; the prompt's
    # end cuts the last one off when it predicts the first generated token.
    count = min(rows.shape[0], seq.num_prompt_tokens - first)
    rows = rows[:count]  # [count, V]
    targets = seq.token_ids[first : first + count]
    found = logprobs_of(rows, targets, [seq.params.prompt_logprobs or 0] * count)
    ids = torch.tensor(targets, device=rows.device)[:, None]
    ranks = ((rows > rows.gather(1, ids)).sum(dim=1) + 1).tolist()  # order of logits = order of logprobs
    scored.extend((c, ti, tv, rank) for (c, ti, tv), rank in zip(found, ranks))
