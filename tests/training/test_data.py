"""Corpus preparation and packing."""

from __future__ import annotations

import torch

from colm_runtime.training.data import DataPosition, PackedDataset
from colm_runtime.training.pydocs import SOURCES, is_validation, rest_to_text

from .conftest import colm


def test_rest_to_text_keeps_words_and_drops_bookkeeping():
    rest = (".. index:: single: foo\n.. _label:\n\nUse :func:`json.dumps` or :ref:`the guide <guide>`,"
            " see `Python <https://python.org>`_.\n\n    >>> 1 + 1\n")
    text = rest_to_text(rest)
    assert "index::" not in text and "_label" not in text
    assert "Use json.dumps or the guide, see Python." in text and ">>> 1 + 1" in text


def test_split_is_deterministic_and_small():
    names = [f"library/mod{i}.rst.txt" for i in range(1000)]
    held = [n for n in names if is_validation(n, 5)]
    assert held == [n for n in names if is_validation(n, 5)] and 20 < len(held) < 80


def test_prepare_from_an_unpacked_package(tmp_path, capsys):
    src = tmp_path / "root" / SOURCES / "library"
    src.mkdir(parents=True)
    for i in range(40):
        (src / f"m{i}.rst.txt").write_text(f"Module {i}\n========\n\n" + "Some prose about it. " * 20)
    out = tmp_path / "out"
    assert colm("data", "python-docs", "--out", out, "--from-unpacked", tmp_path / "root") == 0
    n_train, n_val = len(list((out / "train").glob("*.txt"))), len(list((out / "validation").glob("*.txt")))
    assert n_train + n_val == 40 and n_val >= 1
    assert "PSF" in (out / "SOURCE").read_text() or "Python Software Foundation" in (out / "SOURCE").read_text()


def test_missing_apt_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    assert colm("data", "python-docs", "--out", tmp_path / "out") == 2
    assert "apt-get" in capsys.readouterr().err


def test_packing_and_positions_cover_an_epoch_once():
    ds = PackedDataset(torch.arange(101), seq_len=10)
    assert len(ds) == 10 and torch.equal(ds.windows[1], torch.arange(10, 21))
    it = ds.batches(2, seed=3, pos=DataPosition())
    seen = torch.cat([next(it)[0][:, 0] for _ in range(5)])
    assert sorted(seen.tolist()) == list(range(0, 100, 10))
    _, pos = next(it)
    assert pos == DataPosition(1, 2)  # the next epoch began
    # two ranks split each global batch without overlap
    r0 = next(ds.batches(2, 3, DataPosition(), 0, 2))[0][:, 0]
    r1 = next(ds.batches(2, 3, DataPosition(), 1, 2))[0][:, 0]
    assert not set(r0.tolist()) & set(r1.tolist())
