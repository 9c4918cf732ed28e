"""Shared fixtures: small random model directories of both variants (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colm_runtime.paths import default_model_dir
from colm_runtime.testing import make_model_dir, small_config


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test tensors are tiny; on a 2-core machine shared with test servers, OpenMP's spin-waiting makes
    two threads many times slower than one."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def plain_model_dir(tmp_path_factory):
    """Plain CoLM, chains {2,2,2,2}, one KV head per chain."""
    return make_model_dir(tmp_path_factory.mktemp("plain"), small_config())


@pytest.fixture(scope="session")
def air_model_dir(tmp_path_factory):
    """CoLM-Air, chains {2,2,2,2}, one shared KV head."""
    return make_model_dir(tmp_path_factory.mktemp("air"), small_config(kv_sharing=True))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The default model if it is there, else a random plain CoLM (4 chains of 2 heads)."""
    default = default_model_dir()
    if (default / "config.json").is_file() and (default / "model.safetensors").is_file():
        return default
    return make_model_dir(tmp_path_factory.mktemp("model"), small_config(max_position_embeddings=1024))
