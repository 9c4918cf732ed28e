"""The FSDP memory plan (docs/training.md's 1B recipe): parameters counted on the real model, the
activation bytes measured per token really are per token, and checkpointing keeps less."""

from __future__ import annotations

import pytest

from colm_runtime.config import ModelConfig
from colm_runtime.model import CoLMModel
from colm_runtime.training.memory import measure_per_token, plan, recipe_1b

CFG = ModelConfig(vocab_size=512, n_layers=3, head_dim=16, chains=(2, 2), kv_heads=(1, 1), intermediate_size=256,
                  max_position_embeddings=256)


def test_activation_bytes_are_linear_in_tokens():
    """Per-token bytes at 64 and 192 tokens agree: weights and rotary tables are not counted, and the
    attention keeps no [S, S] scores."""
    a, b = measure_per_token(CFG, tokens=64), measure_per_token(CFG, tokens=192)
    assert a == pytest.approx(b, rel=0.02)
    assert a[0] > CFG.dim * 2 and a[1] > CFG.vocab_size * 4  # at least a block input, one fp32 logit row


def test_plan_counts_the_model_and_shards_its_state():
    n = sum(p.numel() for p in CoLMModel(CFG).parameters())
    one, eight = plan(CFG, 1, 2, 128, False), plan(CFG, 8, 2, 128, False)
    assert one.params == eight.params == n
    assert one.sharded_states == 16 * n and eight.sharded_states == 2 * n
    ckpt = plan(CFG, 8, 2, 128, True, per_token=(one.block_bytes_per_token, one.loss_bytes_per_token))
    assert ckpt.activations < eight.activations
    assert eight.activations == pytest.approx(2 * 128 * (3 * one.block_bytes_per_token + one.loss_bytes_per_token))


def test_recipe_is_the_papers_shape():
    cfg = recipe_1b((8, 8, 8, 8))
    assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (2048, 16, 32)


def test_the_doc_quotes_the_plan():
    """docs/training.md's table is this module's output: parameters and every GiB figure recomputed
    from the per-token bytes the doc states (the measurement itself takes a minute, so it is not rerun)."""
    import re
    from pathlib import Path

    from colm_runtime.training.memory import GIB

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    pattern = re.compile(r"chains \[([\d, ]+)\]: ([\d.]+) B params; world (\d+), micro-batch (\d+) x seq (\d+), "
                         r"activation checkpointing (on|off)\n +sharded weights\+grads\+AdamW +([\d.]+) GiB \| gathered "
                         r"root\+2 blocks +([\d.]+) GiB \| activations +([\d.]+) GiB \(measured ([\d.]+) KiB/token/block, "
                         r"([\d.]+) KiB/token loss\) \| total +([\d.]+) GiB")
    rows = pattern.findall(doc)
    assert len(rows) == 4
    for chains, params, world, mb, seq, ckpt, states, transient, acts, blk, loss, total in rows:
        cfg = recipe_1b(tuple(int(c) for c in chains.split(",")))
        m = plan(cfg, int(world), int(mb), int(seq), ckpt == "on", per_token=(float(blk) * 1024, float(loss) * 1024))
        assert f"{m.params / 1e9:.3f}" == params
        for value, text in ((m.sharded_states, states), (m.transient_units, transient), (m.total, total)):
            assert abs(value / GIB - float(text)) < 0.02, (chains, ckpt, text)
        assert abs(m.activations / GIB - float(acts)) < 0.02
