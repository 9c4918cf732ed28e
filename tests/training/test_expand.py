"""Progressive scaling: `colm expand` keeps the logits at step 0, and training with --freeze-chains
keeps the old chains bit-identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from colm_runtime.checkpoint import load_model
from colm_runtime.model import CoLMModel
from colm_runtime.testing import make_model_dir, small_config
from colm_runtime.training.expand import ExpandError, expand_model

from .conftest import colm, train_tiny


@pytest.mark.parametrize("kv_sharing, tied", [(False, True), (True, True), (False, False)])
def test_expanded_model_gives_the_old_logits(kv_sharing, tied):
    old = CoLMModel(small_config(chains=(2, 2), kv_sharing=kv_sharing, vocab_size=64,
                                 tie_word_embeddings=tied)).init_weights(0, std=0.1)
    new = expand_model(old, 2, seed=5)
    assert new.cfg.chains == (2, 2, 2) and not new.cfg.tie_word_embeddings
    ids = torch.randint(0, 64, (2, 11))
    want = old.scale_logits(old(ids))
    got = new.scale_logits(new(ids))
    for k in range(2):  # old scales: identical computation on identical weights
        assert torch.equal(got[k], want[k])
    assert torch.equal(got[2], want[1])  # the new chain adds exact zeros at step 0
    torch.testing.assert_close(new.logits(new(ids), 3), old.logits(old(ids), 2), rtol=0, atol=1e-6)
    assert new(ids)[..., old.cfg.dim:].abs().sum() > 0  # the new chain does compute something


def test_expand_checks_the_new_chain():
    air = CoLMModel(small_config(chains=(2, 2), kv_sharing=True, kv_per_chain=2, vocab_size=64))
    with pytest.raises(ExpandError, match="multiple"):
        expand_model(air, 3)
    with pytest.raises(ExpandError, match="positive"):
        expand_model(air, 0)


def test_a_dense_model_whose_ffn_is_not_a_multiple_of_its_heads_expands():
    # SmolLM2's case in small: 9 heads, an FFN of 48 (SmolLM2: 1536), not a multiple of 9; a chain of
    # 3 more heads gets 48 x 3 / 9 = 16, while one head would get a fraction.
    cfg = dataclasses.replace(small_config(chains=(9,), kv_per_chain=3, vocab_size=64, head_dim=4),
                              intermediate_size=48)
    old = CoLMModel(cfg).init_weights(0, std=0.1)
    new = expand_model(old, 3, kv_heads=1, seed=1)
    assert new.cfg.chains == (9, 3) and new.cfg.kv_heads == (3, 1)
    assert new.cfg.ffn_widths == (48, 16)
    ids = torch.randint(0, 64, (1, 7))
    torch.testing.assert_close(new.logits(new(ids), 2), old.logits(old(ids), 1), rtol=0, atol=1e-5)
    with pytest.raises(ExpandError, match="not whole"):
        expand_model(old, 1)


def test_frozen_chains_stay_bit_identical(corpus, tmp_path):
    base = tmp_path / "base"
    assert train_tiny(corpus, base, "--steps", "3") == 0
    assert colm("expand", "--model", base, "--add-chain", "2", tmp_path / "x") == 0
    assert train_tiny(corpus, tmp_path / "tuned", "--init", tmp_path / "x", "--freeze-chains", "2",
                      "--steps", "4", "--lr", "1e-2") == 0
    before, after = load_model(tmp_path / "x"), load_model(tmp_path / "tuned")
    w = before.cfg.width(2)
    sb, sa = before.state_dict(), after.state_dict()
    changed = 0
    for name, t in sb.items():
        if ".chains.2." in name:
            changed += not torch.equal(t, sa[name])
        elif ".chains." in name:
            assert torch.equal(t, sa[name]), name
        else:  # embedding, LM head, norms: old chains' columns fixed, new ones train
            assert torch.equal(t[..., :w], sa[name][..., :w]), name
            changed += not torch.equal(t[..., w:], sa[name][..., w:])
    assert changed > 0
    ids = torch.randint(0, before.cfg.vocab_size, (1, 16))
    assert torch.equal(before.logits(before(ids, 2), 2), after.logits(after(ids, 2), 2))


def test_expand_cli_errors(tmp_path, capsys):
    assert colm("expand", "--model", tmp_path / "missing", "--add-chain", "2", tmp_path / "o") == 2
    assert "model directory not found" in capsys.readouterr().err
    d = make_model_dir(tmp_path / "m", small_config(chains=(2, 2), kv_sharing=True, kv_per_chain=2))
    assert colm("expand", "--model", d, "--add-chain", "1", tmp_path / "o") == 2
    assert "must be a multiple" in capsys.readouterr().err
