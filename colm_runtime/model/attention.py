"""Chain attention: every head belongs to one chain; a chain's queries attend to its own K/V
(plain CoLM) or to the K/V computed from chain 1 (CoLM-Air).

Q, K and V of chain i come out of one Chain-of-Linear block (rows: chain i's query heads, then its
KV heads' keys, then values); CoLM-Air's chains i > 1 produce queries only. Inside a chain, local
query head h uses KV head h // (heads / kv_heads) (GQA, copies in order; torch's enable_gqa rule).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def forward_step(self, x: torch.Tensor, batch: ForwardBatch, cache: ChainKVCache, cos: torch.Tensor,
                     sin: torch.Tensor, groups: list[AttnGroup] | None) -> torch.Tensor:
        # x: [T, width(kmax)] rows sorted by chains; cos/sin: [T, hd] at each row's position
        kmax, rows = batch.chains, batch.rows
        y = self.qkv(x, kmax, rows)
        if not self._write_kv_at_once(y, batch, cache, cos, sin):
            for p in range(self.cfg.pools_for(kmax)):
                n = batch.slots[p].shape[0]
                k, v = self._kv(y[:n], p)
                cache.write(self.layer, p, batch.slots[p], apply_rope(k, cos[:n], sin[:n]), v)
        # all chains' query heads roped at once: [T, heads(kmax), hd]
        q = apply_rope(self._all_q(y, kmax), cos, sin)
        if groups is None:
            attn = self._attend_per_chain(q, batch, cache)
        else:
            attn = self._attend_groups(q, groups, cache, kmax)
        return self.o(attn, kmax, rows)

    def _all_q(self, y: torch.Tensor, kmax: int) -> torch.Tensor:
        """Query heads of chains < kmax: [T, heads(kmax), hd]. With equal chain blocks one strided
        view replaces a slice per chain and a cat."""
        if len(set(self.q_widths[:kmax])) == 1 and len(set(self.kv_widths[:kmax])) == 1:
            w = self.q_widths[0] + 2 * self.kv_widths[0]
            return y.view(y.shape[0], -1, w)[:, :kmax, : self.q_widths[0]].reshape(y.shape[0], -1, self.cfg.head_dim)
        return torch.cat([self._q(y, j) for j in range(kmax)], dim=1)

    def _write_kv_at_once(self, y: torch.Tensor, batch: ForwardBatch, cache: ChainKVCache,
                          cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Every row uses every pool of the step and the pools share one tensor with equal chains: rope
        and store the K/V of all pools in one go (per-pool writes cost ~10 small ops per pool)."""
        P, T = self.cfg.pools_for(batch.chains), y.shape[0]
        if P == 1 or cache.k_all is None or batch.rows[-1] != T or len(set(self.cfg.chains)) != 1:
            return False
        q, kv, hd = self.q_widths[0], self.kv_widths[0], self.cfg.head_dim
        yc = y.view(T, -1, q + 2 * kv)[:, :P]  # [T, P, q + 2kv]: chain-major columns
        k = apply_rope(yc[..., q : q + kv].reshape(T, -1, hd), cos, sin)  # [T, P*h, hd]
        h = kv // hd
        k = k.view(T, P, h, hd).transpose(0, 1).reshape(P * T, h, hd)
        v = yc[..., q + kv :].transpose(0, 1).reshape(P * T, h, hd)
        bs = cache.block_size
        slots = torch.cat([batch.slots[p] + cache.offsets[p] * bs for p in range(P)])
        cache.k_all[self.layer].view(-1, h, hd).index_copy_(0, slots, k)
        cache.v_all[self.layer].view(-1, h, hd).index_copy_(0, slots, v)
        return True

    def _attend_groups(self, q: torch.Tensor, groups: list[AttnGroup], cache: ChainKVCache,
                       kmax: int) -> torch.Tensor:
        """Equal chains: each group (sequences at one chain count) attends in ONE sdpa call over all
        its chains, reading all its pools through one gather."""
        T, width = q.shape[0], self.cfg.width(kmax)
        if len(groups) == 1 and groups[0].chains == kmax and groups[0].n_rows == T:
            return self._attend_group(q, groups[0], cache)
        out = q.new_zeros(T, width)
        for g in groups:
            out[g.rows, : self.cfg.width(g.chains)] = self._attend_group(q, g, cache)
        return out

    def _attend_group(self, q: torch.Tensor, g: AttnGroup, cache: ChainKVCache) -> torch.Tensor:
        B, S, k, c, hd = g.n_seqs, g.q_len, g.chains, self.cfg.chains[0], self.cfg.head_dim
        qg = q[g.rows, : k * c].view(B, S, k, c, hd)
        K, V = cache.gather_pools(self.layer, g.block_idx, g.pools, g.kv_len)  # [B, P, L, kv, hd]
        if not self.cfg.kv_sharing:  # chain j attends pool j: fold chains into the batch
            qf = qg.permute(0, 2, 3, 1, 4).reshape(B * k, c, S, hd)
            kf, vf = (t.flatten(0, 1).transpose(1, 2) for t in (K, V))  # [B*k, kv, L, hd]
            mask = None if g.mask is None else g.mask.repeat_interleave(k, dim=0)
            o = sdpa(qf, kf, vf, mask=mask, causal=S > 1)  # [B*k, c, S, hd]
            o = o.view(B, k, c, S, hd).permute(0, 3, 1, 2, 4)
        else:  # CoLM-Air: every chain attends the same K/V: fold chains into the query rows
            qf = qg.permute(0, 3, 2, 1, 4).reshape(B, c, k * S, hd)
            kf, vf = K[:, 0].transpose(1, 2), V[:, 0].transpose(1, 2)  # [B, kv, L, hd]
            mask = g.mask if g.mask is not None else causal_mask(S, g.kv_len, q.device)
            o = sdpa(qf, kf, vf, mask=mask.repeat(1, 1, k, 1))  # [B, c, k*S, hd]
            o = o.view(B, c, k, S, hd).permute(0, 3, 2, 1, 4)
        return o.reshape(B * S, k * c * hd)

    def _attend_per_chain(self, q: torch.Tensor, batch: ForwardBatch, cache: ChainKVCache) -> torch.Tensor:
        """Unequal chains: one sdpa call per chain and group."""
        outs, dec_kv = [], {}
        for j in range(batch.chains):
            lo = self.cfg.width(j) // self.cfg.head_dim
            qj = q[: batch.rows[j], lo : lo + self.cfg.chains[j]]  # [m_j, c_j, hd]
            outs.append(self._attend(qj, j, batch, cache, dec_kv))
        return scatter_chain_outputs(outs, batch.rows, q)

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
            out[r] = o.squeeze(2)
        for g in batch.prefills:
            if g.chains <= j:
                continue
            k, v = cache.gather(self.layer, p, g.block_tables[p], g.total_len)
            qg = q[g.row_start : g.row_start + g.q_len].transpose(0, 1).unsqueeze(0)  # [1, c_j, q, hd]
            o = sdpa(qg, k, v, mask=g.mask, causal=True)
            out[g.row_start : g.row_start + g.q_len] = o[0].transpose(0, 1)
        return out.flatten(-2)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[1, 1, q_len, kv_len] bool: query i (the last q_len positions) sees keys <= its position."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= qpos)[None, None]


