# syntax=docker/dockerfile:1
# CoLM Serve image: `docker run -p 8000:8000 IMAGE` serves the baked-in colm-tiny on 0.0.0.0:8000.
#
#   CPU (default):  docker build -t colm-serve .
#   CUDA:           docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                     -t colm-serve:cuda .
#                   docker run --gpus all -p 8000:8000 colm-serve:cuda
#
# The CUDA wheels of PyTorch carry their own CUDA runtime, so both variants share one slim base; the
# host only needs the NVIDIA driver and container toolkit. COLM_DEVICE=auto picks CUDA when torch
# sees a GPU. tests/deploy/test_entrypoint.py runs this file's install, ENV, ENTRYPOINT/CMD and
# HEALTHCHECK in a fresh virtual environment, so keep each instruction on the lines it parses.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The index that serves the torch build: .../whl/cpu, or .../whl/cu128 for the CUDA image. The pin
# in constraints-cpu.txt (torch==X.Y.Z) accepts X.Y.Z+cpu and X.Y.Z+cu128 alike.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints-cpu.txt README.md ./
COPY colm_runtime/ colm_runtime/
COPY server/ server/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints-cpu.txt .

FROM ${PYTHON_IMAGE} AS runtime
# gcc builds the C decode-attention kernel on first start (colm_runtime/model/cpu_kernels.py, about a
# second, -march=native for the host it runs on); without it the server keeps the slower torch path.
# gcc pinned to bookworm's compiler metapackage; libc6-dev pinned to the libc6 the base image already
# has (its headers must match it exactly, and the base image moves with Debian's point releases).
RUN apt-get update && apt-get install -y --no-install-recommends "gcc=4:12.2.0-3" "libc6-dev=$(dpkg-query -W -f="\${Version}" libc6)" && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid so Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN groupadd --system --gid 10001 colm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin colm \
    && mkdir -p /models
COPY --from=build /opt/venv /opt/venv
# Owned by the server's user: safetensors writes weights owner-only (0600), which root's copy would
# leave unreadable to uid 10001.
COPY --chown=10001:10001 models/colm-tiny/ /opt/colm/models/colm-tiny/
# Flags override these; mount your own model and set COLM_MODEL=/models/NAME.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COLM_HOST=0.0.0.0 \
    COLM_PORT=8000 \
    COLM_MODEL=/opt/colm/models/colm-tiny \
    COLM_DEVICE=auto \
    XDG_CACHE_HOME=/tmp/.cache
WORKDIR /opt/colm
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('COLM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["colm", "serve"]
CMD []
