"""Helpers for the model tests: step-forward runners over a paged cache."""

from __future__ import annotations

import random

import torch

from colm_runtime.config import ModelConfig
from colm_runtime.model import ChainKVCache, CoLMModel, ForwardBatch, SeqSpec

SETTINGS = [
    dict(chains=(2, 2, 2, 2)),
    dict(chains=(1, 3)),
    dict(chains=(2, 2, 4), kv_per_chain=2),
    dict(chains=(2, 2, 2, 2), kv_sharing=True),
    dict(chains=(2, 6), kv_sharing=True, kv_per_chain=2),
]
IDS = ["colm-2222", "colm-13", "colm-224-gqa", "air-2222", "air-26"]


class PagedRunner:
    """Drives forward_step for several sequences with shuffled (non-contiguous) block tables."""

    def __init__(self, model: CoLMModel, block_size: int = 4, blocks: int = 256, seed: int = 0):
        self.model, self.cfg, self.bs = model, model.cfg, block_size
        dtype, self.device = model.embed.weight.dtype, model.embed.weight.device
        self.cache = ChainKVCache(self.cfg, [blocks] * self.cfg.n_kv_pools, block_size, dtype, self.device)
        self.free = [list(range(blocks)) for _ in range(self.cfg.n_kv_pools)]
        for f in self.free:
            random.Random(seed).shuffle(f)
        self.tables: dict[int, list[list[int]]] = {}

    def table(self, sid: int, upto: int) -> list[list[int]]:
        t = self.tables.setdefault(sid, [[] for _ in range(self.cfg.n_kv_pools)])
        for p in range(self.cfg.n_kv_pools):
            while len(t[p]) * self.bs < upto:
                t[p].append(self.free[p].pop())
        return t

    def step(self, items: list[tuple[int, list[int], int, int]], all_logits: bool = False) -> list[torch.Tensor]:
        """items: (seq id, new tokens, ctx_len, chains) -> logits per item in the caller's order: the last
        token's, or every new token's [len(tokens), V] when all_logits (num_logits, as a verify step)."""
        specs = [SeqSpec(toks, ctx, k, self.table(sid, ctx + len(toks)), num_logits=len(toks) if all_logits else 1)
                 for sid, toks, ctx, k in items]
        batch = ForwardBatch.build(self.cfg, specs, self.bs, self.device)
        logits = self.model.forward_step(batch, self.cache)
        if all_logits:
            out, row = [None] * len(items), 0
            for i in batch.order:
                n = len(items[i][1])
                out[i] = logits[row : row + n]
                row += n
            return out
        out = [None] * len(items)
        for pos, i in enumerate(batch.order):
            out[i] = logits[pos]
        return out


def full_logits(model: CoLMModel, ids: list[int], chains: int) -> torch.Tensor:
    """[S, V] logits of a full causal pass (no cache)."""
    with torch.no_grad():
        x = torch.tensor([ids])
        return model.logits(model(x, chains), chains)[0]


def rand_ids(cfg: ModelConfig, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
