"""Chain attention: every head belongs to one chain; a chain's queries attend to its own K/V
(plain CoLM) or to the K/V computed from chain 1 (CoLM-Air).

Q, K and V of chain i come out of one Chain-of-Linear block (rows: chain i's query heads, then its
KV heads' keys, then values); CoLM-Air's chains i > 1 produce queries only. Inside a chain, local
query head h uses KV head h // (heads / kv_heads) (GQA, copies in order; torch's enable_gqa rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colm_runtime.config import ModelConfig
from colm_runtime.model.batch import ForwardBatch
from colm_runtime.model.kv_cache import ChainKVCache
from colm_runtime.model.layers import ChainLinear, apply_rope, scatter_chain_outputs


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    # q: [B, Hq, S, hd], k/v: [B, Hkv, L, hd] -> [B, Hq, S, hd]
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=gqa)


class ChainAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_widths = cfg.chain_widths
        self.kv_widths = tuple(h * hd for h in cfg.chain_kv_heads)
        self.qkv = ChainLinear(cfg.chain_widths, [q + 2 * kv for q, kv in zip(self.q_widths, self.kv_widths)])
        self.o = ChainLinear(cfg.chain_widths, cfg.chain_widths)

    # ---- column slices of the fused qkv output -------------------------------------------------------
    def _q(self, y: torch.Tensor, j: int) -> torch.Tensor:
        base = self.qkv.out_offsets[j]
        return y[..., base : base + self.q_widths[j]].unflatten(-1, (self.cfg.chains[j], self.cfg.head_dim))

    def _kv(self, y: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        # plain CoLM: pool p is chain p's K/V; CoLM-Air: pool 0 comes from chain 0.
        base = self.qkv.out_offsets[p] + self.q_widths[p]
        w, h = self.kv_widths[p], self.cfg.pool_kv_heads[p]
        return (y[..., base : base + w].unflatten(-1, (h, self.cfg.head_dim)),
                y[..., base + w : base + 2 * w].unflatten(-1, (h, self.cfg.head_dim)))

    # ---- full causal forward, no cache (training, reference) ----------------------------------------
    def forward_full(self, x: torch.Tensor, chains: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, S, width(chains)]; cos/sin: [S, hd]
        y = self.qkv(x, chains)
        kv = {}
        outs = []
        for j in range(chains):
            p = self.cfg.kv_pool_of_chain(j)
            if p not in kv:
                k, v = self._kv(y, p)
                kv[p] = (apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2))
            q = apply_rope(self._q(y, j), cos, sin).transpose(1, 2)  # [B, c_j, S, hd]
            o = sdpa(q, *kv[p], causal=True)
            outs.append(o.transpose(1, 2).flatten(-2))
        return self.o(torch.cat(outs, dim=-1), chains)

    # ---- one engine step over the paged cache ---------------------------------------------------------
    def forward_step(self, x: torch.Tensor, batch: ForwardBatch, cache: ChainKVCache,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, width(kmax)] rows sorted by chains; cos/sin: [T, hd] at each row's position
        kmax, rows = batch.chains, batch.rows
        y = self.qkv(x, kmax, rows)
        for p in range(self.cfg.pools_for(kmax)):
            n = batch.slots[p].shape[0]
            k, v = self._kv(y[:n], p)
            cache.write(self.layer, p, batch.slots[p], apply_rope(k, cos[:n], sin[:n]), v)
        dec_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        outs = []
        for j in range(kmax):
            q = apply_rope(self._q(y[: rows[j]], j), cos[: rows[j]], sin[: rows[j]])  # [m_j, c_j, hd]
            outs.append(self._attend(q, j, batch, cache, dec_kv))
        return self.o(scatter_chain_outputs(outs, rows, x), kmax, rows)

    def _attend(self, q: torch.Tensor, j: int, batch: ForwardBatch, cache: ChainKVCache,
                dec_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        p = self.cfg.kv_pool_of_chain(j)
        out = q.new_empty(q.shape)
        nd = batch.dec_count[j]
        if nd:
            if p not in dec_kv:  # CoLM-Air: every chain reuses one gather of the shared pool
                dec_kv[p] = cache.gather(self.layer, p, batch.dec_tables[p], batch.dec_len)
            k, v = dec_kv[p]
            d0 = batch.dec_start
            r = slice(d0, d0 + nd) if d0 is not None else batch.dec_rows[:nd]
            o = sdpa(q[r].unsqueeze(2), k[:nd], v[:nd], mask=batch.dec_mask[:nd])  # [nd, c_j, 1, hd]
            if d0 == 0 and nd == q.shape[0]:
                return o.flatten(1)  # every row is a decode row: no scatter needed
            out[r] = o.squeeze(2)
        for g in batch.prefills:
            if g.chains <= j:
                continue
            k, v = cache.gather(self.layer, p, g.block_tables[p], g.total_len)
            qg = q[g.row_start : g.row_start + g.q_len].transpose(0, 1).unsqueeze(0)  # [1, c_j, q, hd]
            o = sdpa(qg, k, v, mask=g.mask, causal=True)
            out[g.row_start : g.row_start + g.q_len] = o[0].transpose(0, 1)
        return out.flatten(-2)
