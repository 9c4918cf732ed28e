"""Memory per rank of `colm train --parallel fsdp`, computed from the model itself.

- Parameters are counted on the real CoLMModel (built on the meta device: no memory).
- Sharded state (1/world per rank, fp32): weights 4 B, gradients 4 B, AdamW's two moments 8 B per parameter.
- Transient unsharded state: the root unit (embedding, final norm, LM head) and two blocks (the one
  computing and the one prefetched) all-gathered in the compute dtype, with their unsharded gradients
  (reduced in fp32).
- Activations: the bytes autograd keeps for backward, MEASURED per token by running one block and the
  embedding + multi-chain loss at the real width on CPU in the compute dtype (saved-tensor hooks, each
  storage counted once), then multiplied by micro-batch x sequence x layers. With activation
  checkpointing a block keeps only its input ([tokens, dim]) and recomputes the rest in backward
  (plus one block's full activations live at a time).

Run `python -m colm_runtime.training.memory` for the 1B recipe of docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from colm_runtime.config import ModelConfig
from colm_runtime.model import CoLMModel
from colm_runtime.training.loss import MultiChainLoss

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank, by kind."""

    params: int
    sharded_states: float  # weights + gradients + AdamW moments, this rank's shard
    transient_units: float  # all-gathered root + 2 blocks, and their unsharded gradients
    activations: float
    block_bytes_per_token: float
    loss_bytes_per_token: float

    @property
    def total(self) -> float:
        return self.sharded_states + self.transient_units + self.activations


class _SavedBytes:
    """Counts the bytes of tensors autograd saves for backward (each storage once), except the
    `excluded` storages (weights and rotary tables: not activations, counted elsewhere or constant)."""

    def __init__(self, excluded: set[int]) -> None:
        self.seen: dict[int, int] = {}
        self.excluded = excluded

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.excluded:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _saved(fn, excluded: set[int]) -> int:
    counter = _SavedBytes(excluded)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        fn()
    return counter.total


def measure_per_token(cfg: ModelConfig, tokens: int = 512, dtype: torch.dtype = torch.bfloat16,
                      scales: int | None = None) -> tuple[float, float]:
    """(bytes saved per token by one block, by the embedding + multi-chain loss over scales 1..scales)."""
    torch.manual_seed(0)
    one = dataclasses.replace(cfg, n_layers=1, max_position_embeddings=max(tokens, 2))
    model = CoLMModel(one).to(dtype)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    k = one.n_chains
    ids = torch.randint(0, one.vocab_size, (1, tokens + 1))
    cos, sin = (t[:tokens] for t in model.rope(ids.device))
    x = torch.randn(1, tokens, one.dim, dtype=dtype, requires_grad=True)
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.rope(ids.device))}
    block = _saved(lambda: model.layers[0](x, k, cos, sin), fixed)
    # The whole 1-layer loss, less the block: the embedding, final norm, LM head and cross-entropies.
    loss = MultiChainLoss(model, {s: 1.0 for s in range(1, (scales or k) + 1)})
    whole = _saved(lambda: loss(ids), fixed)
    return block / tokens, (whole - block) / tokens


def plan(cfg: ModelConfig, world: int, micro_batch: int, seq_len: int, checkpointing: bool,
         compute_bytes: int = 2, per_token: tuple[float, float] | None = None) -> MemoryPlan:
    """The memory of one rank (see the module docstring for what is counted)."""
    with torch.device("meta"):
        model = CoLMModel(cfg)
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = n - block * cfg.n_layers
    states = 16 * n / world  # fp32 weights 4 + grads 4 + exp_avg 4 + exp_avg_sq 4
    transient = (root + 2 * block) * (compute_bytes + 4)
    blk_tok, loss_tok = per_token or measure_per_token(cfg)
    tokens = micro_batch * seq_len
    if checkpointing:
        acts = tokens * (cfg.n_layers * cfg.dim * compute_bytes + blk_tok + loss_tok)
    else:
        acts = tokens * (cfg.n_layers * blk_tok + loss_tok)
    return MemoryPlan(n, states, transient, acts, blk_tok, loss_tok)


def recipe_1b(chains: tuple[int, ...] = (16, 16), vocab: int = 32000) -> ModelConfig:
    """The paper's 1B setting: dim 2048 (32 heads of 64), 16 layers; FFN 2.75 x dim as `colm train`."""
    per_head = round(2.75 * 64)
    return ModelConfig(vocab_size=vocab, n_layers=16, head_dim=64, chains=chains, kv_heads=tuple(chains),
                       intermediate_size=per_head * 32, max_position_embeddings=2048, tie_word_embeddings=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="memory per rank of the 1B FSDP recipe (docs/training.md)")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    a = p.parse_args(argv)
    for chains in ((16, 16), (8, 8, 8, 8)):
        cfg = recipe_1b(chains)
        per_token = measure_per_token(cfg)
        for ckpt in (False, True):
            m = plan(cfg, a.world, a.micro_batch, a.seq_len, ckpt, per_token=per_token)
            print(f"chains {list(chains)}: {m.params / 1e9:.3f} B params; world {a.world}, micro-batch {a.micro_batch} "
                  f"x seq {a.seq_len}, activation checkpointing {'on' if ckpt else 'off'}")
            print(f"  sharded weights+grads+AdamW {m.sharded_states / GIB:6.2f} GiB | gathered root+2 blocks "
                  f"{m.transient_units / GIB:5.2f} GiB | activations {m.activations / GIB:6.2f} GiB "
                  f"(measured {m.block_bytes_per_token / 1024:.1f} KiB/token/block, "
                  f"{m.loss_bytes_per_token / 1024:.1f} KiB/token loss) | total {m.total / GIB:6.2f} GiB")


if __name__ == "__main__":
    main()
