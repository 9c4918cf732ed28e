"""The model runner: execute(SchedulerOutput) -> RunnerOutput. It copies blocks, drafts (self-
speculative decoding), turns the plan into one ForwardBatch, runs the model, samples and verifies.

Every scheduled sequence, whatever its chain count, goes into the same forward pass; ForwardBatch
sorts rows by chain count so each chain layer computes only the rows that use it. The logits come
back in that sorted order and are mapped back to the scheduler's order here. The runner keeps no
request state: the scheduler applies the RunnerOutput (Scheduler.update_from_output).
"""

from __future__ import annotations

import torch

import time

from colm_runtime.engine import prompt_logprobs
from colm_runtime.engine.grammar import MaskPrefetch, fill_bitmask
from colm_runtime.engine.sampler import SamplerOutput, SamplingRow, TokenMasks, sample, token_logprobs
from colm_runtime.engine.sequence import Sequence
from colm_runtime.engine.speculative import Draft, SpeculativeDecoder
from colm_runtime.engine.step_types import RunnerOutput, SchedulerOutput
from colm_runtime.model import ChainKVCache, CoLMModel, ForwardBatch, SeqSpec

Speculating = list[tuple[int, Sequence, int]]  # (scheduled index, sequence, gamma) of the step's drafts


class ModelRunner:
    """Owns the model, the KV tensors, the drafter and the grammar-mask prefetch; no request state."""

    def __init__(self, model: CoLMModel, cache: ChainKVCache, seed: int = 0, air_prefill: bool = True,
                 spec: SpeculativeDecoder | None = None):
        self.model, self.cache = model, cache
        self.cfg = model.cfg
        self.device = cache.k[0].device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.air_prefill = air_prefill and self.cfg.kv_sharing
        self.spec = spec or SpeculativeDecoder(0, 1, 0)
        self.masks = MaskPrefetch(self.cfg.vocab_size)  # structured outputs: masks filled during the forward

    # ---- one step -------------------------------------------------------------------------------------
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        """Run the step: block copies, drafts, the forward, then sampling and verification. Raises when
        the batched work fails (the step's requests fail); one request's failure is in out.failed."""
        out = RunnerOutput()
        spec = [(i, seq, n - 1) for i, (seq, n) in enumerate(so.scheduled)
                if seq.num_uncomputed == 1 and n > 1 and seq.num_chains > self.spec.draft_chains]
        try:
            self.copy_blocks(so)
            self.masks.start(self._will_sample(so, spec))
            drafts = self._draft(spec, out)
            scored = self._prompt_rows(so, drafts)
            logits, multi = self.forward(so, drafts, scored)
            ready = self.masks.take()
        except BaseException:
            self.masks.discard()
            raise
        out.prompt_rows = {i: multi[i] for i in scored}
        self._sample(so, {i for i, _, _ in spec}, logits, ready, out)
        for i, seq, _ in spec:
            self._verify(i, seq, multi[i], drafts[i], out)
        return out

    @staticmethod
    def _will_sample(so: SchedulerOutput, spec: Speculating) -> list[Sequence]:
        """The constrained sequences that sample after the forward, not verifying drafts (their grammar
        state is final now, so their masks can be filled while the forward runs)."""
        drafting = {i for i, _, _ in spec}
        return [s for i, seqs in so.samples.items() if i not in drafting for s in seqs if s.matcher is not None]

    def _draft(self, spec: Speculating, out: RunnerOutput) -> dict[int, Draft]:
        """The step's drafts, by scheduled index (timed for the speculative cost model)."""
        if not spec:
            return {}
        t0 = time.perf_counter()
        drafts = self.spec.propose(self, [(seq, g) for _, seq, g in spec])
        out.draft_seconds, out.draft_steps = time.perf_counter() - t0, max(g for _, _, g in spec)
        return {i: d for (i, _, _), d in zip(spec, drafts)}

    @staticmethod
    def _prompt_rows(so: SchedulerOutput, drafts: dict[int, Draft]) -> dict[int, int]:
        """Scheduled index -> logit rows its chunk returns for prompt logprobs (only requests that ask)."""
        out = {}
        for i, (seq, n) in enumerate(so.scheduled):
            if seq.request.prompt_scored is not None and i not in drafts:
                if rows := prompt_logprobs.rows_needed(seq, min(n, seq.num_uncomputed)):
                    out[i] = rows
        return out

    def _sample(self, so: SchedulerOutput, drafting: set[int], logits: torch.Tensor,
                ready: dict[int, torch.Tensor], out: RunnerOutput) -> None:
        """One token for each sampling sequence (forks share their parent's row). Batched: if it raises,
        the requests of its rows fail, the verified ones go on."""
        rows = [i for i, seqs in so.samples.items() if i not in drafting for _ in seqs]
        seqs = [s for i, group in so.samples.items() if i not in drafting for s in group]
        if not seqs:
            return
        try:
            samples = self.sample(logits, rows, seqs, ready)
        except Exception as e:
            out.failed.update({s.request.request_id: (s, e) for s in seqs})
            return
        for j, s in enumerate(seqs):
            out.tokens[s.seq_id] = [(samples.token_ids[j], samples.logprobs[j])]

    def _verify(self, i: int, seq: Sequence, target: torch.Tensor, draft: Draft, out: RunnerOutput) -> None:
        """Accept a prefix of seq's draft against the target logits [gamma + 1, V]."""
        try:
            tokens = self.spec.accept(seq, target, draft, self.generator_for(seq))
            lps = token_logprobs(target[: len(tokens)], tokens, [seq.params] * len(tokens))
        except Exception as e:  # this request's own processing: it alone fails
            out.failed[seq.request.request_id] = (seq, e)
            return
        out.tokens[seq.seq_id] = list(zip(tokens, lps))
        out.verified.add(i)

    # ---- what the step and the drafter run --------------------------------------------------------------
    @torch.inference_mode()
    def forward_specs(self, specs: list[SeqSpec]) -> torch.Tensor:
        """A forward of bare SeqSpecs (the drafts): logits [N, V] sorted by chain count, descending
        (the caller's order when every spec runs at one chain count)."""
        batch = ForwardBatch.build(self.cfg, specs, self.cache.block_size, self.device)
        return self.model.forward_step(batch, self.cache)

    def generator_for(self, seq: Sequence) -> torch.Generator:
        """The generator seq samples with: its own (seeded requests) or the engine's."""
        return seq.generator if seq.generator is not None else self.generator

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput, drafts: dict[int, Draft] | None = None,
                scored: dict[int, int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the step's forward. Returns fp32 logits [B, V] of each scheduled sequence's last token in
        the scheduler's order, and a dict of multi-row logits: for each speculative entry (drafts:
        scheduled index -> its draft) the target logits [gamma + 1, V] of its last real token and its
        drafted tokens; for each prompt-scoring entry (scored: scheduled index -> rows, from
        prompt_logprobs.rows_needed) its trailing [rows, V]. copy_blocks(so) runs first."""
        drafts, scored = drafts or {}, scored or {}
        specs, pick = self._specs(so, drafts, scored)
        batch = ForwardBatch.build(self.cfg, specs, self.cache.block_size, self.device, self.cache.sink_slots)
        logits = self.model.forward_step(batch, self.cache)  # [N, V], sorted by chain count
        if not drafts and not scored and len(specs) == len(pick) and batch.order == tuple(range(len(batch.order))):
            return logits, {}  # already in the scheduler's order (e.g. one chain count)
        inverse = [0] * len(batch.order)
        for sorted_i, caller_i in enumerate(batch.order):
            inverse[caller_i] = sorted_i
        offs = batch.logit_offsets()
        first = [offs[inverse[i]] for i in pick]  # first logit row of each scheduled entry
        last = [f + batch.num_logits[inverse[i]] - 1 for f, i in zip(first, pick)]
        multi = {i: logits[first[i] : last[i] + 1] for i in (*drafts, *scored)}
        return logits[torch.tensor(last, device=logits.device)], multi

    def _specs(self, so: SchedulerOutput, drafts: dict[int, Draft], scored: dict[int, int]
               ) -> tuple[list[SeqSpec], list[int]]:
        """The step's SeqSpecs and, per scheduled sequence, the spec whose last token gives its logits.

        CoLM-Air prefill acceleration (the paper's): every chain attends the K/V computed from chain 1,
        and chain 1 never reads other chains, so the KV cache of a prompt is the same at any chain
        count. Prompt tokens are computed at 1 chain; only a sequence's last known token (whose logits
        are sampled) runs at its chain count, attending the K/V its prompt wrote earlier in the same
        layer (the model writes every row's K/V before attending). A speculative entry verifies its
        last token and its draft at its own chain count, with logits for all of them. A chunk that
        scores prompt tokens (prompt logprobs) runs whole at the sequence's chain count: those logits
        need every chain, and the K/V it writes is the same.
        """
        specs, pick = [], []
        for i, (seq, n) in enumerate(so.scheduled):
            start = seq.num_computed_tokens
            tables = seq.block_tables[: self.cfg.pools_for(seq.num_chains)]
            if i in drafts:
                ids = seq.token_ids[start:] + drafts[i].tokens
                specs.append(SeqSpec(ids, start, seq.num_chains, tables, num_logits=len(ids)))
                pick.append(len(specs) - 1)
                continue
            n = min(n, seq.num_uncomputed)  # a lookahead whose draft was dropped (shrunk to the draft's chains)
            ids = seq.token_ids[start : start + n]
            if i in scored:
                specs.append(SeqSpec(ids, start, seq.num_chains, tables, num_logits=scored[i],
                                     kv_from=_kv_from(seq, len(tables))))
            elif self.air_prefill and seq.num_chains > 1 and n > 1:
                last = start + n == seq.num_tokens
                specs.append(SeqSpec(ids[:-1] if last else ids, start, 1, tables))
                if last:
                    specs.append(SeqSpec(ids[-1:], start + n - 1, seq.num_chains, tables))
            else:
                specs.append(SeqSpec(ids, start, seq.num_chains, tables, kv_from=_kv_from(seq, len(tables))))
            pick.append(len(specs) - 1)
        return specs, pick

    def copy_blocks(self, so: SchedulerOutput) -> None:
        """The step's copy-on-write block copies; before any forward of the step (drafts included)."""
        for pool in {p for p, _, _ in so.copies}:
            src = torch.tensor([s for p, s, _ in so.copies if p == pool], device=self.device)
            dst = torch.tensor([d for p, _, d in so.copies if p == pool], device=self.device)
            self.cache.copy_blocks(pool, src, dst)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence],
               ready: dict[int, torch.Tensor] | None = None) -> SamplerOutput:
        """Sample one token for each seqs[j] from logits row rows[j] (rows may repeat: n > 1 forks).
        ready: grammar masks already filled (MaskPrefetch), by seq_id."""
        same = rows == list(range(logits.shape[0]))
        sub = logits if same else logits[torch.tensor(rows, device=logits.device)]
        info = [SamplingRow(s.params, s.generator, *self._history(s)) for s in seqs]
        return sample(sub, info, self.generator, self.grammar_masks(seqs, ready or {}))

    def grammar_masks(self, seqs: list[Sequence], ready: dict[int, torch.Tensor]) -> TokenMasks | None:
        """The allowed tokens of the structured-output sequences among seqs (None: there are none): the
        prefetched ones, and the rest (e.g. the first token of forked completions) filled now."""
        rows = [j for j, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        todo = [j for j in rows if seqs[j].seq_id not in ready]
        now = dict(zip(todo, fill_bitmask([seqs[j].matcher for j in todo], self.cfg.vocab_size))) if todo else {}
        return TokenMasks(rows, torch.stack([now[j] if j in now else ready[seqs[j].seq_id] for j in rows]))

    @staticmethod
    def _history(s: Sequence) -> tuple[list[int], list[int]]:
        """(prompt, output) token ids, copied only when a penalty needs them."""
        p = s.params
        if p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1:
            return [], []
        return s.token_ids[: s.num_prompt_tokens], s.output_token_ids


def _kv_from(seq: Sequence, pools: int) -> tuple[int, ...] | None:
    """Per pool, where seq's writes start (None: at its computed tokens in every pool). A prefix-cache
    hit that reached further in some pools (plain CoLM, cached at fewer chains) and a chain up-switch
    recompute those positions for the other pools only."""
    start, valid = seq.num_computed_tokens, seq.prefix.kv_valid[:pools]
    return tuple(max(start, v) for v in valid) if any(v > start for v in valid) else None
