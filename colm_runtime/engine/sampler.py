"""Batched sampling: one set of tensor operations per step for every row, whatever its parameters.

Penalties (repetition over prompt + output, presence and frequency over the output, OpenAI/vLLM
semantics), then greedy rows take the argmax and the others are sampled after temperature, top-k,
top-p and min-p. A row with a seed draws exponential noise E from its own torch.Generator and takes
argmax(p / E) (equivalent to drawing from p), so its samples depend on its seed and its own history
only, never on the other rows of the batch. Rows without a seed share the engine's generator and
draw one uniform each through their CDF (inverse transform): the same distribution, at a cumsum's
cost, where B x V exponentials cost ~55 ms per step at B = 32, V = 49,152 on a 2-core CPU. Work no row needs is skipped: the
vocabulary sort of top-k/top-p runs only on the rows that set them. Logprobs are the model's (before
penalties and temperature), as vLLM returns them by default.

Constraints come after the penalties (`constrain`): a row's logit_bias is added, and a structured-output
row's grammar mask (a packed bitmask of allowed tokens, engine/grammar.py) sets every other token to
-inf, both as tensor ops on the rows that have them; rows without constraints are not copied or touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from colm_runtime.engine.types import SamplingParams
from colm_runtime.model import cpu_kernels


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one row: its parameters, its generator and its token history."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]


@dataclass(frozen=True)
class TokenMasks:
    """Grammar masks of some rows: bitmask[j] packs the allowed tokens of row rows[j] (bit t % 32 of
    word t // 32)."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(V / 32)] int32


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    # per row: None, or (logprob of the chosen token, top-N ids, top-N logprobs)
    logprobs: list[tuple[float, list[int], list[float]] | None]


def _col(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)[:, None]  # [B, 1]


def _token_mask(rows: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """counts[i, t]: occurrences of token t in rows[i]. -> [B, V] float"""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    if width:
        ids = torch.tensor([list(r) + [vocab] * (width - len(r)) for r in rows], device=device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]  # column `vocab` collected the padding


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits: [B, V] fp32
    ps = [r.params for r in rows]
    if all(p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1 for p in ps):
        return logits
    dev, V = logits.device, logits.shape[1]
    out_counts = _token_mask([r.output_ids for r in rows], V, dev)
    rep = _col([p.repetition_penalty for p in ps], torch.float32, dev)
    if any(p.repetition_penalty != 1 for p in ps):
        seen = (_token_mask([r.prompt_ids for r in rows], V, dev) + out_counts) > 0
        scaled = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, scaled, logits)
    freq = _col([p.frequency_penalty for p in ps], torch.float32, dev)
    pres = _col([p.presence_penalty for p in ps], torch.float32, dev)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


NEG_INF_BITS = -8388608  # 0xFF800000 as int32: the bits of float32 -inf


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, W] int32 packed -> [R, vocab] int32, 1 where allowed, 0 elsewhere."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).view(bitmask.shape[0], -1)[:, :vocab]


