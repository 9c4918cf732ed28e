"""Chain layers: Chain-of-Linear, per-chain RMSNorm and rotary embeddings.

Every layer takes `chains` (how many leading chains to compute) and optionally `rows`: for a mixed
batch whose rows are ordered by chain count (descending), rows[j] is how many leading rows use chain
j. Chain j's matmuls then run on those rows only, so no row pays for chains it does not use. Columns
of chains a row does not use are never read by a later chain layer: the matmul layers leave them at
zero, and with equal chains the elementwise layers (norms, the SwiGLU product) run over every row and
chain of the step in one pass rather than a loop of small per-chain ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from colm_runtime.model import cpu_kernels

Rows = Sequence[int] | None


def _offsets(widths: Sequence[int]) -> list[int]:
    return [0, *accumulate(widths)]


def uniform(rows: Rows, n_rows: int) -> bool:
    return rows is None or all(r == n_rows for r in rows)


def scatter_chain_outputs(outs: list[torch.Tensor], rows: Rows, like: torch.Tensor) -> torch.Tensor:
    """Concatenate per-chain outputs along the last dim; rows a chain skipped stay zero."""
    if uniform(rows, like.shape[0]):
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    width = sum(o.shape[-1] for o in outs)
    y = like.new_zeros(like.shape[0], width)
    col = 0
    for out in outs:
        y[: out.shape[0], col : col + out.shape[-1]] = out
        col += out.shape[-1]
    return y


def bucket_rows(n: int) -> int:
    """The row count a reduced-precision CPU matmul of n rows runs at: the next power of two up to 64,
    then the next multiple of 64. oneDNN builds and keeps a kernel and its buffers (~0.8 MiB) for every
    new row count in bf16, and a server sees hundreds of row counts: its memory grew by hundreds of MiB
    (docs/performance.md, "Real scale"). Buckets bound that to 14 row counts up to 512 per weight shape.
    Padding costs little: up to 64 rows a bf16 product is bound by reading the weight, not by rows."""
    return 1 << max(0, n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


def linear_rows(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for x: [r, d], w: [o, d], into out ([r, o], may be a strided column block) when
    given. A bf16 product of a decode batch's rows (1-64) runs on our kernels where the CPU has them
    (cpu_kernels.rows_kernel: gemv_bf16 on AVX-512 BF16 for a few rows, gemm_amx_bf16 on AMX tiles
    above): such a product is bound by reading W, which they stream once. Any other
    reduced-precision product on the CPU runs on a contiguous copy of x padded with zero rows to
    bucket_rows(r), into a fresh output: oneDNN's kernels are then keyed by (bucket, weight) only, not by
    the strides of whichever slice a step multiplies, and CoLMModel.warm_kernels can build them all."""
    if x.dtype == torch.float32 or x.device.type != "cpu":
        if cpu_kernels.f32_rows_ok(x, w) and (out is None or out.stride(1) == 1):  # AVX2 without AVX-512: MKL packs W on every call
            return cpu_kernels.gemm_f32(x, w, out, bias)
        if out is None:
            return F.linear(x, w, bias)
        return torch.mm(x, w.t(), out=out) if bias is None else torch.addmm(bias, x, w.t(), out=out)
    r = x.shape[0]
    if kernel := cpu_kernels.rows_kernel(x, w):  # ours stream W once, prefetched
        if kernel == "widen" and bias is None and (out is None or out.stride(1) == 1):
            return cpu_kernels.gemm_bf16w(x, w, out)  # straight into out's column block
        y = cpu_kernels.bf16_rows(x, w, kernel)
        if bias is not None:
            y += bias
        return y if out is None else out.copy_(y)
    if r == 1:  # no kernel of ours: ATen's matrix-vector product, ~1.5x oneDNN's one-row GEMM, keeps no state
        y = torch.mv(w, x[0]).unsqueeze(0) if bias is None else torch.addmv(bias, w, x[0]).unsqueeze(0)
        return y if out is None else out.copy_(y)
    if bucket_rows(r) != r or not x.is_contiguous():
        xp = x.new_zeros(bucket_rows(r), x.shape[1])
        xp[:r] = x
        x = xp
    y = F.linear(x, w, bias)[:r]
    return y if out is None else out.copy_(y)


