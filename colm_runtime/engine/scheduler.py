"""The scheduler: each step, how many tokens each sequence computes (vLLM v1 style, no phases), and
what the step's results do to the requests (update_from_output).

Running sequences go first (decodes, then prompt chunks), in priority order, each asking for all its
uncomputed tokens (1 for a decode, a chunk for a prompt) within the step's token budget; then waiting
sequences are admitted in priority order while blocks, budget and max_num_seqs allow (shrinking, then
preempting, running sequences of strictly lower priority when the head does not fit), their prompts
chunked to the budget left, so a long prompt never stalls the decodes. When a running sequence cannot
get its blocks, MemoryRelief first shrinks running sequences that allow it (freeing their upper pools),
then the lowest-priority ones are preempted (they recompute later).

After the runner's forward, update_from_output advances computed tokens, forks n > 1 requests once
their prompt is computed (the forks share its blocks), appends the sampled tokens, checks stops and
finishes sequences and requests. Why one file over 300 lines: both halves work on the same queues
and requests, and each half reads best next to the other.
"""

from __future__ import annotations

import logging
import time

import torch

from colm_runtime.engine import prompt_logprobs
from colm_runtime.engine.block_manager import BlockCopy, BlockManager
from colm_runtime.engine.chain_switch import MemoryRelief
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.detokenizer import IncrementalDetokenizer
from colm_runtime.engine.faults import FaultInjector
from colm_runtime.engine.output import OutputBuilder
from colm_runtime.engine.sequence import Request, Sequence, SequenceStatus
from colm_runtime.engine.step_types import Logprob, RunnerOutput, SchedulerOutput
from colm_runtime.engine.types import RequestOutput
from colm_runtime.tokenizer import Tokenizer

__all__ = ["Scheduler", "SchedulerOutput"]

log = logging.getLogger(__name__)