def mask_penalty(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, W] int32 packed -> [R, vocab] float32: 0 where allowed, -inf elsewhere, built with integer
    ops (allowed - 1 is 0 or all ones; & with -inf's bits). Adding it masks exactly (x + 0 == x) and
    without a branch per element: masked_fill with a grammar's irregular mask is much slower on CPU
    (measured: docs/engine.md, "Benchmarks")."""
    return ((unpack_bitmask(bitmask, vocab) - 1) & NEG_INF_BITS).view(torch.float32)


def constrain(logits: torch.Tensor, biases: Sequence[tuple[tuple[int, float], ...]],
              masks: TokenMasks | None = None) -> torch.Tensor:
    """Add each row's logit_bias ((token, bias) pairs), then mask the rows in masks to their allowed
    tokens (-inf elsewhere). logits: [B, V]; returns a new tensor if any row is constrained, else logits
    itself (the caller's raw logits stay intact for logprobs)."""
    bias_rows = [i for i, b in enumerate(biases) if b]
    if not bias_rows and masks is None:
        return logits
    logits, dev = logits.clone(), logits.device
    if bias_rows:
        r = torch.tensor([i for i in bias_rows for _ in biases[i]], device=dev)
        t = torch.tensor([tok for i in bias_rows for tok, _ in biases[i]], device=dev)
        v = torch.tensor([b for i in bias_rows for _, b in biases[i]], dtype=logits.dtype, device=dev)
        logits.index_put_((r, t), v, accumulate=True)
    if masks is not None:
        rows = torch.tensor(masks.rows, device=dev)
        penalty = mask_penalty(masks.bitmask.to(dev, non_blocking=True), logits.shape[1])  # [R, V]
        logits.index_add_(0, rows, penalty.to(logits.dtype))
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) all but each row's top_k tokens and its top_p nucleus (at least one kept).
    Only the rows that set top_k or top_p are sorted (a [B, V] sort is the sampler's costliest op)."""
    V = logits.shape[1]
    need = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if 0 < k < V or p < 1]
    if not need:
        return logits
    if len(need) == len(top_k):
        return _mask_top_k_top_p(logits, top_k, top_p)
    idx = torch.tensor(need, device=logits.device)
    masked = _mask_top_k_top_p(logits.index_select(0, idx), [top_k[i] for i in need], [top_p[i] for i in need])
    return logits.index_copy(0, idx, masked)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    B, V = logits.shape
    srt, idx = logits.sort(dim=-1, descending=False)  # ascending: the best token is last
    mask = torch.zeros_like(srt, dtype=torch.bool)
    if any(0 < k < V for k in top_k):
        k = _col([k if 0 < k < V else V for k in top_k], torch.long, logits.device)
        mask |= torch.arange(V, device=logits.device)[None, :] < V - k
    if any(p < 1 for p in top_p):
        probs = srt.masked_fill(mask, float("-inf")).softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        mask |= cum <= 1 - _col(top_p, torch.float32, logits.device)
        mask[:, -1] = False
    return logits.scatter(1, idx, srt.masked_fill(mask, float("-inf")))


def _seeded_draws(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """argmax(p / E) with E [B, V] exponential noise from each row's own generator -> [B] token ids."""
    q = torch.empty_like(probs, dtype=torch.float32)
    for i, g in enumerate(gens):
        q[i].exponential_(generator=g)
    return (probs / q.clamp_min_(1e-20)).argmax(dim=-1)  # never divide by zero: p = 0 stays at 0


def _inverse_cdf_draws(probs: torch.Tensor, default: torch.Generator) -> torch.Tensor:
    """One uniform u per row, scaled to the row's total mass (probs need not sum to 1), and the first
    token whose cumulative mass exceeds it -> [B] token ids. The CDF is summed in float64 and u stays
    strictly below the total, so a token of probability 0 (its CDF equals its predecessor's) is never
    the first to exceed u."""
    cdf = probs.to(torch.float64).cumsum_(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=default, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max_(probs.shape[1] - 1)
    # A degenerate row (no finite positive mass: inf or NaN logits from extreme penalties or a tiny
    # temperature) takes its argmax, as argmax(p / E) did: always a token id, never one past the end.
    bad = ~(torch.isfinite(total[:, 0]) & (total[:, 0] > 0))
    if bad.any():  # rare: pay for an argmax only then
        idx = torch.where(bad, probs.argmax(dim=-1), idx)
    return idx


def processed_probs(logits: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """The distribution a non-greedy row samples from: temperature, top-k, top-p, then min-p (the
    kept probabilities are not renormalised: sampling and speculative acceptance only need ratios).
    logits: [B, V] fp32 after penalties -> [B, V]."""
    sub = logits / _col([p.temperature for p in ps], torch.float32, logits.device)
    sub = apply_top_k_top_p(sub, [p.top_k for p in ps], [p.top_p for p in ps])
    probs = sub.softmax(dim=-1)
    if any(p.min_p > 0 for p in ps):
        floor = _col([p.min_p for p in ps], torch.float32, logits.device) * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def sample(logits: torch.Tensor, rows: list[SamplingRow], default: torch.Generator,
           masks: TokenMasks | None = None) -> SamplerOutput:
    """Pick one token per row. logits: [B, V] fp32 (modified in place is fine: the caller's copy);
    masks: the grammar masks of the structured-output rows."""
    raw = logits
    ps = [r.params for r in rows]
    logits = constrain(apply_penalties(logits, rows), [p.logit_bias for p in ps], masks)
    rand = [i for i, p in enumerate(ps) if not p.greedy]
    if len(rand) < len(ps):  # the greedy rows' argmax (an argmax over [B, V] costs ~3 ms at B = 32)
        greedy = [i for i, p in enumerate(ps) if p.greedy]
        tokens = (logits if not rand else logits[greedy]).argmax(dim=-1)
        if rand:
            tokens = torch.empty(len(ps), dtype=tokens.dtype, device=tokens.device).index_copy_(
                0, torch.tensor(greedy, device=tokens.device), tokens)
    else:
        tokens = torch.empty(len(ps), dtype=torch.long, device=logits.device)
    if rand and cpu_kernels.sample_ok(logits):  # rows without a seed: a C pass or two each, no [B, V] sort
        free = [i for i in rand if rows[i].generator is None]
        if free:
            sub = logits if len(free) == len(ps) else logits[free]
            u = torch.rand(len(free), generator=default, dtype=torch.float64)
            cuts = [None] * 3
            if not all(_plain(ps[i], logits.shape[1]) for i in free):
                cuts = [[ps[i].top_k for i in free], [ps[i].top_p for i in free], [ps[i].min_p for i in free]]
            drawn = cpu_kernels.sample_rows(sub, [ps[i].temperature for i in free], u, *cuts)
            ok = drawn >= 0
            done = [i for i, good in zip(free, ok.tolist()) if good]  # a degenerate row (-1) goes the torch way
            tokens[done] = drawn[ok]
            drawn_rows = set(done)
            rand = [i for i in rand if i not in drawn_rows]
    if rand:
        sub = logits if len(rand) == len(ps) else logits[rand]
        probs = processed_probs(sub, [ps[i] for i in rand])
        seeded = [j for j, i in enumerate(rand) if rows[i].generator is not None]
        free = [j for j, i in enumerate(rand) if rows[i].generator is None]
        picked = torch.empty(len(rand), dtype=tokens.dtype, device=tokens.device)
        if free:
            picked[free] = _inverse_cdf_draws(probs if len(free) == len(rand) else probs[free], default)
        if seeded:
            picked[seeded] = _seeded_draws(probs[seeded], [rows[rand[j]].generator for j in seeded])
        tokens[rand] = picked
    token_list = tokens.tolist()
    return SamplerOutput(token_list, token_logprobs(raw, token_list, ps))


def _plain(p: SamplingParams, vocab: int) -> bool:
    """Temperature alone shapes this row's distribution (no top-k, top-p or min-p)."""
    return not 0 < p.top_k < vocab and p.top_p >= 1 and p.min_p <= 0


def token_logprobs(raw: torch.Tensor, tokens: list[int], ps: list[SamplingParams]) -> list:
    """Per row: None, or (logprob of tokens[i], top-N ids, top-N logprobs) from the raw logits [B, V]."""
    want = [i for i, p in enumerate(ps) if p.logprobs is not None]
    out: list = [None] * len(ps)
    if want:
        found = logprobs_of(raw[want], [tokens[i] for i in want], [ps[i].logprobs or 0 for i in want])
        for i, lp in zip(want, found):
            out[i] = lp
    return out


def logprobs_of(raw: torch.Tensor, tokens: list[int], tops: list[int]) -> list[tuple[float, list[int], list[float]]]:
    """(logprob of tokens[i], top-tops[i] ids, their logprobs) of each row of raw logits [B, V]."""
    lp = raw.log_softmax(dim=-1)
    top_v, top_i = lp.topk(max(max(tops), 1), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=raw.device)[:, None])[:, 0].tolist()
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [(c, ti[:k], tv[:k]) for c, ti, tv, k in zip(chosen, top_i, top_v, tops)]
