"""Checkpoint round trip, `colm extract` exactness, and clear errors for broken model directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from colm_runtime.checkpoint import CheckpointError, expected_shapes, load_model
from colm_runtime.cli import main
from colm_runtime.testing import make_model_dir, small_config
from tests.model._helpers import IDS, SETTINGS


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_extracted_checkpoint_equals_k_chain_forward(setting, tmp_path):
    cfg = small_config(**setting)
    src = make_model_dir(tmp_path / "src", cfg, seed=3)
    model = load_model(src)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    for k in range(1, cfg.n_chains + 1):
        assert main(["extract", "--model", str(src), "--chains", str(k), str(tmp_path / f"c{k}")]) == 0
        sub = load_model(tmp_path / f"c{k}")
        assert sub.cfg.n_chains == k and sub.cfg == cfg.truncated(k)
        assert (tmp_path / f"c{k}" / "tokenizer.json").is_file()
        diff = (sub.logits(sub(ids), k) - model.logits(model(ids, k), k)).abs().max()
        assert diff <= 1e-5
        # the sub-model stores only its chains' parameters
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters()) or k == cfg.n_chains


def test_round_trip_and_dtypes(plain_model_dir):
    m32 = load_model(plain_model_dir)
    m16 = load_model(plain_model_dir, dtype=torch.bfloat16)
    assert m16.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(0, m32.cfg.vocab_size, (1, 12))
    a, b = m32.logits(m32(ids), 4), m16.logits(m16(ids), 4)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7  # bf16 rounding flips only near-ties


def _broken(tmp_path, src, edit_config=None, edit_state=None):
    d = tmp_path / "broken"
    shutil.copytree(src, d)
    if edit_config:
        c = json.loads((d / "config.json").read_text())
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c))
    if edit_state:
        sd = load_file(d / "model.safetensors")
        edit_state(sd)
        save_file(sd, d / "model.safetensors")
    return d


@pytest.mark.parametrize("edit_config, edit_state, message", [
    (None, lambda sd: sd.pop("layers.1.ffn.down.chains.2.weight"), r"missing tensor 'layers.1.ffn.down.chains.2.weight'"),
    (None, lambda sd: sd.__setitem__("norm.weight", torch.ones(7)), r"'norm.weight' has shape \[7\]"),
    (None, lambda sd: sd.__setitem__("extra.weight", torch.ones(1)), r"unexpected tensor.*extra.weight"),
    (lambda c: c.__setitem__("chains", [2, 2, 2, -2]), None, r"chains"),
    (lambda c: c.__setitem__("kv_heads", [3, 1, 1, 1]), None, r"kv_heads"),
    (lambda c: c.__setitem__("n_layers", 2.5), None, r"n_layers"),
    (lambda c: c.__setitem__("hidden_act", "gelu"), None, r"unknown field.*hidden_act"),
    (lambda c: c.pop("vocab_size"), None, r"missing field.*vocab_size"),
    (lambda c: c.__setitem__("n_layers", 3), None, r"missing tensor 'layers.2"),
])
def test_broken_checkpoint_gives_a_clear_error(tmp_path, plain_model_dir, edit_config, edit_state, message):
    d = _broken(tmp_path, plain_model_dir, edit_config, edit_state)
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_missing_and_corrupt_files(tmp_path, plain_model_dir):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    d = _broken(tmp_path, plain_model_dir)
    (d / "model.safetensors").write_bytes(b"\x80\x04garbage that is not safetensors")  # e.g. a pickle
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(d)


def test_expected_shapes_cover_every_parameter():
    cfg = small_config(chains=(1, 3), kv_sharing=True)
    shapes = expected_shapes(cfg)
    assert shapes["layers.0.attn.qkv.chains.0.weight"] == ((1 + 2) * 8, 8)  # chain 1: q + shared k, v
    assert shapes["layers.0.attn.qkv.chains.1.weight"] == (3 * 8, 32)  # later chains: queries only
    assert shapes["layers.0.ffn.gate_up.chains.1.weight"] == (2 * 96, 32)
    assert "lm_head.weight" not in shapes  # tied by default
