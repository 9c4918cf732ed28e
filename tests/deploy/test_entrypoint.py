"""The image's own start command, run the way the container runs it: the Dockerfile's install into a
fresh virtual environment, its ENV, WORKDIR, USER, ENTRYPOINT + CMD, then its HEALTHCHECK, a real
request, and SIGTERM. tests/deploy/image_replay.py lists what differs from Docker and why."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from .common import IN_CI, REPO
from .dockerfile import parse
from .image_replay import Image, replay
from .server_process import ServerProcess, free_port

pytestmark = pytest.mark.slow


def _require_default_model() -> None:
    if not (REPO / "models" / "colm-tiny" / "model.safetensors").is_file():
        message = "models/colm-tiny (the model the image bakes in) is not in the repository yet"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _scratch_dir() -> str | None:
    """RAM-backed /dev/shm when it can hold the ~1.2 GB image and allows executables: unpacking
    and deleting torch there takes seconds, against minutes on a disk mounted with `discard`."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    roomy = st.f_bavail * st.f_frsize > 4 << 30
    return "/dev/shm" if roomy and not st.f_flag & os.ST_NOEXEC else None


@pytest.fixture(scope="module")
def image():
    """The replayed image in a world-readable temporary root (the server may run as uid 10001)."""
    _require_default_model()
    top = Path(tempfile.mkdtemp(prefix="colm-image-", dir=_scratch_dir()))
    top.chmod(0o755)
    try:
        index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
        yield replay(parse(REPO / "Dockerfile"), REPO, top / "root", {"TORCH_INDEX_URL": index})
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _run_env(img: Image, port: int) -> dict[str, str]:
    # Loopback and a free port instead of 0.0.0.0:8000 (tests bind 127.0.0.1 only).
    return img.env | {"COLM_HOST": "127.0.0.1", "COLM_PORT": str(port)}


def test_install_is_the_packaged_server(image):
    """The venv holds a regular (not editable) install that imports nothing from the checkout."""
    python = Path(image.env["PATH"].split(":")[0]) / "python"
    code = "import colm_runtime, server; print(colm_runtime.__file__, server.__file__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=image.workdir,
                         env=image.env, timeout=60, **image.popen_user())
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert Path(path).is_relative_to(image.root) and "site-packages" in path, path


def test_entrypoint_serves_and_drains(image, tmp_path):
    """ENTRYPOINT + CMD answers /ready and a completion with the baked-in model; the HEALTHCHECK
    passes against it (and fails once it is gone); SIGTERM ends it with status 0."""
    exe = shutil.which(image.entrypoint[0], path=image.env["PATH"])
    assert exe and Path(exe).is_relative_to(image.root), f"{image.entrypoint[0]} must come from the image's venv"
    port = free_port()
    env = _run_env(image, port)
    server = ServerProcess([exe, *image.entrypoint[1:], *image.cmd], env=env, port=port, cwd=image.workdir,
                           log=tmp_path / "server.log", **image.popen_user())
    try:
        ready = server.wait_ready(timeout=240).json()
        assert ready["model"] == "colm-tiny"
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "colm-tiny", "prompt": "Once upon a time", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        probe = subprocess.run(image.healthcheck, env=env, cwd=image.workdir, capture_output=True, text=True,
                               timeout=30, **image.popen_user())
        assert probe.returncode == 0, probe.stderr
    finally:
        drain = float(env.get("COLM_DRAIN_TIMEOUT", 30))
        status = server.terminate(timeout=drain + 15)
    assert status == 0, server.output()
    probe = subprocess.run(image.healthcheck, env=env, cwd=image.workdir, capture_output=True, timeout=30,
                           **image.popen_user())
    assert probe.returncode != 0, "the HEALTHCHECK must fail when nothing answers"