class Scheduler:
    """Owns the requests, the waiting and running sequences, and the block manager's use."""

    def __init__(self, config: EngineConfig, blocks: BlockManager, tokenizer: Tokenizer, model_len: int,
                 device: torch.device | str = "cpu", faults: FaultInjector = FaultInjector()):
        self.config, self.blocks, self.tokenizer, self.model_len = config, blocks, tokenizer, model_len
        self.device, self.faults = device, faults
        self.relief = MemoryRelief(blocks)
        self.outputs = OutputBuilder(tokenizer)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions_total = 0
        self.shrinks_total = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, r: Request) -> None:
        """Queue a request (validated by the caller) as its first sequence."""
        r.seqs.append(self.new_sequence(r, 0))
        self.requests[r.request_id] = r
        self.add(r.seqs[0])

    def new_sequence(self, r: Request, index: int) -> Sequence:
        """Completion `index` of r: its seeded generator (seed + index), detokenizer and grammar state."""
        p, cfg = r.req.params, self.config
        gen = None if p.seed is None else torch.Generator(device=self.device).manual_seed(p.seed + index)
        detok = IncrementalDetokenizer(self.tokenizer, p.stop)
        seq = Sequence(r, index, r.req.prompt_token_ids, self.blocks.cfg.n_kv_pools, gen, detok)
        want = cfg.speculative_default if r.req.speculative is None else r.req.speculative
        seq.speculative = bool(want and cfg.num_speculative_tokens)
        return seq

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> list[RequestOutput] | None:
        """End a request now, freeing its blocks; the final update of each open completion (None: no
        such request)."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return None
        indices = range(r.req.params.n) if not r.forked else [s.index for s in r.seqs]
        for seq in r.seqs:
            if not seq.is_finished:
                self.finish(seq)
        done = {s.index for s in r.seqs if s.finish_reason is not None}
        return [self.outputs.aborted(r, i) for i in indices if i not in done]

    def fail_request(self, r: Request, error: BaseException, culprit: Sequence | None = None) -> list[RequestOutput]:
        """An exception in r's processing (or in a step r was part of): free its blocks and end each of
        its open completions (and the one that raised) with finish_reason "error"."""
        log.error("request %s failed in the engine: %s: %s", r.request_id, type(error).__name__, error,
                  exc_info=error)
        self.requests.pop(r.request_id, None)
        open_ = [s for s in r.seqs if not s.is_finished or s is culprit]
        indices = [s.index for s in open_] if r.forked else list(range(r.req.params.n))
        for seq in r.seqs:
            if not seq.is_finished:
                self.finish(seq)
            seq.finish_reason = seq.finish_reason or "error"
        chains = {s.index: s.num_chains for s in r.seqs}
        return [RequestOutput(r.request_id, i, "", (), "error", chains.get(i, r.req.chains), r.num_prompt_tokens,
                              0, error=f"engine error: {type(error).__name__}") for i in indices]

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """Fail every request (an error not tied to one step's batch)."""
        return [o for r in list(self.requests.values()) for o in self.fail_request(r, error)]

    # ---- one step ---------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """This step's plan: which sequences compute how many tokens, and which of them sample."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=Sequence.sort_key)
        done: set[int] = set()  # seq_ids scheduled this step
        # Decodes first, so that no prompt chunk (even of a higher-priority request) stalls them.
        for decodes in (True, False):
            for seq in list(self.running):
                if budget <= 0:
                    break
                if seq.seq_id in done or seq.status is not SequenceStatus.RUNNING or \
                        (seq.num_uncomputed == 1) != decodes:
                    continue
                # A speculating decode reserves budget and slots for its drafted tokens as well.
                n = min(seq.num_uncomputed + (seq.lookahead if decodes else 0), budget)
                copies = self._allocate(seq, n, out, done)
                if copies is None:  # seq itself was preempted
                    continue
                out.num_lookahead += n - min(n, seq.num_uncomputed)
                out.scheduled.append((seq, n))
                out.copies.extend(copies)
                done.add(seq.seq_id)
                budget -= n
        if not out.num_preempted:
            self._admit(out, budget)
        self._plan_samples(out)
        return out

    def _allocate(self, seq: Sequence, n: int, out: SchedulerOutput, done: set[int]) -> list[BlockCopy] | None:
        """Blocks for a running seq, relieving pressure as needed; None if seq itself got preempted."""
        while True:
            copies = self.blocks.allocate_slots(seq, n)
            if copies is not None:
                return copies
            short = self.blocks.shortage(seq, n)
            if self.relief.shrink_one(short, self.running) is not None:
                out.num_shrunk += 1
                self.shrinks_total += 1
                continue
            # The lowest-priority sequence not scheduled this step (seq itself at worst).
            victim = next(s for s in reversed(self.running) if s.seq_id not in done)
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.preempted += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.preemptions_total += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=Sequence.sort_key)
        seats = sum(map(_seats, self.running))
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            hit = self.blocks.find_prefix(seq)  # cached blocks it can start from (prefix caching)
            n = min(seq.num_tokens - (seq.num_computed_tokens if hit is None else hit.start), budget)
            fits = seats + _seats(seq) <= self.config.max_num_seqs
            copies = self.blocks.allocate_slots(seq, n, hit) if fits else None
            if copies is None:
                lower = [r for r in self.running if r.priority < seq.priority]
                if fits and self.relief.shrink_one(self.blocks.shortage(seq, n, hit), lower) is not None:
                    out.num_shrunk += 1
                    self.shrinks_total += 1
                    continue
                refund = self._evict_for(seq, out)
                if refund is None:
                    break  # strict priority order: nobody overtakes the head of the queue
                budget, seats = budget + refund, sum(map(_seats, self.running))
                continue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            out.copies.extend(copies)
            budget -= n
            seats += _seats(seq)

    def _evict_for(self, seq: Sequence, out: SchedulerOutput) -> int | None:
        """Preempt the lowest-priority running sequence if its priority is below seq's (higher priority
        is preempted last); returns the step tokens it gave back, None if nobody ranks below seq."""
        victim = max(self.running, key=Sequence.sort_key, default=None)  # lowest priority, latest arrival
        if victim is None or victim.priority >= seq.priority:
            return None
        refund = 0
        for i, (s, n) in enumerate(out.scheduled):
            if s is victim:
                refund = n
                out.num_lookahead -= n - min(n, s.num_uncomputed)
                del out.scheduled[i]
                break
        self._preempt(victim)
        out.num_preempted += 1
        return refund



    def _plan_samples(self, out: SchedulerOutput) -> None:
        """Which sequences sample after the forward: those reaching their last known token (not the
        prompt-only ones, max_tokens 0). An n > 1 request's forks are made here, to sample with it."""
        for i, (seq, n) in enumerate(out.scheduled):
            if seq.num_computed_tokens + min(n, seq.num_uncomputed) == seq.num_tokens and seq.params.max_tokens:
                r = seq.request
                out.samples[i] = [seq] if r.forked else [seq] + [self.new_sequence(r, k)
                                                                for k in range(1, r.req.params.n)]

    # ---- after the forward ----------------------------------------------------------------------------
    def update_from_output(self, so: SchedulerOutput, out: RunnerOutput) -> list[RequestOutput]:
        """Apply a step's results: the updates it produced. A request whose own processing raises fails
        alone (finish_reason "error"); the others go on."""
        outputs: list[RequestOutput] = []
        failed = dict(out.failed)
        now = time.monotonic()
        for i, (seq, n) in enumerate(so.scheduled):
            r = seq.request
            r.first_scheduled = r.first_scheduled or now
            if r.request_id in failed:
                continue
            try:
                outputs.extend(self._update_one(so, out, i, seq, n))
            except Exception as e:
                failed[r.request_id] = (seq, e)
        for seq, e in failed.values():
            outputs.extend(self.fail_request(seq.request, e, seq))
        for seq, _ in so.scheduled:  # full blocks computed this step become findable (finished ones were)
            if not seq.is_finished:
                self.blocks.cache_computed(seq)
        return outputs

    def _update_one(self, so: SchedulerOutput, out: RunnerOutput, i: int, seq: Sequence, n: int
                    ) -> list[RequestOutput]:
        if i in out.prompt_rows:
            prompt_logprobs.record(seq, out.prompt_rows[i])
        if i in out.verified:
            return self._accept(seq, out.tokens[seq.seq_id])
        seq.num_computed_tokens += min(n, seq.num_uncomputed)  # n > uncomputed: a lookahead not drafted
        if seq.num_computed_tokens == seq.num_tokens and seq.params.max_tokens == 0:
            return [self._scored_only(seq)]  # the prompt is scored; nothing to generate
        if i not in so.samples:
            return []
        seqs = so.samples[i]
        if not seq.request.forked:
            self._fork(seq, seqs[1:])
        return [self._append(s, *out.tokens[s.seq_id][0]) for s in seqs]

    def _accept(self, seq: Sequence, tokens: list[tuple[int, Logprob]]) -> list[RequestOutput]:
        """Apply one verify: append the accepted tokens (stopping at a finish), release the rest's blocks."""
        seq.num_computed_tokens += len(tokens)  # its last token and the accepted drafts
        outs = []
        for tok, lp in tokens:
            outs.append(self._append(seq, tok, lp))
            if seq.finish_reason is not None:
                return outs
        self.blocks.trim(seq)
        return outs

    def _fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """After the prompt is computed: the other n - 1 completions share its blocks."""
        r = parent.request
        r.forked = True
        for child in children:
            self.blocks.fork(parent, child)
            child.chain_state.copy_caps(parent.chain_state)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            r.seqs.append(child)

    def _append(self, seq: Sequence, token: int, logprob: Logprob) -> RequestOutput:
        r = seq.request
        self.faults.check("step", r.fault_marked)
        r.first_token = r.first_token or time.monotonic()
        seq.append_token(token, self.tokenizer.eos_token_ids, self.model_len)
        if seq.finish_reason is not None:
            self.finish(seq)
            if r.finished:
                self.requests.pop(r.request_id, None)
        return self.outputs.update(seq, token, logprob)

    def _scored_only(self, seq: Sequence) -> RequestOutput:
        """End a max_tokens 0 request once its prompt is scored: finish_reason "length", no token."""
        seq.finish_reason = "length"
        self.finish(seq)
        self.requests.pop(seq.request.request_id, None)
        return self.outputs.scored(seq)


def _seats(seq: Sequence) -> int:
    """Running sequences seq stands for: an n > 1 request not yet forked counts its forks to come."""
    return 1 if seq.request.forked else seq.params.n