class ChainLinear(nn.Module):
    """Block lower-triangular linear map, storing and computing only the non-zero blocks.

    Chain i's weight W_i has shape [out_widths[i], in_widths[0] + ... + in_widths[i]]: output chain i
    reads input chains 0..i only. y = concat_i(x[:, :in_1+..+in_i] @ W_i^T).
    """

    def __init__(self, in_widths: Sequence[int], out_widths: Sequence[int], bias: bool = False):
        super().__init__()
        assert len(in_widths) == len(out_widths)
        self.in_widths, self.out_widths = tuple(in_widths), tuple(out_widths)
        self.in_offsets, self.out_offsets = _offsets(in_widths), _offsets(out_widths)
        self.chains = nn.ModuleList(
            nn.Linear(self.in_offsets[i + 1], out, bias=bias) for i, out in enumerate(out_widths)
        )
        # The same Linear objects as a plain tuple: ModuleList indexing costs time per chain per call
        # (measured: docs/engine.md, "Small choices behind the code").
        self._lins = tuple(self.chains)

    def forward(self, x: torch.Tensor, chains: int, rows: Rows = None) -> torch.Tensor:
        # x: [..., >= in_offsets[chains]] -> [..., out_offsets[chains]]
        if x.dim() == 2 and not torch.is_grad_enabled():
            return self._forward_into(x, chains, rows)
        outs = []
        for j, lin in enumerate(self._lins[:chains]):
            xin = x[..., : self.in_offsets[j + 1]] if rows is None else x[: rows[j], : self.in_offsets[j + 1]]
            outs.append(F.linear(xin, lin.weight, lin.bias))  # not lin(xin): module-call overhead per chain
        return scatter_chain_outputs(outs, rows, x)

    def _forward_into(self, x: torch.Tensor, chains: int, rows: Rows) -> torch.Tensor:
        """Inference on [T, D] rows: each chain's product is written straight into its column block of
        one output (BLAS takes the row stride), so neither a cat nor a zero-fill-and-copy per chain is
        needed. Rows a chain skips stay zero."""
        T = x.shape[0]
        if chains == 1 and uniform(rows, T):  # one product is the whole output: no buffer to copy it into
            lin = self._lins[0]
            return linear_rows(x[:, : self.in_offsets[1]], lin.weight, None, lin.bias)
        y = x.new_empty(T, self.out_offsets[chains]) if uniform(rows, T) else x.new_zeros(T, self.out_offsets[chains])
        for j, lin in enumerate(self._lins[:chains]):
            r = T if rows is None else rows[j]
            out = y[:r, self.out_offsets[j] : self.out_offsets[j + 1]]
            linear_rows(x[:r, : self.in_offsets[j + 1]], lin.weight, out, lin.bias)
        return y


class ChainRMSNorm(nn.Module):
    """RMSNorm applied to each chain separately, with each chain's own statistics."""

    def __init__(self, widths: Sequence[int], eps: float):
        super().__init__()
        self.widths = tuple(widths)
        self.offsets = _offsets(widths)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.offsets[-1]))
        self._equal = len(set(self.widths)) == 1

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) over the last dim, computed in fp32, times w; x: [..., c] and w:
        [c], or x: [..., n, c] and w: [n, c]. Rounded as transformers' LlamaRMSNorm rounds: the
        normalised x is cast to x's dtype before the weight multiplies it (a no-op in fp32, where a
        one-chain norm is one fused op)."""
        if x.dtype == torch.float32 and w.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), w, eps=self.eps)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * w  # bf16 in: computed in fp32, rounded once

    def forward(self, x: torch.Tensor, chains: int, rows: Rows = None) -> torch.Tensor:
        # x: [..., >= offsets[chains]] -> [..., offsets[chains]]
        width = self.offsets[chains]
        w = self.weight[:width]
        if self._equal and x.dim() == 2 and not torch.is_grad_enabled() and cpu_kernels.rms_norm_ok(x, w):
            return cpu_kernels.rms_norm_rows(x[:, :width], w, self.widths[0], self.eps)  # one pass, not 6-7 ops
        if self._equal:
            # Equal chains: one pass over every row and chain of the step. A row's unused chains are
            # normalised too (elementwise, negligible next to the matmuls) and never read afterwards.
            if chains == 1:
                return self._norm(x[..., :width], w)
            xs = x[..., :width].unflatten(-1, (chains, self.widths[0]))
            return self._norm(xs, w.view(chains, -1)).flatten(-2)
        outs = []
        for j in range(chains):
            lo, hi = self.offsets[j], self.offsets[j + 1]
            xin = x[..., lo:hi] if rows is None else x[: rows[j], lo:hi]
            outs.append(self._norm(xin, w[lo:hi]))
        return scatter_chain_outputs(outs, rows, x)


def llama3_inv_freq(inv: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3's frequency scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    blend between (transformers' `_compute_llama3_parameters`)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, out)


def rope_cache(head_dim: int, max_pos: int, theta: float, device=None,
               scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables: [max_pos, head_dim] (Llama's rotate-half layout), in fp32, with sin's first half
    negated (apply_rope's form of rotate_half). `scaling`: a Llama-3 rope_scaling dict
    (config.rope_scaling), or None for plain RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if scaling is not None:
        inv = llama3_inv_freq(inv, scaling)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones_like(inv), torch.ones_like(inv)])
    return emb.cos().float(), (emb.sin() * sign).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [..., T, H, hd] with rope_cache's cos/sin: [..., T, hd] (gathered at x's positions),
    computed in the tables' dtype and returned in x's (fp32 tables: the rotation in fp32, as training
    under autocast wants; tables in x's dtype: no casts, transformers' rounding in bf16)."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    # rotate_half(x) * sin == (x's halves swapped) * (sin, first half negated: the table's form): one
    # roll instead of two slices, a neg and a cat, and one fused multiply-add (1.6x faster at T = 1-32).
    swapped = xf.roll(half, -1)
    return torch.addcmul(xf * cos.unsqueeze(-2), swapped, sin.unsqueeze(-2)).to(x.dtype)
