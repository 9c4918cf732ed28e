"""Fixtures for training tests: a tiny real-text corpus on disk and a small `colm train` helper."""

from __future__ import annotations

from pathlib import Path

import pytest

from colm_runtime.cli import main
from colm_runtime.testing import sample_text

TINY_MODEL = ["--vocab-size", "320", "--chains", "2,2", "--layers", "1", "--head-dim", "8", "--seq-len", "32",
              "--batch-size", "4", "--warmup-steps", "2", "--eval-every", "1000", "--eval-tokens", "256",
              "--no-progress", "--threads", "1"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Docstrings of standard modules, one file per docstring (English text that ships with Python)."""
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(sample_text()[:120]):
        (d / f"doc{i:03d}.txt").write_text(text)
    return d


def colm(*argv: str) -> int:
    """Run the `colm` command in-process; SystemExit (argparse errors) becomes its status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)


def train_tiny(corpus: Path, out: Path, *extra: str) -> int:
    return colm("train", "--data", corpus, "--out", out, *TINY_MODEL, *extra)