@dataclass(frozen=True)
class AttnGroup:
    """Sequences attended together at one chain count: a run of decode sequences, or one prefill.

    rows: their query rows (B*S, sequence-major); block_idx: [B, pools*nb] global block ids of every
    pool they read, so one index_select gathers all their K/V; mask: [B, 1, S, kv_len] or None for a
    plain causal prefill.
    """

    chains: int
    pools: int
    n_seqs: int
    q_len: int
    kv_len: int
    rows: slice | torch.Tensor
    block_idx: torch.Tensor
    mask: torch.Tensor | None

    @property
    def n_rows(self) -> int:
        return self.n_seqs * self.q_len


def plan_groups(cfg: ModelConfig, batch: ForwardBatch, cache: ChainKVCache) -> list[AttnGroup] | None:
    """Group a step's sequences for merged attention; None when chains or KV heads are unequal."""
    if len(set(cfg.chains)) != 1 or cache.k_all is None:
        return None
    groups: list[AttnGroup] = []
    start = 0
    while start < batch.dec_rows.shape[0]:
        k = _dec_chains(batch, start)
        end = start
        while end < batch.dec_rows.shape[0] and _dec_chains(batch, end) == k:
            end += 1
        P = cfg.pools_for(k)
        idx = torch.cat([batch.dec_tables[p][start:end] + cache.offsets[p] for p in range(P)], dim=1)
        d0 = batch.dec_start
        rows = slice(d0 + start, d0 + end) if d0 is not None else batch.dec_rows[start:end]
        # The step's only decode sequence sees its whole gathered context (dec_len is its own length):
        # no mask, so SDPA takes its faster unmasked path.
        mask = None if batch.dec_rows.shape[0] == 1 else batch.dec_mask[start:end]
        groups.append(AttnGroup(k, P, end - start, 1, batch.dec_len, rows, idx, mask))
        start = end
    for g in batch.prefills:
        P = cfg.pools_for(g.chains)
        idx = torch.cat([g.block_tables[p] + cache.offsets[p] for p in range(P)], dim=1)
        groups.append(AttnGroup(g.chains, P, 1, g.q_len, g.total_len,
                                slice(g.row_start, g.row_start + g.q_len), idx, g.mask))
    return groups


def _dec_chains(batch: ForwardBatch, i: int) -> int:
    """Chain count of the i-th decode sequence (dec_count[j] counts those using chain j)."""
    return sum(1 for n in batch.dec_count if n > i)
