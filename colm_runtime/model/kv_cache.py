"""Chain-sliced paged K/V storage.

One pool per KV pool of the model (config.n_kv_pools): plain CoLM has one pool per chain, pool j
holding the K/V of chain j's heads for every layer; CoLM-Air has a single pool holding the K/V
computed from chain 1, shared by every chain count. A request at k chains holds blocks in pools
0..pools_for(k)-1, so its KV memory per token is proportional to the chains it uses.

This module only stores tensors; which blocks belong to whom is the engine's block manager's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from colm_runtime.config import ModelConfig


class ChainKVCache:
    """K/V tensors of every pool: k[p], v[p]: [n_layers, num_blocks[p] + 1, block_size, kv_heads[p], head_dim].

    Block num_blocks[p] of each pool is its sink: never handed out, it takes the writes of rows whose
    K/V the pool already holds (a prefix cached in that pool but not in a higher one is recomputed
    for the higher pool only; sink_slots)."""

    def __init__(self, cfg: ModelConfig, num_blocks: Sequence[int], block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        assert len(num_blocks) == cfg.n_kv_pools, "one block count per pool"
        self.cfg, self.block_size = cfg, block_size
        self.num_blocks = tuple(int(n) for n in num_blocks)
        held = [n + 1 for n in self.num_blocks]  # + the sink
        self.offsets = tuple(sum(held[:p]) for p in range(cfg.n_kv_pools))
        self.sink_slots = tuple(n * block_size for n in self.num_blocks)  # per pool: the sink's first slot
        shape = lambda n, h: (cfg.n_layers, n, block_size, h, cfg.head_dim)
        # Pools with equal KV heads share one tensor (pool p = blocks offsets[p]..): a request's blocks
        # in all its pools can then be gathered in one index_select. Block ids stay per pool.
        self.k_all = self.v_all = None
        if len(set(cfg.pool_kv_heads)) == 1:
            self.k_all = torch.zeros(shape(sum(held), cfg.pool_kv_heads[0]), dtype=dtype, device=device)
            self.v_all = torch.zeros_like(self.k_all)
            self.k = [self.k_all[:, o : o + n] for o, n in zip(self.offsets, held)]
            self.v = [self.v_all[:, o : o + n] for o, n in zip(self.offsets, held)]
        else:
            self.k = [torch.zeros(shape(n, h), dtype=dtype, device=device)
                      for n, h in zip(held, cfg.pool_kv_heads)]
            self.v = [torch.zeros_like(t) for t in self.k]

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> tuple[int, ...]:
        """Bytes one block of each pool takes (K and V, all layers)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return tuple(2 * cfg.n_layers * block_size * h * cfg.head_dim * elem for h in cfg.pool_kv_heads)

    def write(self, layer: int, pool: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V: k, v: [R, kv_heads, hd] at flat slots [R] (block * block_size + offset)."""
        self.k[pool][layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[pool][layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, pool: int, block_table: torch.Tensor, length: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of whole blocks: block_table [B, nb] -> k, v: [B, kv_heads, nb*block_size (or length), hd]."""
        B, nb = block_table.shape

        def one(t: torch.Tensor) -> torch.Tensor:
            # index_select is several times faster than advanced indexing on CPU
            g = t[layer].index_select(0, block_table.flatten())  # [B*nb, bs, H, hd]
            g = g.view(B, nb * self.block_size, *g.shape[2:])
            if length is not None:
                g = g[:, :length]
            return g.transpose(1, 2)
        return one(self.k[pool]), one(self.v[pool])

    def gather_blocks(self, layer: int, idx: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of block lists in the shared layout: idx [N, nb] global block ids (offsets[p] + block)
        -> k, v: [N, length, kv_heads, hd]."""
        N = idx.shape[0]

        def one(t: torch.Tensor) -> torch.Tensor:
            g = t[layer].index_select(0, idx.flatten())  # [N*nb, bs, H, hd]
            return g.view(N, -1, *g.shape[2:])[:, :length]
        return one(self.k_all), one(self.v_all)

    def gather_pools(self, layer: int, idx: torch.Tensor, pools: int, length: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of several pools at once: idx [B, pools*nb] holds global block ids (offsets[p] + block)
        -> k, v: [B, pools, length, kv_heads, hd]. Needs the shared layout (k_all)."""
        B = idx.shape[0]
        k, v = self.gather_blocks(layer, idx.view(B * pools, -1), length)  # [B*pools, length, H, hd]
        return k.view(B, pools, *k.shape[1:]), v.view(B, pools, *v.shape[1:])

    def copy_blocks(self, pool: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks src[i] -> dst[i] in one pool (all layers), e.g. for copy-on-write."""
        self.k[pool][:, dst] = self.k[pool][:, src]
        self.v[pool][:, dst] = self.v[pool][:, src]
