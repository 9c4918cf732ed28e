"""LLMEngine: the synchronous engine (add_request / abort / step), used directly by tests and benchmarks
and driven by AsyncEngine's background thread in the server.

One step = schedule (which sequences compute how many tokens) -> one mixed-chain forward -> sample
the sequences that reached their last token -> append, detokenize, check stops -> RequestOutputs.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colm_runtime.engine import prompt_logprobs, validation
from colm_runtime.engine.block_manager import BlockManager
from colm_runtime.engine.chain_switch import ChainSwitcher
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.detokenizer import IncrementalDetokenizer
from colm_runtime.engine.faults import FaultInjector
from colm_runtime.engine.grammar import MaskPrefetch
from colm_runtime.engine.metrics import StepMetrics
from colm_runtime.engine.output import OutputBuilder
from colm_runtime.engine.runner import ModelRunner
from colm_runtime.engine.sampler import token_logprobs
from colm_runtime.engine.scheduler import Scheduler
from colm_runtime.engine.sequence import Request, Sequence
from colm_runtime.engine.speculative import SpeculativeDecoder
from colm_runtime.engine.types import EngineRequest, EngineStats, InvalidRequest, RequestOutput, RequestTooLong
from colm_runtime.engine.validation import RequestLimits
from colm_runtime.model import ChainKVCache, CoLMModel
from colm_runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished completion, accumulated from its RequestOutputs (LLMEngine.generate's result)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    chains: list[int] = field(default_factory=list)  # chain count of each generated token
    logprobs: list = field(default_factory=list)


class LLMEngine:
    """Continuous batching over a chain-sliced paged KV cache, one step at a time."""

    def __init__(self, model: CoLMModel, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 model_name: str = "colm"):
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.model, self.tokenizer, self.config, self.model_name = model, tokenizer, config, model_name
        self.cfg = model.cfg
        param = next(model.parameters())
        self.num_blocks = config.num_blocks(self.cfg, param.dtype)
        cache = ChainKVCache(self.cfg, self.num_blocks, config.block_size, param.dtype, param.device)
        self.blocks = BlockManager(self.cfg, self.num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(model, cache, config.seed, config.air_prefill_one_chain)
        self.model_len = config.model_len(self.cfg)
        self.requests: dict[str, Request] = {}
        self.outputs = OutputBuilder(tokenizer)
        self.metrics = StepMetrics()
        self._pending: list[RequestOutput] = []  # abort outputs, handed out by the next step()
        self.switcher = ChainSwitcher(self.blocks, config.step_time_target)
        self.masks = MaskPrefetch(self.cfg.vocab_size)  # structured outputs: masks filled during the forward
        self.spec = SpeculativeDecoder(config.num_speculative_tokens, config.speculative_draft_chains,
                                       self.model_len)
        self.faults = FaultInjector.from_env()  # off unless COLM_FAULT_INJECT is set (tests only)
        self._marked: set[str] = set()  # request ids the fault hook fires on

    @classmethod
    def from_model_dir(cls, path: str | Path, config: EngineConfig = EngineConfig()) -> "LLMEngine":
        """Load config.json + model.safetensors + the tokenizer files onto config.device / config.dtype."""
        from colm_runtime.checkpoint import load_model

        model = load_model(path, config.device, config.torch_dtype)
        return cls(model, Tokenizer.from_model_dir(path), config, Path(path).name)

    # ---- requests ---------------------------------------------------------------------------------
    @functools.cached_property
    def limits(self) -> RequestLimits:
        """What every request is checked against (engine/validation.py)."""
        return RequestLimits.of(self.cfg, self.config)

    def validate(self, req: EngineRequest) -> None:
        """Raise InvalidRequest / RequestTooLong for a request that can never run (pure: no state change)."""
        validation.validate(req, self.limits)
        total = len(req.prompt_token_ids) + req.params.max_tokens
        if not self.blocks.fits_ever(total, req.min_chains):
            raise RequestTooLong(f"prompt + max_tokens = {total} tokens do not fit the KV cache "
                                 f"({min(self.num_blocks) * self.config.block_size} tokens per pool)",
                                 param="max_tokens")

    def add_request(self, req: EngineRequest, check_queue: bool = True) -> None:
        """Queue a request; raises InvalidRequest, RequestTooLong or EngineOverloaded (the latter only
        with check_queue: AsyncEngine checks the bound in the caller, before the request streams)."""
        self.validate(req)
        if req.request_id in self.requests:
            raise InvalidRequest(f"request id {req.request_id!r} is already in flight")
        if check_queue:
            validation.check_queue(len(self.scheduler.waiting), self.config.max_waiting)
        r = Request(req)
        r.seqs.append(self._new_seq(r, 0))
        self.requests[req.request_id] = r
        self.scheduler.add(r.seqs[0])
        if self.faults.marked(req.prompt_token_ids, self.tokenizer):
            self._marked.add(req.request_id)
            self.faults.check("add", True)

    def _new_seq(self, r: Request, index: int) -> Sequence:
        p = r.req.params
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(p.seed + index)
        detok = IncrementalDetokenizer(self.tokenizer, p.stop)
        seq = Sequence(r, index, r.req.prompt_token_ids, self.cfg.n_kv_pools, gen, detok)
        want = self.config.speculative_default if r.req.speculative is None else r.req.speculative
        seq.speculative = bool(want and self.config.num_speculative_tokens)
        return seq

    def abort(self, request_id: str) -> bool:
        """Abort a request: its blocks are freed now, its final outputs come with the next step()."""
        r = self.requests.pop(request_id, None)
        self._marked.discard(request_id)
        if r is None:
            return False
        indices = range(r.req.params.n) if not r.forked else [s.index for s in r.seqs]
        for seq in r.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
        done = {s.index for s in r.seqs if s.finish_reason is not None}
        self._pending.extend(self.outputs.aborted(r, i) for i in indices if i not in done)
        return True

    def fail_request(self, r: Request, error: BaseException, culprit: Sequence | None = None) -> list[RequestOutput]:
        """An exception in one request's own processing: free its blocks and end each of its open
        completions (and the one that raised) with finish_reason "error"; other requests go on."""
        log.error("request %s failed in the engine: %s: %s", r.request_id, type(error).__name__, error,
                  exc_info=error)
        self.requests.pop(r.request_id, None)
        self._marked.discard(r.request_id)
        open_ = [s for s in r.seqs if not s.is_finished or s is culprit]
        indices = [s.index for s in open_] if r.forked else list(range(r.req.params.n))
        for seq in r.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
            seq.finish_reason = seq.finish_reason or "error"
        chains = {s.index: s.chains for s in r.seqs}
        return [RequestOutput(r.request_id, i, "", (), "error", chains.get(i, r.req.chains), r.num_prompt_tokens,
                              0, error=f"engine error: {type(error).__name__}") for i in indices]

    def take_pending(self) -> list[RequestOutput]:
        """The abort updates not yet handed out by step()."""
        out, self._pending = self._pending, []
        return out

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and model forward; returns the updates it produced."""
        outputs = self.take_pending()
        n_pending = len(outputs)
        t0 = time.perf_counter()
        self._plan()
        so = self.scheduler.schedule()
        if so.empty:
            return outputs
        try:  # the batched part: a fault here concerns the requests of this batch, and only those
            self.faults.check("forward", any(s.request.request_id in self._marked for s, _ in so.scheduled))
            spec = [(i, seq, n - 1) for i, (seq, n) in enumerate(so.scheduled)
                    if seq.num_uncomputed == 1 and n > 1 and seq.chains > self.spec.draft_chains]
            self.runner.copy_blocks(so)
            self.masks.start(self._will_sample(so, {i for i, _, _ in spec}))
            t_draft = time.perf_counter()
            drafts = self.spec.propose(self.runner, [(seq, g) for _, seq, g in spec]) if spec else []
            t_draft = time.perf_counter() - t_draft
            drafted = {i: d for (i, _, _), d in zip(spec, drafts)}
            scored = self._prompt_rows(so, drafted)
            logits, multi = self.runner.forward(so, drafted, scored)
        except Exception as e:
            self.masks.discard()
            batch = {seq.request.request_id: seq.request for seq, _ in so.scheduled}
            return outputs + [o for r in batch.values() for o in self.fail_request(r, e)]
        verify = {i: multi[i] for i in drafted}
        rows, seqs = [], []
        failed: dict[str, tuple[Sequence, Exception]] = {}  # one request's fault fails that request only
        now = time.monotonic()
        for i, (seq, n) in enumerate(so.scheduled):
            r = seq.request
            r.first_scheduled = r.first_scheduled or now
            if i in verify:
                continue
            try:
                if i in scored:
                    prompt_logprobs.record(seq, multi[i])
            except Exception as e:
                failed[r.request_id] = (seq, e)
                continue
            seq.num_computed_tokens += min(n, seq.num_uncomputed)  # n > uncomputed: a shrunk draft
            if seq.num_computed_tokens == seq.num_tokens and seq.params.max_tokens == 0:
                outputs.append(self._scored_only(seq))  # the prompt is scored; nothing to generate
            elif seq.num_computed_tokens == seq.num_tokens:  # its last known token: sample the next
                for s in ([seq] if r.forked else self._fork(seq)):
                    rows.append(i)
                    seqs.append(s)
        try:
            ready = self.masks.take()
            samples = self.runner.sample(logits, rows, seqs, ready) if seqs else None
        except Exception as e:  # batched sampling: its rows' requests fail, the verified ones go on
            failed.update({s.request.request_id: (s, e) for s in seqs})
            seqs = []
        if seqs:
            for j, seq in enumerate(seqs):
                if seq.request.request_id not in failed:
                    try:
                        outputs.append(self._append(seq, samples.token_ids[j], samples.logprobs[j]))
                    except Exception as e:
                        failed[seq.request.request_id] = (seq, e)
        for (i, seq, _), draft in zip(spec, drafts):
            if seq.request.request_id not in failed:
                try:
                    outputs.extend(self._accept(seq, verify[i], draft))
                except Exception as e:
                    failed[seq.request.request_id] = (seq, e)
        for seq, e in failed.values():
            outputs.extend(self.fail_request(seq.request, e, seq))
        seconds = time.perf_counter() - t0
        decode_only = so.num_tokens - so.num_lookahead == len(so.scheduled)
        if spec:
            self.spec.observe(t_draft, max(g for _, _, g in spec), seconds - t_draft)
        self.spec.observe_step(seconds, len(outputs) - n_pending, bool(spec), decode_only)
        self.metrics.record(so, seconds)
        self.switcher.observe(seconds, decode_only)
        return outputs

    @staticmethod
    def _will_sample(so, spec: set[int]) -> list[Sequence]:
        """The constrained sequences that sample after this step's forward (their grammar state is final
        now): those reaching their last known token, not verifying drafts, and already forked."""
        return [seq for i, (seq, n) in enumerate(so.scheduled)
                if seq.matcher is not None and i not in spec and seq.request.forked
                and seq.num_computed_tokens + min(n, seq.num_uncomputed) == seq.num_tokens]

    def _plan(self) -> None:
        """Before scheduling: chain schedules and the load policy move chain counts, then each decode
        that may speculate gets its lookahead (the scheduler reserves budget and slots for it)."""
        s = self.scheduler
        s.running.sort(key=Sequence.sort_key)
        self.switcher.balance(s.running)
        self.switcher.apply(s.running + s.waiting)
        for seq in s.running:
            seq.lookahead = self.spec.lookahead(seq, self.switcher.next_switch(seq)) if seq.request.forked else 0

    @staticmethod
    def _prompt_rows(so, drafted: dict) -> dict[int, int]:
        """Scheduled index -> logit rows its chunk returns for prompt logprobs (only requests that ask)."""
        out = {}
        for i, (seq, n) in enumerate(so.scheduled):
            if seq.request.prompt_scored is not None and i not in drafted:
                if rows := prompt_logprobs.rows_needed(seq, min(n, seq.num_uncomputed)):
                    out[i] = rows
        return out

    def _scored_only(self, seq: Sequence) -> RequestOutput:
        """End a max_tokens 0 request once its prompt is scored: finish_reason "length", no token."""
        seq.finish_reason = "length"
        self.scheduler.finish(seq)
        self.requests.pop(seq.request.request_id, None)
        return self.outputs.scored(seq)

    def _accept(self, seq: Sequence, target: torch.Tensor, draft) -> list[RequestOutput]:
        """Apply one verify: append the accepted tokens (stopping at a finish), roll back the rest."""
        tokens = self.spec.accept(seq, target, draft, self.runner)
        lps = token_logprobs(target[: len(tokens)], tokens, [seq.params] * len(tokens))
        seq.num_computed_tokens += len(tokens)  # its last token and the accepted drafts
        outs = []
        for tok, lp in zip(tokens, lps):
            outs.append(self._append(seq, tok, lp))
            if seq.finish_reason is not None:
                return outs
        self.blocks.trim(seq)
        return outs

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After the prompt is computed: the other n - 1 completions share its blocks."""
        r = parent.request
        r.forked = True
        for i in range(1, r.req.params.n):
            child = self._new_seq(r, i)
            self.blocks.fork(parent, child)
            self.scheduler.add_running(child)
            r.seqs.append(child)
        return list(r.seqs)

    def _append(self, seq: Sequence, token: int, logprob) -> RequestOutput:
        r = seq.request
        if r.request_id in self._marked:
            self.faults.check("step", True)
        r.first_token = r.first_token or time.monotonic()
        if seq.matcher is not None:
            seq.matcher.consume(token)
        seq.token_ids.append(token)
        p = seq.params
        # A stop token (or EOS) ends the completion without adding its text (OpenAI / vLLM).
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in self.tokenizer.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        else:
            seq.detok.add(token)
            if seq.detok.stopped_by is not None:
                seq.finish_reason, seq.stop_reason = "stop", seq.detok.stopped_by
            elif len(seq.token_ids) - seq.num_prompt_tokens >= p.max_tokens or seq.num_tokens >= self.model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            if r.finished:
                self.requests.pop(r.request_id, None)
        return self.outputs.update(seq, token, logprob)

    # ---- conveniences -------------------------------------------------------------------------------
    def generate(self, requests: list[EngineRequest], max_steps: int = 1_000_000) -> dict[str, list[Completion]]:
        """Add the requests and step until all finish; the completions of each, by index."""
        for req in requests:
            self.add_request(req)
        done: dict[str, list[Completion]] = {r.request_id: [Completion() for _ in range(r.params.n)]
                                             for r in requests}
        for _ in range(max_steps):
            if not self.has_unfinished:
                break
            for out in self.step():
                c = done[out.request_id][out.index]
                c.token_ids.extend(out.token_ids)
                c.text += out.text
                c.chains.extend([out.chains] * len(out.token_ids))
                c.logprobs.extend(out.logprobs)
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        return done

    def stats(self) -> EngineStats:
        """A snapshot (call from the thread that steps the engine)."""
        s = self.scheduler
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting), kv_usage=self.blocks.usage(),
            kv_blocks_total=self.blocks.num_total, kv_blocks_free=self.blocks.num_free,
            step_time_per_chains=dict(self.metrics.decode), prefill_time_per_token=dict(self.metrics.prefill),
            preemptions_total=s.preemptions_total, shrinks_total=s.shrinks_total,
            steps_total=self.metrics.steps, alive=True,
            spec_proposed_total=self.spec.proposed_total, spec_accepted_total=self.spec.accepted_total,
            chain_switches=dict(self.switcher.switches),
            recomputed_tokens_total=self.switcher.recomputed_tokens_total)
