"""Self-speculative decoding: a CoLM drafts with its own first chains and verifies with all of them.

A chain model contains its smaller models: the first d chains of a k-chain request are a complete
d-chain model that shares the request's weights and (CoLM-Air) its KV cache. Each verify step:

1. propose: gamma one-token forwards at d chains (the draft), batched over the speculating sequences,
   write their K/V into pools 0..pools_for(d)-1 only (CoLM-Air: the one shared pool, so drafting needs
   no KV memory of its own; plain CoLM: pool 0 for d = 1) and sample x_1..x_gamma from q;
2. verify: the step's main forward (with every other sequence of the batch) computes the sequence's
   last token and x_1..x_gamma at k chains and returns the target logits of all gamma + 1 rows;
3. accept x_i with probability min(1, p(x_i) / q(x_i)); at the first rejection sample from
   norm(max(0, p - q)); when all are accepted, sample a bonus token from p (Leviathan et al. 2023).
   The output follows p exactly; greedy rows accept while the draft equals the target's argmax, so
   they produce the plain greedy tokens. Rejected positions roll back: num_computed_tokens counts only
   the accepted tokens and blocks past them are released (their stale K/V is overwritten later).

Constrained rows (logit_bias, structured outputs) draft and verify the same constrained distributions:
while drafting, a structured-output sequence's matcher consumes each draft token, so the mask of draft
position i is the grammar state after the accepted prefix plus x_1..x_i; the gamma + 1 masks are kept
for the verify rows, and the matcher is rolled back to the last real token before the accepted tokens
are appended (and consumed) as usual.

Gamma adapts per sequence: an exponential moving average of the acceptance rate alpha picks the gamma
that maximises the expected tokens per verify, (1 - alpha^(gamma+1)) / (1 - alpha), per unit of cost
1 + gamma * c, where c is the measured time of a draft forward over that of a verify step (moving
averages; before the first measurement the FLOP ratio d / k). On a CPU or at tiny sizes per-step
overhead makes c much larger than d / k. When alpha falls below c even gamma 1 loses, so the sequence
decodes plainly and re-probes every PROBE_EVERY tokens.

A throughput gate on top: the seconds per generated token of decode-only steps with and without
speculation are tracked as moving averages, and while speculating is the slower of the two at the
current load (large batches: verifying gamma + 1 tokens per sequence costs more than the drafts save)
nobody speculates. Every PROBE_EVERY steps one step speculates and one does not, so both stay measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from colm_runtime.engine.grammar import fill_bitmask
from colm_runtime.engine.sampler import TokenMasks, constrain, processed_probs
from colm_runtime.engine.sequence import Sequence
from colm_runtime.model import SeqSpec
from colm_runtime.stats import ema

if TYPE_CHECKING:
    from colm_runtime.engine.runner import ModelRunner

ALPHA_EMA = 0.3  # weight of the newest verify in the acceptance-rate average
ALPHA_PRIOR = 0.7  # assumed acceptance rate before the first verify
PROBE_EVERY = 16  # a sequence whose drafts do not pay off still verifies one draft every this many tokens


@dataclass
class Draft:
    """gamma proposed tokens of one sequence and, for sampled rows, their draft distributions."""

    tokens: list[int]
    q: torch.Tensor | None  # [gamma, V] normalised draft probabilities; None for greedy rows
    masks: list[torch.Tensor] | None = None  # structured outputs: gamma + 1 packed masks [W] of the verify rows
    consumed: int = 0  # draft tokens its matcher consumed (EOS is not), rolled back after drafting


def eligible(seq: Sequence, draft_chains: int) -> bool:
    """Whether seq may speculate this step: it opted in, decodes above the draft's chain count, and has
    no penalty (a penalty depends on the tokens before each position, which drafting would change)."""
    p = seq.params
    return (seq.speculative and seq.num_chains > draft_chains and seq.num_uncomputed == 1
            and p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1)


def best_gamma(alpha: float, max_gamma: int, cost: float) -> int:
    """The gamma in 1..max_gamma with the most expected tokens per unit of verify cost."""
    a = min(max(alpha, 1e-3), 0.999)
    return max(range(1, max_gamma + 1), key=lambda g: (1 - a ** (g + 1)) / (1 - a) / (1 + g * cost))


class SpeculativeDecoder:
    """Plans each sequence's lookahead, drafts, accepts, and counts proposed and accepted tokens."""

    def __init__(self, max_gamma: int, draft_chains: int, model_len: int):
        self.max_gamma, self.draft_chains, self.model_len = max_gamma, draft_chains, model_len
        self.proposed_total = 0
        self.accepted_total = 0
        self.throughput_gate = True
        self.tok_s: dict[bool, float | None] = {True: None, False: None}  # s/token, with / without drafts
        self._steps = 0
        self.draft_s: float | None = None  # moving average: seconds per draft forward
        self.verify_s: float | None = None  # moving average: seconds of a step with verification, drafts excluded

    # ---- plan ---------------------------------------------------------------------------------------
    def lookahead(self, seq: Sequence, next_switch: int | None) -> int:
        """Tokens seq drafts this step (0: a plain decode). Never past max_tokens, the context, or the
        next change of its chain schedule (next_switch: generated tokens at which it changes)."""
        if not self.max_gamma or not self.paying or not eligible(seq, self.draft_chains):
            return 0
        done = len(seq.token_ids) - seq.num_prompt_tokens
        room = min(seq.params.max_tokens - done, self.model_len - seq.num_tokens) - 1
        if next_switch is not None:
            room = min(room, next_switch - done - 1)
        alpha = ALPHA_PRIOR if seq.spec_alpha is None else seq.spec_alpha
        cost = self.cost_ratio(seq.num_chains)
        if alpha < cost and done % PROBE_EVERY:
            return 0  # even gamma 1 loses ((1 + alpha) / (1 + cost) < 1): decode plainly, probe now and then
        return max(0, min(room, best_gamma(alpha, self.max_gamma, cost)))

    @property
    def paying(self) -> bool:
        """Whether this step may speculate (the throughput gate; probes both ways now and then)."""
        phase = self._steps % PROBE_EVERY
        if not self.throughput_gate or phase == 0:
            return True
        if phase == PROBE_EVERY // 2:
            return False
        s, p = self.tok_s[True], self.tok_s[False]
        return s is None or p is None or s <= p

    def observe_step(self, seconds: float, tokens: int, speculated: bool, decode_only: bool) -> None:
        """Feed one step: its seconds per generated token (decode-only steps) for the gate."""
        self._steps += 1
        if decode_only and tokens:
            self.tok_s[speculated] = ema(self.tok_s[speculated], seconds / tokens, ALPHA_EMA)

    def cost_ratio(self, chains: int) -> float:
        """A draft forward's cost in verify steps: measured when possible, else the FLOP ratio."""
        if self.draft_s is None or not self.verify_s:
            return self.draft_chains / chains
        return self.draft_s / self.verify_s

    def observe(self, draft_seconds: float, draft_steps: int, verify_seconds: float) -> None:
        """Feed one step's timing: its draft forwards and the rest of the step."""
        self.draft_s = ema(self.draft_s, draft_seconds / draft_steps, ALPHA_EMA)
        self.verify_s = ema(self.verify_s, verify_seconds, ALPHA_EMA)

    # ---- draft --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, runner: "ModelRunner", entries: list[tuple[Sequence, int]]) -> list[Draft]:
        """Run the draft forwards for entries (sequence, gamma) through runner.forward_specs; their K/V
        lands in the draft's pools."""
        d, cfg = self.draft_chains, runner.cfg
        drafts = [Draft([], None, [] if seq.matcher is not None else None) for seq, _ in entries]
        probs: list[list[torch.Tensor]] = [[] for _ in entries]
        for i in range(max(g for _, g in entries)):
            live = [j for j, (_, g) in enumerate(entries) if g > i]
            specs = []
            for j in live:
                seq = entries[j][0]
                tok = seq.token_ids[-1] if i == 0 else drafts[j].tokens[-1]
                specs.append(SeqSpec([tok], seq.num_computed_tokens + i, d, seq.block_tables[: cfg.pools_for(d)]))
            logits = runner.forward_specs(specs)  # [len(live), V]; all at d chains: caller order
            logits = self._constrain([entries[j][0] for j in live], [drafts[j] for j in live], logits)
            best = logits.argmax(dim=-1).tolist()  # one device sync for every greedy row
            for row, j in enumerate(live):
                seq = entries[j][0]
                if seq.params.greedy:
                    drafts[j].tokens.append(best[row])
                    continue
                q = processed_probs(logits[row : row + 1], [seq.params])[0]
                q = q / q.sum()
                drafts[j].tokens.append(int(torch.multinomial(q, 1, generator=runner.generator_for(seq))))
                probs[j].append(q)
            for j in live:  # the grammar follows the draft, so the next position's mask is right
                if drafts[j].masks is not None:
                    drafts[j].consumed += entries[j][0].matcher.consume(drafts[j].tokens[-1])
        for j, p in enumerate(probs):
            if p:
                drafts[j].q = torch.stack(p)
        self._finish_masks(entries, drafts, runner.cfg.vocab_size)
        return drafts

    @staticmethod
    def _constrain(seqs: list[Sequence], drafts: list[Draft], logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [R, V] under each row's logit_bias and grammar; the masks are kept for verify."""
        rows = [r for r, dr in enumerate(drafts) if dr.masks is not None]
        masks = None
        if rows:
            masks = TokenMasks(rows, fill_bitmask([seqs[r].matcher for r in rows], logits.shape[1]))
            for k, r in enumerate(rows):
                drafts[r].masks.append(masks.bitmask[k])
        return constrain(logits, [s.params.logit_bias for s in seqs], masks)

    @staticmethod
    def _finish_masks(entries: list[tuple[Sequence, int]], drafts: list[Draft], vocab: int) -> None:
        """The mask after the whole draft (the bonus position), then the matchers back to the last real
        token: the accepted tokens are consumed again when they are appended."""
        rows = [j for j, dr in enumerate(drafts) if dr.masks is not None]
        if not rows:
            return
        bitmask = fill_bitmask([entries[j][0].matcher for j in rows], vocab)
        for k, j in enumerate(rows):
            drafts[j].masks.append(bitmask[k])
            entries[j][0].matcher.rollback(drafts[j].consumed)

    # ---- verify -------------------------------------------------------------------------------------
    def accept(self, seq: Sequence, target: torch.Tensor, draft: Draft, gen: torch.Generator) -> list[int]:
        """The tokens seq gains from one verify: the accepted prefix of the draft plus one token from the
        target (the correction at the first rejection, else the bonus). target: [gamma + 1, V] logits;
        gen: seq's sampling generator."""
        gamma = len(draft.tokens)
        masks = None if draft.masks is None else TokenMasks(list(range(gamma + 1)), torch.stack(draft.masks))
        target = constrain(target, [seq.params.logit_bias] * (gamma + 1), masks)
        if seq.params.greedy:
            best = target.argmax(dim=-1).tolist()
            a = next((i for i in range(gamma) if draft.tokens[i] != best[i]), gamma)
            out = draft.tokens[:a] + [best[a]]
        else:
            out = accept_sampled(processed_probs(target, [seq.params] * (gamma + 1)), draft, gen)
        self.record(seq, gamma, len(out) - 1)
        return out

    def record(self, seq: Sequence, gamma: int, accepted: int) -> None:
        """Count one verify and feed seq's acceptance-rate average."""
        self.proposed_total += gamma
        self.accepted_total += accepted
        rate = accepted / gamma
        seq.spec_alpha = ema(seq.spec_alpha, rate, ALPHA_EMA)


def accept_sampled(p: torch.Tensor, draft: Draft, gen: torch.Generator) -> list[int]:
    """Speculative sampling. p: [gamma + 1, V] target probabilities (unnormalised rows are fine);
    draft.q: [gamma, V] normalised. Returns the accepted tokens plus one more."""
    assert draft.q is not None
    p = p / p.sum(dim=-1, keepdim=True)
    gamma = len(draft.tokens)
    x = torch.tensor(draft.tokens, device=p.device)
    ratio = p[:gamma].gather(1, x[:, None])[:, 0] / draft.q.gather(1, x[:, None])[:, 0]  # [gamma]
    u = torch.rand(gamma, generator=gen, device=gen.device).to(p.device)
    rejected = (u >= ratio).nonzero()
    if rejected.numel() == 0:  # all accepted: a bonus token from the target's next position
        return draft.tokens + [int(torch.multinomial(p[gamma], 1, generator=gen))]
    a = int(rejected[0, 0])
    residual = (p[a] - draft.q[a]).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is exact
        residual = p[a]
    return draft.tokens[:a] + [int(torch.multinomial(residual / residual.sum(), 1, generator=gen))]
