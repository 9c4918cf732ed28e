"""`colm train` end to end on a tiny corpus: a loadable model directory, exact resume, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from colm_runtime.checkpoint import load_model
from colm_runtime.tokenizer import Tokenizer

from .conftest import colm, train_tiny


def test_train_writes_a_model_directory_and_lowers_loss(corpus, tmp_path):
    out = tmp_path / "m"
    assert train_tiny(corpus, out, "--steps", "12", "--eval-every", "4", "--lr", "1e-2") == 0
    model = load_model(out)
    assert model.cfg.chains == (2, 2) and model.cfg.max_position_embeddings == 1024
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12]
    assert log[-1]["val_loss"]["2"] < log[0]["val_loss"]["2"]
    assert log[-1]["flops"] > log[0]["flops"] > 0


def test_tokenizer_round_trips_text(corpus, tmp_path):
    out = tmp_path / "m"
    assert train_tiny(corpus, out, "--steps", "1") == 0
    tok = Tokenizer.from_file(out / "tokenizer.json")
    text = (corpus / "doc000.txt").read_text() + "\nUnicode too: naïve café, 東京 ✓\n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text


def test_resume_continues_to_the_same_weights(corpus, tmp_path):
    """Stop at step 3, resume to step 6: bitwise the weights and moments of an uninterrupted run."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    args = ("--steps", "6", "--save-every", "2", "--grad-accum", "2")
    assert train_tiny(corpus, full, *args) == 0
    assert train_tiny(corpus, parts, *args, "--stop-at", "3") == 0
    assert json.loads((parts / "checkpoint/state.json").read_text())["progress"]["step"] == 3
    assert colm("train", "--out", parts, "--resume", "--no-progress") == 0
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(full / "checkpoint" / name), load_file(parts / "checkpoint" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"


def test_dense_baseline_and_full_model_only_loss(corpus, tmp_path):
    assert train_tiny(corpus, tmp_path / "dense", "--steps", "2", "--chains", "4") == 0
    assert load_model(tmp_path / "dense").cfg.n_chains == 1
    assert train_tiny(corpus, tmp_path / "full", "--steps", "2", "--loss-scales", "2") == 0


@pytest.mark.parametrize("extra, message", [
    (("--steps", "2", "--freeze-chains", "2"), "--freeze-chains 2 out of range"),
    (("--steps", "2", "--loss-scales", "3"), "loss scale 3 out of range"),
    (("--steps", "2", "--chains", "2,3", "--kv-heads", "2,2"), "kv_heads"),
    (("--max-tokens", "10", "--steps", "2"), "exactly one of --steps or --max-tokens"),
    (("--steps", "2", "--seq-len", "2048"), "max_position_embeddings"),
])
def test_bad_settings_are_clear_errors(corpus, tmp_path, capsys, extra, message):
    assert train_tiny(corpus, tmp_path / "m", *extra) == 2
    assert message in capsys.readouterr().err


def test_missing_and_empty_corpus_are_clear_errors(tmp_path, capsys):
    assert train_tiny(tmp_path / "nope", tmp_path / "m", "--steps", "1") == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    assert train_tiny(tmp_path / "empty", tmp_path / "m", "--steps", "1") == 2
    assert "empty corpus" in capsys.readouterr().err
    assert colm("train", "--out", tmp_path / "m", "--resume") == 2
    assert "no training state to resume from" in capsys.readouterr().err
