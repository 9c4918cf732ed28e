"""ForwardBatch: what one model step computes, flattened vLLM-style over a paged KV cache.

Sequences are ordered by chain count, descending, so that the rows (tokens) using chain j are a
prefix of the batch; every chain layer then works on a prefix of the rows. `order` maps the sorted
position back to the caller's sequence index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from colm_runtime.config import ModelConfig


@dataclass(frozen=True)
class SeqSpec:
    """One sequence's share of a step.

    token_ids: the tokens this step computes (a prefill chunk, or one decode token, or more for
      speculative verification); ctx_len: tokens already in the KV cache before them (their positions
      start there); chains: the chain count this step runs at; block_tables[p]: the physical blocks of
      pool p covering positions 0..ctx_len+len(token_ids)-1 (one table per pool the chains use).
    """

    token_ids: Sequence[int]
    ctx_len: int
    chains: int
    block_tables: Sequence[Sequence[int]]
    # Trailing tokens whose logits the step returns: 1 normally; speculative verification needs the
    # target's logits at every drafted position (gamma + 1 rows).
    num_logits: int = 1
    # Per pool, the first position whose K/V this step writes (None: ctx_len in every pool). Positions
    # below it already hold the pool's K/V (a cached prefix): their rows are computed for the higher
    # pools only and their writes go to the cache's sink (ChainKVCache.sink_slots).
    kv_from: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PrefillGroup:
    """A sequence computing more than one token: attended on its own with a causal mask."""

    row_start: int
    q_len: int
    total_len: int  # ctx_len + q_len
    chains: int
    block_tables: list[torch.Tensor]  # per pool: [1, nb]
    mask: torch.Tensor | None  # [1, 1, q_len, total_len] bool, None when there is no past (plain causal)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    max_chains: int  # the largest chain count in the batch
    chain_rows: tuple[int, ...]  # chain_rows[j]: how many leading rows use chain j (a count, not indices)
    order: tuple[int, ...]  # sorted sequence -> caller's index
    seq_chains: tuple[int, ...]  # per sorted sequence
    last_rows: torch.Tensor  # [N] logit rows: each sorted sequence's last num_logits rows (N = B normally)
    num_logits: tuple[int, ...]  # per sorted sequence
    slots: list[torch.Tensor]  # per pool: [rows using the pool] flat cache slots of new tokens
    dec_rows: torch.Tensor  # [Bd] rows of single-token sequences (sorted by chains, descending)
    dec_start: int | None  # first decode row when dec_rows is a contiguous run (a slice beats indexing)
    dec_count: tuple[int, ...]  # dec_count[j]: leading decode sequences that use chain j
    dec_tables: list[torch.Tensor]  # per pool: [Bd_p, nb_max] block tables of decode sequences
    dec_len: int  # longest decode context, in tokens
    dec_mask: torch.Tensor | None  # [Bd, 1, 1, dec_len] bool
    dec_lens: torch.Tensor | None  # [Bd] context length of each decode sequence, its new token included
    prefills: tuple[PrefillGroup, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def logit_rows(self) -> tuple[int, ...]:
        """Prefix counts per chain over last_rows (num_logits rows per sorted sequence)."""
        return tuple(sum(n for c, n in zip(self.seq_chains, self.num_logits) if c > j) for j in range(self.max_chains))

    def logit_offsets(self) -> list[int]:
        """Per sorted sequence, the index of its first row in last_rows (and in forward_step's logits)."""
        out, acc = [], 0
        for n in self.num_logits:
            out.append(acc)
            acc += n
        return out

    @staticmethod
    def build(cfg: ModelConfig, seqs: Sequence[SeqSpec], block_size: int,
              device: torch.device | str = "cpu", sink_slots: Sequence[int] | None = None) -> ForwardBatch:
        """sink_slots: the cache's, needed when a SeqSpec sets kv_from."""
        assert seqs, "empty batch"
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].chains)  # stable: ties keep arrival order
        ss = [seqs[i] for i in order]
        for s in ss:
            cfg.check_chains(s.chains)
            assert len(s.block_tables) >= cfg.pools_for(s.chains), "a block table per used pool"
            assert 1 <= s.num_logits <= len(s.token_ids)
        kmax = ss[0].chains
        n_pools = cfg.pools_for(kmax)
        bs = block_size
        dec_len = max((s.ctx_len + 1 for s in ss if len(s.token_ids) == 1), default=0)
        nb_max = -(-dec_len // bs)
        # One pass over the sequences fills every per-row and per-pool list.
        ids, pos, starts, logit_rows, drows, lens = [], [], [], [], [], []
        slots: list[list[int]] = [[] for _ in range(n_pools)]
        tables: list[list[int]] = [[] for _ in range(n_pools)]  # decode block tables, flat, nb_max per row
        users = [0] * n_pools  # decode sequences per pool
        rows, dec_count = [0] * kmax, [0] * kmax  # rows / decode sequences that use chain j
        pre = []  # (sorted index, its per-pool tables) of multi-token sequences
        for i, s in enumerate(ss):
            n, c, P = len(s.token_ids), s.ctx_len, cfg.pools_for(s.chains)
            for j in range(s.chains):
                rows[j] += n
                dec_count[j] += n == 1
            starts.append(len(ids))
            if n == 1:  # a decode row (most rows of most steps): no per-token loops
                ids.append(int(s.token_ids[0]))
                pos.append(c)
                drows.append(len(ids) - 1)
                logit_rows.append(len(ids) - 1)
                lens.append(c + 1)
                for p in range(P):
                    bt = s.block_tables[p]
                    held = s.kv_from is not None and s.kv_from[p] > c  # a one-token chunk of a recompute
                    slots[p].append(sink_slots[p] if held else bt[c // bs] * bs + c % bs)
                    tables[p].extend(_padded(bt, nb_max))
                    users[p] += 1
                continue
            ids.extend(int(t) for t in s.token_ids)
            pos.extend(range(c, c + n))
            last = len(ids) - 1
            logit_rows.extend(range(last - s.num_logits + 1, last + 1))
            for p in range(P):
                bt, lo = s.block_tables[p], c if s.kv_from is None else min(max(c, s.kv_from[p]), c + n)
                if lo > c:  # positions the pool holds already: not rewritten
                    slots[p].extend([sink_slots[p]] * (lo - c))
                slots[p].extend(bt[q // bs] * bs + q % bs for q in range(lo, c + n))
            nb = -(-(c + n) // bs)
            pre.append((i, [_padded(s.block_tables[p], nb) for p in range(P)]))
        pack = _Packer()  # every integer array of the step becomes ONE tensor: one copy to the device
        p_ids, p_pos, p_last = pack.add(ids), pack.add(pos), pack.add(logit_rows)
        p_slots = [pack.add(x) for x in slots]
        p_tables = [pack.add(x, (u, max(nb_max, 1))) for x, u in zip(tables, users)]
        p_drows, p_lens = pack.add(drows), pack.add(lens)
        p_pre = [[pack.add(x, (1, -1)) for x in tabs] for _, tabs in pre]
        t = pack.tensors(device)
        dec_mask = None
        if lens:
            dec_mask = (torch.arange(dec_len, device=device)[None, :] < t[p_lens][:, None])[:, None, None, :]
        prefills = []
        for (i, _), tabs in zip(pre, p_pre):
            s = ss[i]
            q_len = len(s.token_ids)
            total = s.ctx_len + q_len
            mask = None
            if s.ctx_len:
                qpos = torch.arange(s.ctx_len, total, device=device)[:, None]
                mask = (torch.arange(total, device=device)[None, :] <= qpos)[None, None]
            prefills.append(PrefillGroup(starts[i], q_len, total, s.chains, [t[j] for j in tabs], mask))
        return ForwardBatch(
            input_ids=t[p_ids], positions=t[p_pos],
            max_chains=kmax, chain_rows=tuple(rows), order=tuple(order), seq_chains=tuple(s.chains for s in ss),
            last_rows=t[p_last], num_logits=tuple(s.num_logits for s in ss), slots=[t[j] for j in p_slots],
            dec_rows=t[p_drows],
            dec_start=drows[0] if drows and drows == list(range(drows[0], drows[0] + len(drows))) else None,
            dec_count=tuple(dec_count),
            dec_tables=[t[j] for j in p_tables], dec_len=dec_len, dec_mask=dec_mask,
            dec_lens=t[p_lens] if lens else None, prefills=tuple(prefills),
        )


def _padded(table: Sequence[int], nb: int) -> list[int]:
    """The first nb block ids of a table, padded with a real block (its padding is masked out)."""
    t = list(table[:nb])
    return t + [t[0]] * (nb - len(t))


class _Packer:
    """Collects a step's integer arrays and makes them one int64 tensor on the device, handing out views
    (one allocation and one host-to-device copy per step instead of one per array)."""

    def __init__(self) -> None:
        self.data: list[int] = []
        self.parts: list[tuple[int, int, tuple[int, ...] | None]] = []

    def add(self, values, shape: tuple[int, ...] | None = None) -> int:
        start = len(self.data)
        self.data.extend(values)
        self.parts.append((start, len(self.data), shape))
        return len(self.parts) - 1

    def tensors(self, device: torch.device | str) -> list[torch.Tensor]:
        flat = torch.tensor(self.data, dtype=torch.long, device=device)
        return [flat[a:b] if shape is None else flat[a:b].view(shape) for a, b, shape in self.parts]
