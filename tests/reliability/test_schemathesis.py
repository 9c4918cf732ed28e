"""Schema fuzzing (issue 9, item 1): schemathesis generates requests for every operation of the live
server's /openapi.json (schema-valid and schema-invalid ones); each answer must be no 5xx, a documented
status and content type, match the documented response schema, and every error must be in OpenAI's
shape. Bounded (max examples per operation, no deadline) and derandomized, so CI runs are reproducible.

The fuzz server has a short context (--max-model-len 64), so generated requests stay cheap on a CPU.
Request bodies that name a model get the served id, so that generation paths (not only 404s) run.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.reliability.conftest import count_5xx, start

MAX_EXAMPLES = 100
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
seen = {"requests": 0, "errors": 0, "ok": 0, "5xx": 0, "operations": 0}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, model_dir):
    s = start(tmp_path_factory, model_dir, "fuzz", ["--max-model-len", "64", "--max-num-seqs", "16"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fuzz_model(fuzz_server) -> str:
    return httpx.get(f"{fuzz_server.url}/v1/models").json()["data"][0]["id"]


def assert_openai_error(response) -> None:
    if response.status_code < 400 or response.status_code == 404 and "json" not in response.headers.get(
            "content-type", ""):
        return
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def _fuzz(operation, mode: GenerationMode, model: str) -> None:
    """MAX_EXAMPLES generated cases of one operation in one mode (hypothesis shrinks a failure)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = model
        response = case.call(timeout=60)
        seen["requests"] += 1
        seen["errors" if response.status_code >= 400 else "ok"] += 1
        seen["5xx"] += response.status_code >= 500
        case.validate_response(response, checks=CHECKS)
        assert_openai_error(response)

    try:
        run()
    except Unsatisfiable:  # an operation without inputs (GET /health) has no schema-invalid request
        assert mode is GenerationMode.NEGATIVE


def _success_bodies(path: str, model: str) -> list[dict]:
    """Valid bodies of each POST operation: generation streamed and not, the tokenizer endpoints."""
    if path == "/tokenize":
        return [{"model": model, "prompt": "fuzz", "return_token_strs": True},
                {"model": model, "messages": [{"role": "user", "content": "fuzz"}]}]
    if path == "/detokenize":
        return [{"model": model, "tokens": [1, 2, 3]}]
    first = {"prompt": "fuzz"} if "chat" not in path else {"messages": [{"role": "user", "content": "fuzz"}]}
    return [{"model": model, **first, "max_tokens": 4, "stream": stream, "n": 2,
             "logprobs": 2 if "chat" not in path else True} for stream in (False, True)]


def test_openapi_fuzz(fuzz_server, fuzz_model):
    """Every operation of /openapi.json, schema-valid and schema-invalid inputs."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health", "GET /ready",
            "GET /metrics"} <= set(labels), labels
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, fuzz_model)
        if op.method.upper() == "POST":  # the success paths, streamed and not, always checked
            for body in _success_bodies(op.path, fuzz_model):
                case = op.Case(body=body, media_type="application/json")
                response = case.call(timeout=60)
                assert response.status_code == 200, response.text
                case.validate_response(response, checks=CHECKS)
                seen["requests"] += 1
                seen["ok"] += 1
    seen["operations"] = len(operations)


def test_fuzzing_left_the_server_healthy(fuzz_server, fuzz_model):
    """After the fuzz run (this module's tests run in order): no 5xx ever, idle with every block free."""
    from tests.reliability.conftest import assert_healthy

    assert_healthy(fuzz_server.url, {}, fuzz_model)
    assert count_5xx(fuzz_server.url, {}) == 0
    assert seen["requests"] > 0 and seen["5xx"] == 0
    print(f"schemathesis: {seen['operations']} operations, {seen['requests']} requests ({seen['ok']} 2xx/3xx, "
          f"{seen['errors']} 4xx), {seen['5xx']} 5xx")
