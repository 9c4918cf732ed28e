"""Security (issue 9, item 5): keys from the environment and a file, compared in constant time; /health
and /ready open, /metrics protected when asked; no prompt, completion or key in the logs; structured
access logs; no pickle anywhere; the model directory fixed at start-up; a non-root container."""

from __future__ import annotations

import hmac
import json
import re
from pathlib import Path

import httpx

from server.auth import APIKeyChecker
from tests.reliability.conftest import KEYS, auth
from tests.server.conftest import REPO
from tests.server.helpers import assert_error

SECRET_MARKER = "zx-private-prompt-5d1e9c-zx"


def test_keys_from_env_and_file(hardened):
    for key in KEYS:
        assert httpx.get(f"{hardened.url}/v1/models", headers=auth(key)).status_code == 200
    assert_error(httpx.get(f"{hardened.url}/v1/models"), 401, "invalid_api_key")
    assert_error(httpx.get(f"{hardened.url}/v1/models", headers=auth("rel-key-env-7f3b")), 401, "invalid_api_key")
    assert_error(httpx.get(f"{hardened.url}/v1/models", headers={"Authorization": KEYS[0]}), 401)


def test_health_ready_open_metrics_protected(hardened):
    assert httpx.get(f"{hardened.url}/health").status_code == 200
    assert httpx.get(f"{hardened.url}/ready").status_code == 200
    assert_error(httpx.get(f"{hardened.url}/metrics"), 401, "invalid_api_key")
    assert httpx.get(f"{hardened.url}/metrics", headers=auth()).status_code == 200


def test_key_compare_is_constant_time(monkeypatch):
    """Every configured key is compared with hmac.compare_digest, with no early exit: a wrong key, the
    first key and the last key make the same calls."""
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    checker = APIKeyChecker(("alpha-key", "beta-key", "gamma-key"))
    for presented, ok in (("wrong", False), ("alpha-key", True), ("gamma-key", True)):
        calls.clear()
        assert checker.valid(presented) is ok
        assert calls == [b"alpha-key", b"beta-key", b"gamma-key"]


def test_prompts_completions_and_keys_never_logged(hardened, client, base_model):
    body = {"model": base_model, "prompt": f"Remember {SECRET_MARKER} forever", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    completion = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.read()
    chat = {"model": base_model, "messages": [{"role": "user", "content": SECRET_MARKER}], "max_tokens": 8}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    # errors and ignored fields must not echo the prompt either
    client.post("/v1/completions", json={**body, "prompt": SECRET_MARKER + " word" * 3000})
    client.post("/v1/completions", json={**body, "max_tokens": 0})
    client.post("/v1/completions", json={**body, "extra_field": SECRET_MARKER})
    log = Path(hardened.log_path).read_text()
    assert "colm.access" in log  # the log is being written
    assert SECRET_MARKER not in log
    assert len(completion.strip()) < 12 or completion.strip() not in log
    for key in KEYS:
        assert key not in log


def test_access_log_lines_are_structured_without_secrets(hardened, client):
    client.get("/v1/models?api_key=leak-me")
    lines = [line.split("colm.access: ", 1)[1] for line in Path(hardened.log_path).read_text().splitlines()
             if "colm.access: " in line]
    assert lines
    allowed = {"event", "method", "path", "status", "duration_ms", "client", "request_id", "chains"}
    for line in lines:
        entry = json.loads(line)
        assert set(entry) <= allowed and entry["event"] == "http_request", entry
        assert "?" not in entry["path"] and "leak-me" not in line  # route templates, no query strings
    assert any(json.loads(l)["status"] == 401 for l in lines)


PICKLE = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b|\bpickle\.(loads?|dumps?)\(|"
                    r"\btorch\.(load|save)\(|allow_pickle\s*=\s*True|\bUnpickler\b", re.MULTILINE)


def test_no_pickle_anywhere():
    """torch.load / torch.save and numpy's allow_pickle are pickle too; weights are safetensors."""
    sources = [p for d in ("colm_runtime", "server", "loadtests", "tests", "deploy", "benchmarks")
               for p in (REPO / d).rglob("*.py") if p.resolve() != Path(__file__).resolve()]
    assert len(sources) > 50
    hits = [f"{p.relative_to(REPO)}: {m.group(0).strip()}" for p in sources for m in PICKLE.finditer(p.read_text())]
    assert hits == []
    assert PICKLE.search("import pickle\n") and PICKLE.search("x = torch.load(f)")  # the pattern bites


def test_model_is_fixed_at_startup(hardened, client, base_model):
    """Requests name a served model id, never a path: other model directories and paths are 404."""
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert all(i == base_model or re.fullmatch(re.escape(base_model) + r":c\d+", i) for i in ids)
    others = [p.name for p in (REPO / "models").iterdir() if p.is_dir() and p.name != base_model]
    for name in [*others, str(REPO / "models" / base_model), f"./models/{base_model}", f"{base_model}/../x"]:
        r = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert_error(r, 404, "model_not_found")


def test_container_runs_as_non_root():
    """Backed by tests/deploy/test_dockerfile.py::test_runtime_contract; checked here with its parser."""
    from tests.deploy.dockerfile import parse

    user = parse(REPO / "Dockerfile").final.last("USER").value
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
