"""LLMEngine: the synchronous engine (add_request / abort / step), used directly by tests and benchmarks
and driven by AsyncEngine's background thread in the server.

One step = plan chain counts and lookaheads -> Scheduler.schedule (which sequences compute how many
tokens, which sample) -> ModelRunner.execute (drafts, one mixed-chain forward, sampling, verification)
-> Scheduler.update_from_output (computed tokens, forks, stops, finishes) -> RequestOutputs.

A step whose batched work raises (not one request's processing) fails the requests of that step and
the engine goes on; EngineConfig.max_step_failures such steps in a row make it unhealthy for good
(EngineStats.healthy; the server's /health then answers 503 so that the process is restarted).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colm_runtime.engine import validation
from colm_runtime.engine.block_manager import BlockManager
from colm_runtime.engine.chain_switch import ChainSwitcher
from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.faults import FaultInjector
from colm_runtime.engine.metrics import StepMetrics
from colm_runtime.engine.runner import ModelRunner
from colm_runtime.engine.scheduler import Scheduler
from colm_runtime.engine.sequence import Request, Sequence
from colm_runtime.engine.speculative import SpeculativeDecoder
from colm_runtime.engine.step_types import RunnerOutput, SchedulerOutput
from colm_runtime.engine.types import EngineRequest, EngineStats, InvalidRequest, RequestOutput, RequestTooLong
from colm_runtime.engine.validation import RequestLimits
from colm_runtime.model import ChainKVCache, CoLMModel, cpu_kernels
from colm_runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished completion, accumulated from its RequestOutputs (LLMEngine.generate's result)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_chains: list[int] = field(default_factory=list)  # chain count of each generated token
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
        self.model_len = config.model_len(self.cfg)
        self.faults = FaultInjector.from_env()  # off unless COLM_FAULT_INJECT is set (tests only)
        self.blocks = BlockManager(self.cfg, self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks, tokenizer, self.model_len, param.device, self.faults)
        self.spec = SpeculativeDecoder(config.num_speculative_tokens, config.speculative_draft_chains,
                                       self.model_len)
        self.runner = ModelRunner(model, cache, config.seed, config.air_prefill_one_chain, self.spec)
        # bf16 on the CPU: build the bounded set of matmul kernels now (memory flat from the start).
        model.warm_kernels(config.max_num_batched_tokens, config.max_num_seqs)
        if param.device.type == "cpu" and cpu_kernels.library() is not None:  # built now, not on the first request
            log.info("decode attention: C kernel over the paged K/V cache (in place)")
        self.metrics = StepMetrics()
        self.switcher = ChainSwitcher(self.blocks, config.step_time_target)
        self._pending: list[RequestOutput] = []  # abort outputs, handed out by the next step()
        self.last_step_ran = False  # whether the latest step() scheduled anything
        self.step_failures = 0  # steps in a row whose batched work raised
        self.step_failures_total = 0
        self.healthy = True  # False for good after config.max_step_failures failed steps in a row

    @classmethod
    def from_model_dir(cls, path: str | Path, config: EngineConfig = EngineConfig()) -> "LLMEngine":
        """Load config.json + model.safetensors + the tokenizer files onto config.device / config.dtype."""
        from colm_runtime.checkpoint import load_model

        model = load_model(path, config.device, config.torch_dtype)
        return cls(model, Tokenizer.from_model_dir(path), config, Path(path).name)

    @property
    def requests(self) -> dict[str, Request]:
        """The requests in flight, by id (the scheduler's)."""
        return self.scheduler.requests

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
        r.fault_marked = self.faults.marked(req.prompt_token_ids, self.tokenizer)
        self.scheduler.add_request(r)
        self.faults.check("add", r.fault_marked)

    def abort(self, request_id: str) -> bool:
        """Abort a request: its blocks are freed now, its final outputs come with the next step()."""
        outs = self.scheduler.abort(request_id)
        if outs is None:
            return False
        self._pending.extend(outs)
        return True

    def fail_request(self, r: Request, error: BaseException, culprit: Sequence | None = None) -> list[RequestOutput]:
        """An exception in one request's own processing: free its blocks and end each of its open
        completions (and the one that raised) with finish_reason "error"; other requests go on."""
        return self.scheduler.fail_request(r, error, culprit)

    def fail(self, req: EngineRequest, error: BaseException) -> list[RequestOutput]:
        """End a request that raised outside a step (while being added): its blocks freed if it got
        any, an error update for each of its completions."""
        r = self.scheduler.requests.get(req.request_id)
        if r is not None:
            return self.scheduler.fail_request(r, error)
        log.error("request %s failed while being added: %r", req.request_id, error)
        return [RequestOutput(req.request_id, i, "", (), "error", req.chains, len(req.prompt_token_ids), 0,
                              error=f"engine error: {type(error).__name__}") for i in range(req.params.n)]

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """End every request with an error (the step loop itself failed); the updates still pending too."""
        return self.take_pending() + self.scheduler.fail_all(error)

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (the engine stops); their final updates and those still pending."""
        for rid in list(self.scheduler.requests):
            self.abort(rid)
        return self.take_pending()

    def take_pending(self) -> list[RequestOutput]:
        """The abort updates not yet handed out by step()."""
        out, self._pending = self._pending, []
        return out

    @property
    def has_unfinished(self) -> bool:
        return bool(self.scheduler.requests) or bool(self._pending)

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and model forward; returns the updates it produced."""
        outputs = self.take_pending()
        t0 = time.perf_counter()
        try:
            self._plan()
            so = self.scheduler.schedule()
        except Exception as e:  # the queues may be inconsistent: every request fails
            return outputs + self._step_failed(e, self.scheduler.fail_all(e))
        self.last_step_ran = not so.empty
        if so.empty:
            return outputs
        try:  # the batched part: a fault here concerns the requests of this step, and only those
            self.faults.check("forward", any(s.request.fault_marked for s, _ in so.scheduled))
            result = self.runner.execute(so)
        except Exception as e:
            batch = {seq.request.request_id: seq.request for seq, _ in so.scheduled}
            return outputs + self._step_failed(e, [o for r in batch.values() for o in self.fail_request(r, e)])
        self.step_failures = 0
        new = self.scheduler.update_from_output(so, result)
        self._observe(so, result, len(new), time.perf_counter() - t0)
        return outputs + new

    def _plan(self) -> None:
        """Before scheduling: each sequence's chain count moves to its target (schedule, load and memory
        caps), then each decode that may speculate gets its lookahead (the scheduler reserves budget
        and slots for it)."""
        s = self.scheduler
        s.running.sort(key=Sequence.sort_key)
        self.switcher.balance(s.running, self.metrics.decode_step_time)
        self.switcher.apply(s.running + s.waiting)
        for seq in s.running:
            seq.lookahead = self.spec.lookahead(seq, self.switcher.next_switch(seq)) if seq.request.forked else 0

    def _step_failed(self, error: Exception, failed: list[RequestOutput]) -> list[RequestOutput]:
        """Count a failed step (its requests already failed: `failed`); too many in a row: unhealthy."""
        log.error("engine step failed: %s: %s", type(error).__name__, error, exc_info=error)
        self.last_step_ran = True
        self.step_failures += 1
        self.step_failures_total += 1
        if self.step_failures >= self.config.max_step_failures and self.healthy:
            self.healthy = False
            log.error("%d engine steps failed in a row: the engine is unhealthy", self.step_failures)
        return failed

    def _observe(self, so: SchedulerOutput, result: RunnerOutput, num_outputs: int, seconds: float) -> None:
        """Feed the step's time to the step-time averages and the speculative cost model."""
        if result.draft_steps:
            self.spec.observe(result.draft_seconds, result.draft_steps, seconds - result.draft_seconds)
        self.spec.observe_step(seconds, num_outputs, bool(result.draft_steps), so.decode_only)
        self.metrics.record(so, seconds)

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
                c.token_chains.extend([out.chains] * len(out.token_ids))
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
            recomputed_tokens_total=self.switcher.recomputed_tokens_total,
            healthy=self.healthy, step_failures_total=self.step_failures_total,
            prefix_cache_queries=tuple(self.blocks.cache_stats.queries),
            prefix_cache_hits=tuple(self.blocks.cache_stats.hits), kv_blocks_cached_free=self.blocks.num_cached_free())
