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
    chains: int  # max chain count in the batch
    rows: tuple[int, ...]  # rows[j]: leading rows that use chain j
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
    prefills: tuple[PrefillGroup, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def logit_rows(self) -> tuple[int, ...]:
        """Prefix counts per chain over last_rows (num_logits rows per sorted sequence)."""
        return tuple(sum(n for c, n in zip(self.seq_chains, self.num_logits) if c > j) for j in range(self.chains))

    def logit_offsets(self) -> list[int]:
        """Per sorted sequence, the index of its first row in last_rows (and in forward_step's logits)."""
        out, acc = [], 0
        for n in self.num_logits:
            out.append(acc)
            acc += n
        return out

    @staticmethod
    def build(cfg: ModelConfig, seqs: Sequence[SeqSpec], block_size: int,
              device: torch.device | str = "cpu") -> ForwardBatch:
        assert seqs, "empty batch"
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].chains)  # stable: ties keep arrival order
        ss = [seqs[i] for i in order]
        for s in ss:
            cfg.check_chains(s.chains)
            assert len(s.block_tables) >= cfg.pools_for(s.chains), "a block table per used pool"
            assert 1 <= s.num_logits <= len(s.token_ids)
        kmax = ss[0].chains
        pack = _Packer()  # every integer array of the step becomes ONE tensor: one copy to the device
        ids, pos, starts = [], [], []
        for s in ss:
            starts.append(len(ids))
            ids.extend(int(t) for t in s.token_ids)
            pos.extend(range(s.ctx_len, s.ctx_len + len(s.token_ids)))
        n_tok = [len(s.token_ids) for s in ss]
        rows = tuple(sum(n for n, s in zip(n_tok, ss) if s.chains > j) for j in range(kmax))
        last_rows = [st + n - 1 for st, n in zip(starts, n_tok)]
        logit_rows = [r for s, last in zip(ss, last_rows) for r in range(last - s.num_logits + 1, last + 1)]
        p_ids, p_pos, p_last = pack.add(ids), pack.add(pos), pack.add(logit_rows)

        def slots_for(p: int) -> list[int]:
            out = []
            for s in ss:
                if cfg.pools_for(s.chains) <= p:
                    break  # sorted descending: later sequences use fewer pools too
                table = s.block_tables[p]
                out.extend(table[q // block_size] * block_size + q % block_size
                           for q in range(s.ctx_len, s.ctx_len + len(s.token_ids)))
            return out

        n_pools = cfg.pools_for(kmax)
        p_slots = [pack.add(slots_for(p)) for p in range(n_pools)]
        dec = [i for i, s in enumerate(ss) if len(s.token_ids) == 1]
        dec_len = max((ss[i].ctx_len + 1 for i in dec), default=0)
        nb_max = -(-dec_len // block_size)

        def table(s: SeqSpec, p: int, nb: int) -> list[int]:
            t = list(s.block_tables[p][:nb])
            return t + [t[0]] * (nb - len(t))  # pad with a real block; masked out below

        p_tables = []
        for p in range(n_pools):
            users = [i for i in dec if cfg.pools_for(ss[i].chains) > p]
            p_tables.append(pack.add([b for i in users for b in table(ss[i], p, nb_max)], (len(users), max(nb_max, 1))))
        drows = [last_rows[i] for i in dec]
        p_drows, p_lens = pack.add(drows), pack.add([ss[i].ctx_len + 1 for i in dec])
        pre = [(i, s) for i, s in enumerate(ss) if len(s.token_ids) > 1]
        p_pre = [[pack.add(table(s, p, -(-(s.ctx_len + len(s.token_ids)) // block_size)), (1, -1))
                  for p in range(cfg.pools_for(s.chains))] for _, s in pre]
        t = pack.tensors(device)
        dec_mask = None
        if dec:
            dec_mask = (torch.arange(dec_len, device=device)[None, :] < t[p_lens][:, None])[:, None, None, :]
        prefills = []
        for (i, s), tables in zip(pre, p_pre):
            q_len = len(s.token_ids)
            total = s.ctx_len + q_len
            mask = None
            if s.ctx_len:
                qpos = torch.arange(s.ctx_len, total, device=device)[:, None]
                mask = (torch.arange(total, device=device)[None, :] <= qpos)[None, None]
            prefills.append(PrefillGroup(starts[i], q_len, total, s.chains, [t[j] for j in tables], mask))
        return ForwardBatch(
            input_ids=t[p_ids], positions=t[p_pos],
            chains=kmax, rows=rows, order=tuple(order), seq_chains=tuple(s.chains for s in ss),
            last_rows=t[p_last], num_logits=tuple(s.num_logits for s in ss), slots=[t[j] for j in p_slots],
            dec_rows=t[p_drows],
            dec_start=drows[0] if drows and drows == list(range(drows[0], drows[0] + len(drows))) else None,
            dec_count=tuple(sum(1 for i in dec if ss[i].chains > j) for j in range(kmax)),
            dec_tables=[t[j] for j in p_tables], dec_len=dec_len, dec_mask=dec_mask, prefills=tuple(prefills),
        )


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
