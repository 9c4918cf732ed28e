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
from colm_runtime.model import cpu_kernels
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
                     sin: torch.Tensor, plan: StepPlan | None) -> torch.Tensor:
        # x: [T, width(kmax)] rows sorted by chains; cos/sin: [T, hd] at each row's position
        kmax, rows = batch.max_chains, batch.chain_rows
        y = self.qkv(x, kmax, rows)
        if plan is not None and plan.kv_slots is not None:
            q = self._rope_and_store(y, plan, cache, cos, sin)
        else:
            for p in range(self.cfg.pools_for(kmax)):
                n = batch.slots[p].shape[0]
                k, v = self._kv(y[:n], p)
                cache.write(self.layer, p, batch.slots[p], apply_rope(k, cos[:n], sin[:n]), v)
            q = apply_rope(self._all_q(y, kmax), cos, sin)  # all chains' query heads: [T, heads(kmax), hd]
        if plan is None:
            attn = self._attend_per_chain(q, batch, cache)
        else:
            attn = self._attend_plan(q, plan, cache, kmax)
        return self.o(attn, kmax, rows)

    def _all_q(self, y: torch.Tensor, kmax: int) -> torch.Tensor:
        """Query heads of chains < kmax: [T, heads(kmax), hd]. With equal chain blocks one strided
        view replaces a slice per chain and a cat."""
        if len(set(self.q_widths[:kmax])) == 1 and len(set(self.kv_widths[:kmax])) == 1:
            w = self.q_widths[0] + 2 * self.kv_widths[0]
            return y.view(y.shape[0], -1, w)[:, :kmax, : self.q_widths[0]].reshape(y.shape[0], -1, self.cfg.head_dim)
        return torch.cat([self._q(y, j) for j in range(kmax)], dim=1)

    def _rope_and_store(self, y: torch.Tensor, plan: StepPlan, cache: ChainKVCache, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
        """Equal chains, one pool per chain: rope the queries and keys of every chain in one go, store
        the new K/V of every pool at once (per-pool writes cost ~10 small ops per pool) and return the
        roped queries [T, heads(kmax), hd]. Rows are roped for every chain of the step; plan.kv_rows
        keeps only the (pool, row) pairs a row owns, so a row at fewer chains writes nothing into the
        pools it has no blocks in."""
        P, T = plan.kv_pools, y.shape[0]
        q, kv, hd = self.q_widths[0], self.kv_widths[0], self.cfg.head_dim
        c, h = q // hd, kv // hd
        kc, vc = cache.k_all[self.layer], cache.v_all[self.layer]
        if cpu_kernels.rope_store_ok(y, cos, kc):  # on the CPU: one C pass, not ~15 small ops
            return cpu_kernels.rope_store_rows(y, P, c, h, hd, cos, sin, kc, vc, plan.kv_slots, plan.kv_rows)
        yc = y.view(T, P, q + 2 * kv)  # chain-major columns: [q | k | v] per chain
        qk = apply_rope(yc[..., : q + kv].reshape(T, P * (c + h), hd), cos, sin).view(T, P, c + h, hd)
        k = qk[:, :, c:].transpose(0, 1).reshape(P * T, h, hd)  # pool-major rows
        v = yc[..., q + kv :].transpose(0, 1).reshape(P * T, h, hd)
        if plan.kv_rows is not None:
            k, v = k.index_select(0, plan.kv_rows), v.index_select(0, plan.kv_rows)
        kc.view(-1, h, hd).index_copy_(0, plan.kv_slots, k)
        vc.view(-1, h, hd).index_copy_(0, plan.kv_slots, v)
        return qk[:, :, :c].reshape(T, P * c, hd)

    def _attend_plan(self, q: torch.Tensor, plan: StepPlan, cache: ChainKVCache, kmax: int) -> torch.Tensor:
        """Equal chains. Decode sequences of every chain count attend in ONE sdpa call over their
        (sequence, chain) pairs; each prefill (and CoLM-Air's decode run per chain count) is a group
        attended in one call over all its chains."""
        T, c, hd = q.shape[0], self.cfg.chains[0], self.cfg.head_dim
        d = plan.decode
        if d is None and len(plan.groups) == 1 and plan.groups[0].chains == kmax and plan.groups[0].n_rows == T:
            return self._attend_group(q, plan.groups[0], cache)
        out = q.new_zeros(T * kmax, c * hd) if d is None or d.q_idx is not None else None
        if d is not None:
            qd = q.reshape(T * kmax, c, hd)
            if d.q_idx is not None:
                qd = qd.index_select(0, d.q_idx)
            kc, vc = cache.k_all[self.layer], cache.v_all[self.layer]
            if cpu_kernels.supports(qd, kc):  # read the paged blocks in place: no gathered copy
                o = cpu_kernels.paged_decode(qd, kc, vc, d.block_idx, d.lens, d.kv_len)  # [Np, c, hd]
            else:
                K, V = cache.gather_blocks(self.layer, d.block_idx, d.kv_len)  # [Np, L, kv, hd]
                o = sdpa(qd.unsqueeze(2), K.transpose(1, 2), V.transpose(1, 2), mask=d.mask)  # [Np, c, 1, hd]
            if d.q_idx is None:  # every row a decode row at kmax: the pairs are the queries' own order
                return o.view(T, kmax * c * hd)
            out.index_copy_(0, d.q_idx, o.view(-1, c * hd))
        out = out.view(T, kmax * c * hd)
        for g in plan.groups:
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
        for j in range(batch.max_chains):
            lo = self.cfg.width(j) // self.cfg.head_dim
            qj = q[: batch.chain_rows[j], lo : lo + self.cfg.chains[j]]  # [m_j, c_j, hd]
            outs.append(self._attend(qj, j, batch, cache, dec_kv))
        return scatter_chain_outputs(outs, batch.chain_rows, q)

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
    """Sequences attended together at one chain count: one prefill, or (CoLM-Air) a run of decode
    sequences.

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


@dataclass(frozen=True)
class DecodePairs:
    """Every decode sequence of a plain CoLM step as (sequence, chain) pairs: pair i is the query heads
    of one chain of one row, attending that chain's own pool. One gather and one sdpa serve every
    chain count in the batch, and a sequence at k chains contributes exactly k pairs.

    q_idx: [Np] row * kmax + chain (an index into the queries viewed [T * kmax, c, hd]), None when it
    is 0..T*kmax-1 (every row of the step is a decode row at kmax chains: no gather, no scatter);
    block_idx: [Np, nb] global block ids; mask: [Np, 1, 1, kv_len], None for a lone sequence; lens:
    [Np] each pair's context length (what the mask says, for the in-place CPU kernel).
    Pairs are ordered row-major (a row's chains together), like the queries.
    """

    q_idx: torch.Tensor | None
    block_idx: torch.Tensor
    kv_len: int
    mask: torch.Tensor | None
    lens: torch.Tensor


@dataclass(frozen=True)
class StepPlan:
    """How a step's attention runs when the chains are equal and the pools share one K/V tensor;
    built once per step (not per layer).

    kv_slots: [R] global flat slots of the new K/V rows of every pool, pool-major (None: CoLM-Air above one
    chain, written per pool); kv_rows: [R] which rows of the [kv_pools * T] pool-major K/V are stored there
    (None: every row owns every pool).
    """

    decode: DecodePairs | None
    groups: list[AttnGroup]
    kv_pools: int
    kv_slots: torch.Tensor | None
    kv_rows: torch.Tensor | None


# A prefill chunk attends through the CPU kernel as one-query pairs (each token its own causal length)
# rather than a gather and SDPA while q_len x (its context + q_len) is at most this: at 128 fresh tokens
# SDPA's CPU kernel ran at ~11 GFLOP/s (0.83 ms a layer of SmolLM2), and the pairs re-read their K/V
# from L2. Each pair reads its whole prefix, so past this SDPA's tiles cost less (benchmarks/step_ab.py
# --prefill, fp32 on the AVX2 EPYC: 1.17x at 64 fresh tokens, 1.07x at 128, 1.00x at 192, 0.92x at 256).
PAIRS_MAX_WORK = 128 * 192


def plan_step(cfg: ModelConfig, batch: ForwardBatch, cache: ChainKVCache) -> StepPlan | None:
    """The step's attention plan; None when chains or KV heads are unequal (per-chain fallback)."""
    if len(set(cfg.chains)) != 1 or cache.k_all is None:
        return None
    groups = [] if not cfg.kv_sharing else _decode_runs(cfg, batch, cache)
    as_pairs = (not cfg.kv_sharing and kernel_takes(cfg, cache)
                and all(g.q_len * g.total_len <= PAIRS_MAX_WORK for g in batch.prefills))
    for g in [] if as_pairs else batch.prefills:
        P = cfg.pools_for(g.chains)
        idx = torch.cat([g.block_tables[p] + cache.offsets[p] for p in range(P)], dim=1)
        groups.append(AttnGroup(g.chains, P, 1, g.q_len, g.total_len,
                                slice(g.row_start, g.row_start + g.q_len), idx, g.mask))
    decode = None
    if as_pairs and batch.prefills:  # prefill tokens join the decode rows as pairs
        decode = _step_pairs(batch, cache)
    elif not cfg.kv_sharing and batch.dec_rows.shape[0]:
        decode = _decode_pairs(batch, cache)
    P, T = cfg.pools_for(batch.max_chains), batch.num_tokens
    slots = rows = None
    if P == batch.max_chains:  # a pool per chain (plain CoLM, Air at 1 chain): rope q and k at once
        bs, dev = cache.block_size, batch.input_ids.device
        slots = torch.cat([batch.slots[p] + cache.offsets[p] * bs for p in range(P)])
        if slots.shape[0] != P * T:  # some rows use fewer pools: keep each pool's leading rows
            rows = torch.cat([torch.arange(p * T, p * T + batch.slots[p].shape[0], device=dev) for p in range(P)])
    return StepPlan(decode, groups, P, slots, rows)


def kernel_takes(cfg: ModelConfig, cache: ChainKVCache) -> bool:
    """Whether cpu_kernels.paged_decode takes this model's pairs (as supports() says for its tensors)."""
    k = cache.k_all[0]
    q = k.new_empty(0, cfg.chains[0], cfg.head_dim)
    return cpu_kernels.supports(q, k)


def _step_pairs(batch: ForwardBatch, cache: ChainKVCache) -> DecodePairs:
    """Plain CoLM on the CPU kernel: every query row of the step as (row, chain) pairs, decode rows and
    prefill tokens alike; a prefill token at position c + s attends positions 0..c + s of its chain's
    pool (causal by its own length), so ONE kernel call per layer serves the whole step."""
    kmax, dev = batch.max_chains, batch.input_ids.device
    q_idx, tables, lens = [], [], []
    nd = batch.dec_rows.shape[0]
    for p, n in enumerate(batch.dec_count):
        if n:
            q_idx.append(batch.dec_rows[:n] * kmax + p)
            tables.append(batch.dec_tables[p][:n] + cache.offsets[p])
            lens.append(batch.dec_lens[:n])
    for g in batch.prefills:
        rows = torch.arange(g.row_start, g.row_start + g.q_len, device=dev)
        ctx = g.total_len - g.q_len
        for p in range(g.chains):
            q_idx.append(rows * kmax + p)
            tables.append((g.block_tables[p] + cache.offsets[p]).expand(g.q_len, -1))
            lens.append(torch.arange(ctx + 1, g.total_len + 1, device=dev))
    nb = max(t.shape[1] for t in tables)
    tables = [t if t.shape[1] == nb else torch.cat([t, t[:, :1].expand(-1, nb - t.shape[1])], 1) for t in tables]
    q_idx, idx, lens = torch.cat(q_idx), torch.cat(tables), torch.cat(lens)
    q_idx, perm = q_idx.sort()  # row-major, the queries' order
    idx, lens = idx.index_select(0, perm), lens.index_select(0, perm)
    kv_len = max([batch.dec_len] * (nd > 0) + [g.total_len for g in batch.prefills])
    mask = (torch.arange(kv_len, device=dev)[None, :] < lens[:, None])[:, None, None, :]  # the SDPA fallback's
    every_row = q_idx.shape[0] == batch.num_tokens * kmax  # all (row, chain) pairs, in order: no gather
    return DecodePairs(None if every_row else q_idx, idx, kv_len, mask, lens)


def _decode_pairs(batch: ForwardBatch, cache: ChainKVCache) -> DecodePairs:
    """Plain CoLM: pool p is chain p's, and the first dec_count[p] decode sequences use it."""
    kmax, dev = batch.max_chains, batch.input_ids.device
    n_dec = batch.dec_rows.shape[0]
    counts = [n for n in batch.dec_count if n]
    q_idx = torch.cat([batch.dec_rows[:n] * kmax + p for p, n in enumerate(counts)])  # pool-major
    idx = torch.cat([batch.dec_tables[p][:n] + cache.offsets[p] for p, n in enumerate(counts)])
    seq = torch.cat([torch.arange(n, device=dev) for n in counts]) if n_dec > 1 else None
    if len(counts) > 1 and n_dec > 1:  # to row-major, the queries' order (one sort per step)
        q_idx, perm = q_idx.sort()
        idx, seq = idx.index_select(0, perm), seq.index_select(0, perm)
    mask = None if seq is None else batch.dec_mask.index_select(0, seq)
    lens = batch.dec_lens.expand(idx.shape[0]) if seq is None else batch.dec_lens.index_select(0, seq)
    every_row = n_dec == batch.num_tokens and batch.dec_count[-1] == n_dec
    return DecodePairs(None if every_row else q_idx, idx, batch.dec_len, mask, lens)


def _decode_runs(cfg: ModelConfig, batch: ForwardBatch, cache: ChainKVCache) -> list[AttnGroup]:
    """CoLM-Air: decode sequences grouped by chain count (every chain of a group reads the one pool)."""
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
    return groups


def _dec_chains(batch: ForwardBatch, i: int) -> int:
    """Chain count of the i-th decode sequence (dec_count[j] counts those using chain j)."""
    return sum(1 for n in batch.dec_count if n > i)
