"""Building the RequestOutput updates of a completion (text deltas, logprobs, timings)."""

from __future__ import annotations

from colm_runtime.engine.sequence import Request, Sequence
from colm_runtime.engine.types import RequestOutput, TokenLogprob
from colm_runtime.tokenizer import Tokenizer


class OutputBuilder:
    """Makes the update for one new token of a sequence, or the final update of an aborted one."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprob(self, token: int, lp) -> tuple[TokenLogprob, ...]:
        if lp is None:
            return ()
        chosen, ids, values = lp
        top = tuple((i, self.token_text(i), v) for i, v in zip(ids, values))
        return (TokenLogprob(token, self.token_text(token), chosen, top),)

    def prompt_logprobs(self, r: Request) -> tuple[TokenLogprob | None, ...] | None:
        """The request's prompt logprobs as TokenLogprobs (built once per request; None: not asked)."""
        if r.prompt_scored is None:
            return None
        if r.prompt_out is None:
            ids = r.req.prompt_token_ids
            r.prompt_out = (None,) + tuple(
                TokenLogprob(t, self.token_text(t), c, tuple((i, self.token_text(i), v) for i, v in zip(ti, tv)), rank)
                for t, (c, ti, tv, rank) in zip(ids[1:], r.prompt_scored[1:]))
        return r.prompt_out

    @staticmethod
    def _times(r: Request) -> tuple[float | None, float | None]:
        arrival = r.req.arrival_time
        queue = None if r.first_scheduled is None else r.first_scheduled - arrival
        first = None if r.first_token is None else r.first_token - arrival
        return queue, first

    def update(self, seq: Sequence, token: int, lp) -> RequestOutput:
        r = seq.request
        queue, first = self._times(r)
        return RequestOutput(
            request_id=r.request_id, index=seq.index, text=seq.detok.delta(final=seq.finish_reason is not None),
            token_ids=(token,), finish_reason=seq.finish_reason, chains=seq.num_chains,
            prompt_tokens=r.num_prompt_tokens, completion_tokens=seq.num_tokens - r.num_prompt_tokens,
            logprobs=self._logprob(token, lp), stop_reason=seq.stop_reason, queue_time=queue,
            first_token_time=first,
            prompt_logprobs=self.prompt_logprobs(r) if seq.num_tokens - r.num_prompt_tokens == 1 else None)

    def scored(self, seq: Sequence) -> RequestOutput:
        """The one update of a request that only scores its prompt (max_tokens 0): no token."""
        r = seq.request
        queue, first = self._times(r)
        return RequestOutput(
            request_id=r.request_id, index=seq.index, text="", token_ids=(), finish_reason=seq.finish_reason,
            chains=seq.num_chains, prompt_tokens=r.num_prompt_tokens, completion_tokens=0, queue_time=queue,
            first_token_time=first, prompt_logprobs=self.prompt_logprobs(r))

    def aborted(self, r: Request, index: int) -> RequestOutput:
        seq = next((s for s in r.seqs if s.index == index), None)
        text = "" if seq is None else seq.detok.delta(final=True)
        if seq is not None:
            seq.finish_reason = "abort"
        queue, first = self._times(r)
        return RequestOutput(
            request_id=r.request_id, index=index, text=text, token_ids=(), finish_reason="abort",
            chains=r.req.chains if seq is None else seq.num_chains, prompt_tokens=r.num_prompt_tokens,
            completion_tokens=0 if seq is None else seq.num_tokens - r.num_prompt_tokens,
            queue_time=queue, first_token_time=first)
