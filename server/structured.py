"""Structured outputs and logit_bias on the HTTP side: the request fields -> a GrammarSpec compiled off
the event loop and the engine thread (an executor), cached by spec; logit_bias checked into pairs.

One constraint per request, from any of: OpenAI's `response_format` (json_object, json_schema), vLLM's
`guided_json` / `guided_regex` / `guided_choice`, or vLLM's newer `structured_outputs` object
(json / regex / choice / json_object). A schema or regex that does not compile is a 400 with the
grammar engine's reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict

from colm_runtime.engine.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec, canonical_json

from server.errors import InvalidRequest
from server.metrics import ServerMetrics
from server.schemas import _Sampling

CACHE_SIZE = 256  # compiled grammars kept (LRU); a schema's compiled form is tens of kilobytes
MAX_LOGIT_BIAS = 1024  # entries per request


def _schema(value, param: str) -> str:
    """A JSON schema given as an object or a JSON string -> its canonical text (the cache key)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest(f"{param} must be a JSON schema (an object)", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON schema (an object)", param=param)
    return canonical_json(value)


def _response_format(rf: dict) -> GrammarSpec | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
        return GrammarSpec("json_schema", _schema(js["schema"], "response_format"))
    raise InvalidRequest(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                         param="response_format")


def _choice(value, param: str) -> GrammarSpec:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidRequest(f"{param} must be a non-empty list of non-empty strings", param=param)
    return GrammarSpec("choice", json.dumps(value, ensure_ascii=False))


def _regex(value, param: str) -> GrammarSpec:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{param} must be a non-empty regular expression", param=param)
    return GrammarSpec("regex", value)


def _structured_outputs(so: dict) -> GrammarSpec | None:
    given = [k for k in ("json", "regex", "choice", "json_object") if so.get(k) not in (None, False)]
    if len(given) > 1:
        raise InvalidRequest(f"structured_outputs takes one of json, regex, choice, json_object; got {given}",
                             param="structured_outputs")
    if not given:
        return None
    k, param = given[0], f"structured_outputs.{given[0]}"
    if k == "json":
        return GrammarSpec("json_schema", _schema(so[k], param))
    if k == "regex":
        return _regex(so[k], param)
    if k == "choice":
        return _choice(so[k], param)
    return GrammarSpec("json_object")


def grammar_spec(req: _Sampling) -> tuple[GrammarSpec, str] | None:
    """The request's output constraint and the field that gave it (None: free text); 400 when several
    are given or one is malformed."""
    found = []
    if req.response_format is not None and (spec := _response_format(req.response_format)) is not None:
        found.append((spec, "response_format"))
    if req.guided_json is not None:
        found.append((GrammarSpec("json_schema", _schema(req.guided_json, "guided_json")), "guided_json"))
    if req.guided_regex is not None:
        found.append((_regex(req.guided_regex, "guided_regex"), "guided_regex"))
    if req.guided_choice is not None:
        found.append((_choice(req.guided_choice, "guided_choice"), "guided_choice"))
    if req.structured_outputs is not None and (spec := _structured_outputs(req.structured_outputs)) is not None:
        found.append((spec, "structured_outputs"))
    if len(found) > 1:
        raise InvalidRequest("give one output constraint: " + ", ".join(p for _, p in found) + " were all set",
                             param=found[1][1])
    return found[0] if found else None


def logit_bias(req: _Sampling) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; 400 for keys that are not integers (the ids'
    range is checked with the rest of the request: engine/validation.py)."""
    if not req.logit_bias:
        return ()
    if len(req.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias has more than {MAX_LOGIT_BIAS} entries", param="logit_bias")
    pairs = []
    for key, bias in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key[:20]!r}", param="logit_bias") from None
        pairs.append((token, float(bias)))
    return tuple(pairs)


class GrammarCache:
    """Compiled grammars by spec (LRU), compiled in the default executor: neither the event loop nor the
    engine thread waits for a compilation."""

    def __init__(self, tokenizer, vocab_size: int, metrics: ServerMetrics):
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        self.metrics = metrics
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    async def get(self, req: _Sampling) -> CompiledGrammar | None:
        """The compiled constraint of req (None: none); 400 with the reason when it does not compile."""
        found = grammar_spec(req)
        if found is None:
            return None
        spec, param = found
        grammar = self._cache.get(spec.key)
        if grammar is None:
            t0 = time.perf_counter()
            try:
                grammar = await asyncio.get_running_loop().run_in_executor(None, self.compiler.compile, spec)
            except GrammarError as e:
                raise InvalidRequest(f"{param}: the {spec.kind.replace('_', ' ')} does not compile: {e}",
                                     param=param, code="invalid_grammar") from None
            self.metrics.grammar_compile.observe(time.perf_counter() - t0)
            self._cache[spec.key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec.key)
        self.metrics.structured.labels(spec.kind).inc()
        return grammar
