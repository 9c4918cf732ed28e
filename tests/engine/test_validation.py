"""engine/validation.py: every check names the request field it concerns (`param`), the same for an
offline LLMEngine user and for the HTTP server, which runs these checks before admission."""

from __future__ import annotations

import pytest

from colm_runtime.engine import validation
from colm_runtime.engine.types import EngineOverloaded, EngineRequest, InvalidRequest, RequestTooLong, SamplingParams
from colm_runtime.engine.validation import RequestLimits
from tests.engine._helpers import make_engine, prompt, req

LIMITS = RequestLimits(n_chains=4, vocab_size=512, max_num_seqs=8, model_len=64, speculative=False)


def request(ids=None, chains=4, min_chains=1, schedule=None, speculative=None, **params) -> EngineRequest:
    return EngineRequest("r", [1, 2, 3] if ids is None else ids, SamplingParams(**{"max_tokens": 4, **params}),
                         chains, min_chains=min_chains, chain_schedule=schedule, speculative=speculative)


@pytest.mark.parametrize("bad, error, param", [
    (dict(chains=0), InvalidRequest, "chains"), (dict(chains=5), InvalidRequest, "chains"),
    (dict(chains=2, min_chains=3), InvalidRequest, "min_chains"), (dict(n=9), InvalidRequest, "n"),
    (dict(ids=[]), InvalidRequest, "prompt"), (dict(ids=[512]), InvalidRequest, "prompt"),
    (dict(ids=[-1]), InvalidRequest, "prompt"), (dict(max_tokens=62), RequestTooLong, "max_tokens"),
    (dict(ids=[1] * 64), RequestTooLong, "prompt"), (dict(schedule=()), InvalidRequest, "chain_schedule"),
    (dict(schedule=((0, 4), (2, 9))), InvalidRequest, "chain_schedule"),
    (dict(schedule=((0, 3),)), InvalidRequest, "chain_schedule"),
    (dict(logit_bias=((512, 1.0),)), InvalidRequest, "logit_bias"),
    (dict(speculative=True), InvalidRequest, "speculative"),
])
def test_each_check_names_its_field(bad, error, param):
    with pytest.raises(error) as e:
        validation.validate(request(**bad), LIMITS)
    assert e.value.param == param and str(e.value)


def test_a_good_request_passes_and_limits_are_the_engines():
    validation.validate(request(ids=[1] * 60), LIMITS)  # 60 + 4 = the whole context
    eng = make_engine(max_num_seqs=8)
    assert eng.limits == RequestLimits.of(eng.cfg, eng.config)


def test_the_context_message_and_the_prompt_field_name():
    """OpenAI's context_length_exceeded wording, naming the limit and the caller's prompt field; a
    server prompt limit is checked first."""
    with pytest.raises(RequestTooLong) as e:
        validation.validate(request(ids=[1] * 10, max_tokens=60), LIMITS, prompt_param="messages")
    assert "maximum context length is 64 tokens" in str(e.value) and "10 in the messages" in str(e.value)
    with pytest.raises(RequestTooLong) as e:
        validation.validate(request(ids=[1] * 10), RequestLimits(4, 512, 8, 64, False, max_prompt_tokens=8))
    assert e.value.param == "prompt" and "at most 8 prompt tokens" in str(e.value)


def test_an_offline_engine_gets_the_same_errors_and_the_queue_bound():
    eng = make_engine(max_waiting=1)
    with pytest.raises(InvalidRequest) as e:
        eng.add_request(req(prompt(4), chains=7))
    assert e.value.param == "chains"
    eng.add_request(req(prompt(4)))
    with pytest.raises(EngineOverloaded):
        eng.add_request(req(prompt(4)))
    with pytest.raises(EngineOverloaded):
        validation.check_queue(3, 3)
    validation.check_queue(2, 3)
