"""Structured outputs and logit_bias in the engine, on the default model (colm-tiny, whose free text is
not JSON): valid instances at every chain count, greedy and sampled; unconstrained rows of a mixed batch
unchanged; the same tokens through preemption, chain switches and speculative decoding."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec, canonical_json
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.sampler import TokenMasks, constrain
from colm_runtime.engine.types import EngineRequest, SamplingParams

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "admin": {"type": "boolean"}},
                  "required": ["id", "admin"], "additionalProperties": False}},
        "required": ["name", "owner"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"kind": {"enum": ["list", "dict", "set"]},
                                              "mode": {"type": "string", "enum": ["r", "w"]}},
             "required": ["kind", "mode"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
                  "maxItems": 4},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
        "required": ["items", "tags"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1,
                                                       "multipleOf": 0.01},  # bounded digits too
                                                 "n": {"type": "integer", "minimum": 10, "maximum": 20}},
                "required": ["p", "n"], "additionalProperties": False},
}
PROMPT = "Return a JSON object:"


@pytest.fixture(scope="module")
def engine(model_dir) -> LLMEngine:
    return LLMEngine.from_model_dir(model_dir, EngineConfig(kv_cache_memory=1 << 24))


@pytest.fixture(scope="module")
def grammars(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.cfg.vocab_size)
    out = {name: compiler.compile(GrammarSpec("json_schema", canonical_json(s))) for name, s in SCHEMAS.items()}
    out["object"] = compiler.compile(GrammarSpec("json_object"))
    return out


_n = iter(range(10**9))


def _req(engine, chains, grammar=None, prompt=PROMPT, max_tokens=96, **params) -> EngineRequest:
    params = {"temperature": 0.0, "max_tokens": max_tokens, **params}
    return EngineRequest(f"r{next(_n)}", engine.tokenizer.encode(prompt), SamplingParams(**params), chains,
                         grammar=grammar)


def _run(engine, reqs):
    out = engine.generate(reqs)
    return [out[r.request_id][0] for r in reqs]


def _check(name: str, completion) -> None:
    assert completion.finish_reason == "stop", completion
    value = json.loads(completion.text)
    if name == "object":
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, SCHEMAS[name])


def test_every_chain_count_greedy_and_sampled(engine, grammars):
    # Sampled json_object is left out: without a schema's maxLength nothing bounds a string, and a small
    # model sampling inside one may run to max_tokens (finish "length", as with any server).
    reqs = [(name, _req(engine, k, grammars[name], **kw)) for k in range(1, engine.cfg.n_chains + 1)
            for name in grammars for kw in ({}, {"temperature": 0.8, "seed": k})
            if name != "object" or not kw]
    for (name, _), c in zip(reqs, _run(engine, [r for _, r in reqs])):
        _check(name, c)
    free = _run(engine, [_req(engine, k, max_tokens=16) for k in range(1, engine.cfg.n_chains + 1)])
    assert not any(c.text.lstrip().startswith("{") for c in free)  # the model's own text is not JSON


def test_mixed_batch_leaves_unconstrained_rows_unchanged(engine, grammars):
    k = engine.cfg.n_chains
    free = [_req(engine, c, prompt=p, max_tokens=12, **kw) for c in (1, k) for p in ("The list type", "A dict")
            for kw in ({}, {"temperature": 1.0, "seed": 7})]
    bound = [_req(engine, c, grammars[name], **kw) for c in (1, k) for name in ("nested", "array")
             for kw in ({}, {"temperature": 0.9, "seed": 3})]
    alone_free = [_run(engine, [_req(engine, r.chains, prompt=engine.tokenizer.decode(r.prompt_token_ids),
                                     max_tokens=12, **_kw(r))])[0] for r in free]
    alone_bound = [_run(engine, [_req(engine, r.chains, r.grammar, **_kw(r))])[0] for r in bound]
    mixed = _run(engine, free + bound)
    assert [c.token_ids for c in mixed[: len(free)]] == [c.token_ids for c in alone_free]
    assert [c.token_ids for c in mixed[len(free):]] == [c.token_ids for c in alone_bound]


def _kw(r: EngineRequest) -> dict:
    return {"temperature": r.params.temperature, "seed": r.params.seed}


def test_preemption_and_chain_switches_keep_the_grammar_state(model_dir, engine, grammars):
    reqs = lambda e: [_req(e, 4, grammars[n], max_tokens=56, **kw)  # noqa: E731
                      for n in ("nested", "array", "numbers") for kw in ({}, {"temperature": 0.8, "seed": 1})]
    ample = _run(engine, reqs(engine))
    tiny = LLMEngine.from_model_dir(model_dir, EngineConfig(kv_cache_memory=1 << 18, block_size=4))  # 64 tokens a pool
    squeezed = _run(tiny, reqs(tiny))
    assert tiny.scheduler.preemptions_total + tiny.scheduler.shrinks_total > 0
    assert [c.token_ids for c in squeezed] == [c.token_ids for c in ample]
    switched = []
    for name in ("nested", "array"):
        r = _req(engine, 4, grammars[name])
        r.chain_schedule, r.min_chains = ((0, 4), (3, 1), (9, 3), (15, 2)), 1
        switched.append((name, r))
    for (name, _), c in zip(switched, _run(engine, [r for _, r in switched])):
        _check(name, c)
        assert len(set(c.token_chains)) > 1


def test_speculative_drafts_follow_the_grammar(model_dir, engine, grammars):
    spec = LLMEngine.from_model_dir(model_dir, EngineConfig(kv_cache_memory=1 << 24, num_speculative_tokens=4))
    spec.spec.throughput_gate = False  # speculate on every step, whatever it costs on this CPU
    names = ["nested", "enum", "array", "object"]
    greedy = [_req(spec, 4, grammars[n]) for n in names]
    assert [c.token_ids for c in _run(spec, greedy)] == [
        c.token_ids for c in _run(engine, [_req(engine, 4, grammars[n]) for n in names])]
    assert spec.spec.proposed_total > 0 and spec.spec.accepted_total > 0
    sampled = [(n, _req(spec, k, grammars[n], temperature=0.9, seed=k)) for n in names for k in (2, 4)]
    for (name, _), c in zip(sampled, _run(spec, [r for _, r in sampled])):
        _check(name, c)


def test_logit_bias_removes_and_forces_tokens(engine):
    base = _run(engine, [_req(engine, 2, max_tokens=8)])[0].token_ids
    banned = _run(engine, [_req(engine, 2, max_tokens=8, logit_bias=((base[0], -100.0),))])[0].token_ids
    assert base[0] not in banned and banned != base
    forced_id = engine.tokenizer.encode(" JSON")[0]
    forced = _run(engine, [_req(engine, 2, max_tokens=8, temperature=1.0, seed=0,
                                logit_bias=((forced_id, 100.0),))])[0].token_ids
    assert forced == [forced_id] * 8


def test_compile_errors_and_validation(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.cfg.vocab_size)
    with pytest.raises(GrammarError, match="foo"):
        compiler.compile(GrammarSpec("json_schema", '{"type": "foo"}'))
    with pytest.raises(GrammarError, match="regex"):
        compiler.compile(GrammarSpec("regex", "(a"))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))
    from colm_runtime.engine.types import InvalidRequest
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.validate(_req(engine, 1, logit_bias=((engine.cfg.vocab_size, 1.0),)))


def test_constrain_is_a_bitmask_and_a_bias_on_the_constrained_rows_only():
    g = torch.Generator().manual_seed(0)
    B, V = 5, 100
    logits = torch.randn(B, V, generator=g)
    allowed = torch.rand(2, V, generator=g) < 0.3  # rows 1 and 3
    bits = torch.zeros(2, (V + 31) // 32 * 32, dtype=torch.int64)
    bits[:, :V] = allowed.long()
    packed = (bits.view(2, -1, 32) << torch.arange(32)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement words
    biases = [(), ((4, 2.5), (4, 1.0)), (), (), ((0, -100.0),)]
    out = constrain(logits, biases, TokenMasks([1, 3], packed))
    want = logits.clone()
    want[1, 4] += 3.5
    want[4, 0] -= 100
    want[1] = want[1].masked_fill(~allowed[0], float("-inf"))
    want[3] = want[3].masked_fill(~allowed[1], float("-inf"))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    assert constrain(logits, [()] * B) is logits  # nothing to do: no copy


def test_forked_completions_each_follow_the_grammar(engine, grammars):
    """n > 1: the forked completions start from fresh matchers (their first masks are filled at the
    fork, the later ones during the forward)."""
    out = engine.generate([_req(engine, 3, grammars["enum"], temperature=1.0, seed=4, n=4)])
    (completions,) = out.values()
    assert len(completions) == 4
    for c in completions:
        _check("enum", c)


def test_a_grammar_that_allows_nothing_more_allows_only_eos(engine):
    from colm_runtime.engine.grammar import fill_bitmask
    from colm_runtime.engine.sampler import mask_penalty, unpack_bitmask

    g = GrammarCompiler(engine.tokenizer, engine.cfg.vocab_size).compile(GrammarSpec("choice", '["yes"]'))
    done, broken = g.matcher(), g.matcher()
    for t in engine.tokenizer.encode("yes"):
        done.consume(t)
    broken.ll.consume_token(engine.tokenizer.encode("no")[0])  # a token outside the grammar: error state
    packed = fill_bitmask([done, broken], engine.cfg.vocab_size)
    allowed = unpack_bitmask(packed, engine.cfg.vocab_size)
    assert allowed.nonzero()[:, 1].tolist() == [engine.tokenizer.eos_token_id] * 2
    penalty = mask_penalty(packed, engine.cfg.vocab_size)  # what the sampler adds: 0 allowed, -inf not
    assert torch.equal(penalty == 0, allowed == 1) and torch.isneginf(penalty[allowed == 0]).all()
