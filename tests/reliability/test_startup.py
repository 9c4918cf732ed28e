"""A model directory that is missing, corrupt or mismatched at start-up: a clear error on stderr and a
non-zero exit status, before anything listens."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.reliability.conftest import ONE_THREAD
from tests.server.conftest import COLM, REPO, free_port


def _serve(model, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("COLM_")} | ONE_THREAD
    return subprocess.run([*COLM, "serve", "--model", str(model), "--port", str(free_port()), "--no-warmup"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _copy(model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    return d


def _tamper_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


CASES = {
    "missing-directory": (lambda d: shutil.rmtree(d), "does not exist"),
    "missing-weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "missing-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{oops"), "config"),
    "config-bad-field": (lambda d: _tamper_config(d, chains=[2, 0]), "chain"),
    "truncated-weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), "start-up failed"),
    "weights-not-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x80\x04pickle?" * 64),
                                "start-up failed"),
    "config-mismatches-weights": (lambda d: _tamper_config(d, n_layers=7), "start-up failed"),
    "vocab-mismatches-weights": (lambda d: _tamper_config(d, vocab_size=999), "start-up failed"),
    "tokenizer-corrupt": (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_directory_fails_clearly(model_dir, tmp_path, case):
    tamper, expect = CASES[case]
    d = _copy(model_dir, tmp_path)
    tamper(d)
    p = _serve(d)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert expect.lower() in out.lower(), out[-3000:]
    assert "Application startup complete" not in out
