"""The CoLM Transformer: Llama-style pre-norm blocks built from chain layers.

Any chain count k in 1..n runs from the same weights and computes only chains <= k. Two forwards:
`forward` (a full causal pass over [B, S] tokens at one chain count: training and reference) and
`forward_step` (one engine step over a paged KV cache, mixed chain counts per sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colm_runtime.config import ModelConfig
from colm_runtime.model import cpu_kernels
from colm_runtime.model.attention import ChainAttention, kernel_takes, plan_step
from colm_runtime.model.batch import ForwardBatch
from colm_runtime.model.kv_cache import ChainKVCache
from colm_runtime.model.layers import (
    ChainLinear,
    ChainRMSNorm,
    Rows,
    bucket_rows,
    linear_rows,
    rope_cache,
    scatter_chain_outputs,
)


class ChainFFN(nn.Module):
    """SwiGLU with chain-split gate, up and down; gate and up share one Chain-of-Linear block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_widths = cfg.ffn_widths
        self.gate_up = ChainLinear(cfg.chain_widths, [2 * w for w in cfg.ffn_widths])
        self.down = ChainLinear(cfg.ffn_widths, cfg.chain_widths)
        self._equal = len(set(cfg.ffn_widths)) == 1

    def forward(self, x: torch.Tensor, chains: int, rows: Rows = None) -> torch.Tensor:
        gu = self.gate_up(x, chains, rows)
        if self._equal and not torch.is_grad_enabled() and cpu_kernels.swiglu_ok(gu):  # one C pass
            return self.down(cpu_kernels.swiglu_rows(gu, chains), chains, rows)
        if self._equal:  # one silu and one product for all rows and chains (unused ones are zero)
            g, u = gu.unflatten(-1, (chains, 2, self.ffn_widths[0])).unbind(-2)
            return self.down((F.silu(g) * u).flatten(-2), chains, rows)
        outs, col = [], 0
        for j in range(chains):
            w = self.ffn_widths[j]
            g = gu[..., col : col + w] if rows is None else gu[: rows[j], col : col + w]
            u = gu[..., col + w : col + 2 * w] if rows is None else gu[: rows[j], col + w : col + 2 * w]
            outs.append(F.silu(g) * u)
            col += 2 * w
        h = scatter_chain_outputs(outs, rows, x) if rows is not None else torch.cat(outs, dim=-1)
        return self.down(h, chains, rows)


class ChainBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = ChainRMSNorm(cfg.chain_widths, cfg.norm_eps)
        self.attn = ChainAttention(cfg, layer)
        self.ffn_norm = ChainRMSNorm(cfg.chain_widths, cfg.norm_eps)
        self.ffn = ChainFFN(cfg)

    def forward(self, h: torch.Tensor, chains: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The full-sequence block (training, evaluation): [B, S, >= width(chains)] -> same shape. A module
        call (not two method calls from the model) so that FSDP's per-block hooks gather its weights."""
        h = h + self.attn.forward_full(self.attn_norm(h, chains), chains, cos, sin)
        return h + self.ffn(self.ffn_norm(h, chains), chains)


class CoLMModel(nn.Module):
    """A Chain-of-Model language model. Parameter names are the checkpoint's tensor names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._head0: tuple | None = None  # _head_chain0's copy, with the head's (address, version) it was made from
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(ChainBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = ChainRMSNorm(cfg.chain_widths, cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.column_major_head()
        self.reset_rope()

    def reset_rope(self) -> None:
        """Drop the rotary tables; they are rebuilt in fp32 on first use on each device. They are not
        buffers on purpose: model.to(bfloat16) must not round them."""
        self._rope: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [max_position_embeddings, head_dim] on `device`, computed in fp32 and stored in
        `dtype` (forward_step's rope runs in the model's dtype, as transformers' does)."""
        if (device, dtype) not in self._rope:
            if (device, torch.float32) not in self._rope:
                scaling = dict(self.cfg.rope_scaling) if self.cfg.rope_scaling is not None else None
                self._rope[device, torch.float32] = rope_cache(
                    self.cfg.head_dim, self.cfg.max_position_embeddings, self.cfg.rope_theta, device=device,
                    scaling=scaling)
            self._rope[device, dtype] = tuple(t.to(dtype) for t in self._rope[device, torch.float32])
        return self._rope[device, dtype]

    def column_major_head(self) -> CoLMModel:
        """Store the [vocab, dim] head (and tied embedding) column-major, so that scale k's columns
        0..width(k) are one contiguous block: a strided read of them costs ~50% more at batch 1.
        Shapes, names and values are unchanged (checkpoints are written contiguous row-major).
        Exceptions, kept row-major on the CPU: a one-chain model in reduced precision (no column prefix
        to read; ATen's bf16 matrix-vector product reads a row-major head 2x faster, and the whole bf16
        step ran 1.05-1.08x faster), and a head that our row kernels read (gemm_f32 in fp32, gemm_bf16w in
        bf16: both read W's rows where they lie; _head_chain0 keeps one chain's prefix contiguous).
        Call it after any dtype or device move."""
        w = self.head_weight
        cpu = w.device.type == "cpu"
        row_major = cpu and ((self.cfg.n_chains == 1 and w.dtype != torch.float32)
                             or (w.dtype == torch.float32 and cpu_kernels.has_f32_rows())
                             or (w.dtype == torch.bfloat16 and cpu_kernels.has_bf16_widen()))
        for mod in (self.embed, self.lm_head):
            if mod is None or (mod.weight.stride(0) == 1) != row_major:
                continue  # already in the wanted layout
            t = mod.weight.detach()
            mod.weight = nn.Parameter(t.contiguous() if row_major else t.t().contiguous().t(),
                                      requires_grad=mod.weight.requires_grad)
        return self

    @property
    def head_weight(self) -> torch.Tensor:
        """[vocab, dim]; scale k reads its first width(k) columns."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> CoLMModel:
        """Llama-style init: N(0, std); output projections scaled down by depth; norms at one."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            scale = std / (2 * self.cfg.n_layers) ** 0.5 if (".o." in name or ".down." in name) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return self

    def _embed(self, ids: torch.Tensor, chains: int) -> torch.Tensor:
        # Only the first width(chains) columns are read: a gather of a column slice.
        return F.embedding(ids, self.embed.weight[:, : self.cfg.width(chains)])

    def forward(self, input_ids: torch.Tensor, chains: int | None = None) -> torch.Tensor:
        """Hidden states after the final norm: [B, S] -> [B, S, width(chains)]."""
        k = self.cfg.n_chains if chains is None else self.cfg.check_chains(chains)
        S = input_ids.shape[1]
        assert S <= self.cfg.max_position_embeddings, "sequence longer than max_position_embeddings"
        cos, sin = (t[:S] for t in self.rope(input_ids.device))
        h = self._embed(input_ids, k)
        for blk in self.layers:
            h = blk(h, k, cos, sin)
        return self.norm(h, k)

    def logits(self, hidden: torch.Tensor, chains: int, rows: Rows = None) -> torch.Tensor:
        """LM head on normed hidden states: logits_k = sum_{j<k} W_head[:, chain j] h_j, in fp32.

        rows (for rows sorted by chain count): rows[j] leading rows use chain j. In fp32 on ATen (MKL)
        each chain's share is accumulated in place on its rows only. (One product per chain count over its whole width costs
        the same FLOPs but reads the head's leading columns once per chain count: ~40% slower at
        batch 32, where the head read dominates.)
        """
        W = self.head_weight
        off = self.norm.offsets
        if rows is None or all(r == hidden.shape[0] for r in rows):
            if hidden.dim() == 2:
                if chains == 1 and (W1 := self._head_chain0()) is not None:
                    return linear_rows(hidden[:, : off[1]], W1).float()
                return linear_rows(hidden[:, : off[chains]], W[:, : off[chains]]).float()
            return F.linear(hidden[..., : off[chains]], W[:, : off[chains]]).float()
        if hidden.dtype == torch.float32 and not cpu_kernels.f32_rows_ok(hidden, W):
            out = torch.mm(hidden[:, : off[1]], W[:, : off[1]].t())
            for j in range(1, chains):
                out[: rows[j]].addmm_(hidden[: rows[j], off[j] : off[j + 1]], W[:, off[j] : off[j + 1]].t())
            return out
        # Reduced precision, or fp32 on our kernel (gemm_f32): a product of a few dozen rows is bound by
        # reading the head, so ONE product over every chain's columns, with the columns a row does not use
        # zeroed, reads the head once (three passes over its chain slices, each strided and bound by its
        # read, cost 31.5 ms against 22 ms at the equal mix of batch 32 in fp32 on an AVX2 machine). In
        # fp32 our kernel also stops each group of rows at its first row's width (row_k), so the FLOPs
        # follow the chains the rows use.
        h = hidden[:, : off[chains]].clone()  # [N, width(chains)]
        for j in range(1, chains):
            h[rows[j] :, off[j] : off[j + 1]] = 0
        at = [*rows, 0]  # rows using exactly c chains: at[c - 1] - at[c], widest first
        row_k = [off[c] for c in range(chains, 0, -1) for _ in range(at[c - 1] - at[c])]
        if h.dtype == torch.float32:
            return cpu_kernels.gemm_f32(h, W[:, : off[chains]], row_k=row_k)
        if cpu_kernels.rows_kernel(h, W[:, : off[chains]]) == "widen":  # rounded to bf16 as linear_rows rounds
            return cpu_kernels.gemm_bf16w(h, W[:, : off[chains]], row_k=row_k).float()
        return linear_rows(h, W[:, : off[chains]]).float()

    def _head_chain0(self) -> torch.Tensor | None:
        """The head's first chain's columns as a contiguous copy, for the one-chain logits of a model of
        several chains on our row kernels (gemm_f32 in fp32, gemm_bf16w in bf16); None elsewhere. The
        row-major head those kernels read holds chain 0's columns as a strided prefix of every row, and
        reading that costs 1.24-1.71x reading the same values contiguously at 1-4 rows (SmolLM2's head in
        a three-chain model; the default model's): one-chain fp32 decode steps 1.04-1.08x at batch 1-32
        on the former, 1.12x at batch 1 on the latter, for 1/n_chains of the head's memory
        (docs/performance.md, round 8). Same kernel, same sums: the same bits. Made on first use (a
        training model never pays for it) or by warm_kernels, and made again whenever the head moved or
        changed in place (its address or its version counter)."""
        W = self.head_weight
        if self.cfg.n_chains == 1 or not W.is_cpu or W.stride(1) != 1 or not (
                (W.dtype == torch.float32 and cpu_kernels.has_f32_rows())
                or (W.dtype == torch.bfloat16 and cpu_kernels.has_bf16_widen())):
            return None
        key = (W.data_ptr(), W._version)
        if self._head0 is None or self._head0[0] != key:
            self._head0 = None  # free the stale copy before making the new one
            self._head0 = (key, W.detach()[:, : self.norm.offsets[1]].contiguous())
        return self._head0[1]

    @torch.inference_mode()
    def warm_kernels(self, max_rows: int, max_logit_rows: int) -> int:
        """Build every matmul kernel that steps of up to max_rows rows (and logits of up to max_logit_rows
        rows) can ask oneDNN for, on a reduced-precision CPU model (else nothing to do): linear_rows keys
        them by (row bucket, weight shape), so their memory is bounded and reached here, at start-up,
        rather than over hours of traffic. Layer 0 stands for every layer (same shapes; oneDNN keys a
        kernel by shapes, not by the weight's address). Returns the number of products run. First it
        makes the one-chain head's copy where one applies (_head_chain0), so that the first one-chain
        request does not pay for it."""
        self._head_chain0()
        W = self.head_weight
        if W.dtype == torch.float32 or W.device.type != "cpu":
            return 0
        blk, off = self.layers[0], self.norm.offsets
        weights = [lin.weight for cl in (blk.attn.qkv, blk.attn.o, blk.ffn.gate_up, blk.ffn.down) for lin in cl.chains]
        head = [W[:, : off[k]] for k in range(1, len(off))] + [W[:, off[j] : off[j + 1]] for j in range(1, len(off) - 1)]
        n = 0
        for b in sorted({bucket_rows(r) for r in range(1, max_rows + 1)}):
            for w in weights + (head if b <= bucket_rows(max_logit_rows) else []):
                linear_rows(W.new_zeros(b, w.shape[1]), w)
                n += 1
        return n

    def scale_logits(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every scale 1..k from one full forward's hidden states (chain rule: the first k
        chains of the full model's hidden states are the k-chain model's). Used by the multi-chain loss."""
        W, off = self.head_weight, self.norm.offsets
        k = next(j for j in range(len(off)) if off[j] == hidden.shape[-1])
        out, acc = [], None
        for j in range(k):
            part = F.linear(hidden[..., off[j] : off[j + 1]], W[:, off[j] : off[j + 1]])
            acc = part if acc is None else acc + part
            out.append(acc)
        return out

    def _layer_table(self, dtype: torch.dtype) -> torch.Tensor | None:
        """cpu_kernels.layers_step's weight table: per layer the two norm weights' addresses, then per
        product (qkv, o, gate_up, down) and chain its weight's address, its bias's (0: none), rows, columns
        and row stride; None unless every weight is a CPU tensor of `dtype` with unit inner stride. Built once
        and kept while every weight's address is unchanged (checked per step: ~40 us; walking the modules
        took ~4 ms). load_state_dict and moves drop it (they may replace the Parameter objects)."""
        if getattr(self, "_table", None) is None:
            params: list[torch.Tensor | None] = []  # in table order; a bias (or None) follows its weight
            for blk in self.layers:
                params += (blk.attn_norm.weight, blk.ffn_norm.weight)
                for cl in (blk.attn.qkv, blk.attn.o, blk.ffn.gate_up, blk.ffn.down):
                    for lin in cl._lins:
                        params += (lin.weight, lin.bias)
            self._table = (params, None, None)
        per_layer = 2 + 2 * 4 * self.cfg.n_chains  # the norms, then (weight, bias) per product and chain
        params, ptrs, table = self._table
        now = [0 if t is None else t.data_ptr() for t in params]
        if now != ptrs:
            table = None
            if all(t is None or (t.dtype == params[0].dtype and t.is_cpu and t.stride(-1) == 1
                                 and (t.dim() == 2 or t.is_contiguous())) for t in params):
                flat = []
                for i, p in enumerate(now):
                    flat.append(p)
                    if i % per_layer >= 2 and i % 2 == 1:  # a bias slot: then its weight's shape and row stride
                        w = params[i - 1]
                        flat += (w.shape[0], w.shape[1], w.stride(0))
                table = torch.tensor(flat, dtype=torch.int64)
            self._table = (params, now, table)
        return table if params[0].dtype == dtype else None

    def load_state_dict(self, *args, **kwargs):
        self._table = self._head0 = None  # with assign=True it replaces the Parameter objects the table holds
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._table = self._head0 = None
        return super()._apply(fn, *args, **kwargs)

    def _layers_in_c(self, h: torch.Tensor, batch: ForwardBatch, cache: ChainKVCache, plan, cos: torch.Tensor,
                     sin: torch.Tensor) -> bool:
        """Run every layer of the step in one C call (cpu_kernels.layers_step) where it applies: fp32 on a
        CPU where gemm_f32 runs, or bf16 where gemm_bf16w does; equal chains and FFN widths, and every
        query row of the step attending through paged_decode as pairs. Same kernels, same order,
        bit-identical to the loop in forward_step; False (nothing done) elsewhere."""
        cfg = self.cfg
        if (plan is None or plan.decode is None or plan.groups or plan.kv_slots is None
                or len(set(cfg.ffn_widths)) != 1 or not cpu_kernels.layers_ok(h, cache.k_all)
                or not kernel_takes(cfg, cache)):
            return False
        wtab = self._layer_table(h.dtype)
        if wtab is None:
            return False
        d = plan.decode
        dims = dict(T=h.shape[0], kmax=batch.max_chains, NC=cfg.n_chains, cw=cfg.chain_widths[0], C=cfg.chains[0],
                    H=cfg.chain_kv_heads[0], hd=cfg.head_dim, F=cfg.ffn_widths[0], NP=d.block_idx.shape[0],
                    NB=d.block_idx.shape[1], BS=cache.block_size, max_len=d.kv_len, R=plan.kv_slots.shape[0],
                    layers=cfg.n_layers, kv_stride=cache.k_all.stride(0))
        cpu_kernels.layers_step(h, dims, wtab, batch.chain_rows, cos, sin, plan.kv_slots, plan.kv_rows, d.q_idx,
                                d.block_idx, d.lens, cache.k_all, cache.v_all, cfg.norm_eps, cfg.head_dim ** -0.5)
        return True

    @torch.inference_mode()
    def forward_step(self, batch: ForwardBatch, cache: ChainKVCache) -> torch.Tensor:
        """One engine step. Returns fp32 logits [sum(num_logits), vocab]: each sorted sequence's last
        num_logits rows (one per sequence unless it verifies speculative drafts)."""
        k, rows = batch.max_chains, batch.chain_rows
        # Columns of chains a row does not use hold embedding values that no chain layer reads.
        h = self._embed(batch.input_ids, k)  # [T, width(k)], a fresh tensor: the residual adds go in place
        cos, sin = (t.index_select(0, batch.positions) for t in self.rope(h.device, h.dtype))
        plan = plan_step(self.cfg, batch, cache)
        if not self._layers_in_c(h, batch, cache, plan, cos, sin):
            for blk in self.layers:
                h += blk.attn.forward_step(blk.attn_norm(h, k, rows), batch, cache, cos, sin, plan)
                h += blk.ffn(blk.ffn_norm(h, k, rows), k, rows)
        last = h if batch.num_tokens == batch.last_rows.shape[0] else h.index_select(0, batch.last_rows)
        lrows = batch.logit_rows()
        return self.logits(self.norm(last, k, lrows), k, lrows)
