"""Chain expansion (progressive scaling): add a chain of C heads to a trained model.

The old model becomes chains 1..n; every tensor of the old model is a leading slice of the new one
(Chain-of-Linear blocks of old chains keep their shapes, shared tensors grow by columns). New blocks,
new embedding columns and new norm weights are freshly initialised; the new LM-head columns are zero,
so at step 0 the expanded model's logits at n+1 chains equal the old model's exactly.

Decision: the expanded model always has a separate (untied) LM head. With a tied head the new
embedding columns would be the new head columns; they must be zero in the head (exact logits) but
fresh in the embedding (so the new chain has an input signal), which a single tensor cannot be.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from colm_runtime.config import ConfigError, ModelConfig
from colm_runtime.model import CoLMModel


class ExpandError(ValueError):
    """The requested expansion is impossible for this model; the message says why."""


def expanded_config(cfg: ModelConfig, heads: int, kv_heads: int | None = None) -> ModelConfig:
    """The config with one more chain of `heads` heads; old chains keep their FFN widths."""
    if heads < 1:
        raise ExpandError(f"--add-chain must be a positive head count, got {heads}")
    # The FFN keeps its width per head: old chains keep theirs, the new chain gets I * heads / n_heads,
    # which must be whole (SmolLM2: 1536 over 9 heads, so a new chain needs a multiple of 3 heads).
    if (cfg.intermediate_size * heads) % cfg.n_heads:
        raise ExpandError(f"a chain of {heads} heads would get an FFN width of {cfg.intermediate_size} x "
                          f"{heads} / {cfg.n_heads}, which is not whole; pick a head count that makes it whole")
    intermediate = cfg.intermediate_size * (cfg.n_heads + heads) // cfg.n_heads
    if cfg.kv_sharing:
        kv = cfg.kv_heads
        if heads % kv[0]:
            raise ExpandError(f"CoLM-Air shares {kv[0]} KV heads: the new chain's heads ({heads}) must be a multiple")
    else:
        new_kv = kv_heads if kv_heads is not None else math.gcd(heads, cfg.kv_heads[-1])
        if new_kv < 1 or heads % new_kv:
            raise ExpandError(f"the new chain's {heads} heads are not a multiple of its KV heads ({new_kv})")
        kv = cfg.kv_heads + (new_kv,)
    try:
        return dataclasses.replace(cfg, chains=cfg.chains + (heads,), kv_heads=kv,
                                   intermediate_size=intermediate,
                                   tie_word_embeddings=False)
    except ConfigError as e:
        raise ExpandError(str(e)) from None


@torch.no_grad()
def expand_model(old: CoLMModel, heads: int, kv_heads: int | None = None, seed: int = 0,
                 std: float = 0.02) -> CoLMModel:
    """A new model with one more chain whose logits at step 0 equal the old model's (fp32)."""
    cfg = expanded_config(old.cfg, heads, kv_heads)
    new = CoLMModel(cfg).init_weights(seed, std=std)
    old_state = old.state_dict()
    if old.cfg.tie_word_embeddings:
        old_state["lm_head.weight"] = old_state["embed.weight"]
    new_state = new.state_dict()
    for name, t in old_state.items():
        dst = new_state[name]
        assert all(a <= b for a, b in zip(t.shape, dst.shape)) and t.dim() == dst.dim(), name
        dst[tuple(slice(0, n) for n in t.shape)] = t.to(dst.dtype)
    new_state["lm_head.weight"][:, old.cfg.dim :] = 0  # the new chain adds nothing to the logits yet
    new.load_state_dict(new_state)
    return new.to(next(old.parameters()).dtype)
