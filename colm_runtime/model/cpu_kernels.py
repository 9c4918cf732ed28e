"""CPU kernels of our own, in C, built on first use with the machine's C compiler and loaded with ctypes.

- `paged_decode` (csrc/paged_decode.c): decode attention that reads the paged K/V cache in place.
  Without it a decode step gathers every sequence's K/V blocks into a padded copy and runs SDPA over
  the copy: at batch 32 on SmolLM2 in bf16 those were ~30% of a decode step (docs/performance.md).
- `rms_norm_rows` (csrc/row_ops.c): RMSNorm of bf16 rows (one segment per chain) in one pass,
  rounded as transformers rounds it, instead of seven torch ops; fp32 rows likewise (F.rms_norm's ~6).
  The same file: `swiglu_rows` (silu(g) * u of every chain) and `rope_store_rows` (a step's queries and
  keys roped, its K/V stored into the paged cache), fp32 and bf16, one call each per layer.
- `gemm_f32` (csrc/gemm_f32.c): fp32 products on CPUs with AVX2 and FMA but no AVX-512 (MKL's sgemm
  packs W on every call: 4-7 GB/s at 1-32 rows there, where a plain sum reads 18 GB/s): W rows read in
  place against groups of up to 4 x rows below 6 rows (1.3-3.5x MKL), x packed into panels of 16 rows
  against broadcast W values from 6 rows (1.5-2.4x MKL at 32, 1.0-1.5x at 64-256). In the same file,
  `gemm_bf16w`: bf16 products on those kernels with x and W widened to fp32 (W in registers below
  BF16_TALL_ROWS rows, block by block into L1 from there), where the CPU has no bf16 dot product of its
  own and ATen would emulate them (2.5-6.7x at 8-32 rows; 1.08-1.27x `torch.mv` at one row).
- `layers_step` (csrc/layers_cpu.c): every layer of a decode step in one call, fp32 or bf16, on the
  kernels above in the Python path's order (bit-identical to it), where those kernels run.
- `gemv_bf16` (csrc/gemv_bf16.c): bf16 products of 1-8 rows with AVX-512 BF16 dot products, streaming
  each weight once with software prefetch: 1.4-1.9x ATen's `mv` / oneDNN at 1-4 rows, ~1.1x at 8, where a decode
  step is bound by reading the weights. Where the CPU has AMX it takes 1-3 rows only:
- `gemm_amx_bf16` (csrc/gemm_amx_bf16.c): bf16 products of 4-64 rows (a batched decode step) on AMX
  tiles, with W as stored as the left operand (no repacking): 1.4-1.8x oneDNN, 1.4x gemv_bf16 at 8 rows.
- `sample_rows` (csrc/sample_rows.c): temperature sampling of fp32 logit rows by inverse CDF in two
  passes over each row, instead of torch's divide, softmax, float64 cumsum and searchsorted; top-k,
  top-p and min-p cut by a histogram select instead of sorting the vocabulary.

The shared library is compiled once per source, flags and CPU (`-march=native`) into
$XDG_CACHE_HOME/colm/kernels (default ~/.cache/colm/kernels) and reused; building takes ~6 s (the files
compile side by side; paged_decode.c's specialisations are most of it). No compiler, a failed build or
COLM_CPU_KERNELS=0: callers get None and keep the torch path (same results up to rounding), and one log
line says why. The library links the OpenMP runtime torch has already loaded (same soname), so it
shares torch's threads instead of starting a second pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("colm.kernels")

SOURCES = tuple(Path(__file__).with_name("csrc") / f for f in ("paged_decode.c", "gemv_bf16.c", "gemm_amx_bf16.c",
                                                                      "row_ops.c", "sample_rows.c", "threads.c",
                                                                      "gemm_f32.c", "layers_cpu.c"))
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=gnu11"]
_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM, MAX_GROUP = 256, 64  # csrc/paged_decode.c MAX_HD, MAX_G
_I64, _F32, _INT, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


def enabled() -> bool:
    return os.environ.get("COLM_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_key() -> str:
    try:  # -march=native: a library built for one CPU may not run on another
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "colm" / "kernels"


def _build(cc: str) -> Path:
    src = b"".join(f.read_bytes() for f in (*SOURCES, SOURCES[0].with_name("bf16.h")))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(src + " ".join(COMPILE_FLAGS).encode() + _cpu_key().encode() + version.encode()).hexdigest()
    out = _cache_dir() / f"colm-kernels-{key[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, lib = [Path(tmp) / f"{f.stem}.o" for f in SOURCES], Path(tmp) / "k.so"
        # fast-math at compile time only (vectorised expf): linking with it would add crtfastmath, which
        # flushes denormals to zero for the whole process.
        jobs = [subprocess.Popen([cc, *COMPILE_FLAGS, "-c", str(src_file), "-o", str(obj)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for src_file, obj in zip(SOURCES, objs)]
        for job in jobs:  # compiled side by side: the build takes as long as the slowest file
            stdout, stderr = job.communicate()
            if job.returncode:
                raise subprocess.CalledProcessError(job.returncode, job.args, stdout, stderr)
        subprocess.run([cc, "-shared", "-fopenmp", *map(str, objs), "-o", str(lib), "-lm"], capture_output=True,
                       text=True, check=True)
        os.replace(lib, out)  # atomic: concurrent builders never load a half-written file
    return out


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (logged once) when they are off or cannot be built here."""
    if not enabled():
        log.info("CPU kernels off (COLM_CPU_KERNELS=0): decode attention gathers K/V for SDPA")
        return None
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        log.warning("no C compiler (%s): decode attention gathers K/V for SDPA (slower)", cc)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU kernels not built (%s): decode attention gathers K/V for SDPA", detail.strip()[:500])
        return None
    lib.paged_decode.argtypes = [_P] * 6 + [_I64] * 7 + [_F32, _INT, _INT]
    lib.paged_decode.restype = _INT
    lib.gemv_bf16.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _INT, _INT]
    lib.gemv_bf16.restype = _INT
    lib.has_gemv = bool(lib.gemv_bf16_supported())
    lib.gemm_amx_bf16.argtypes = lib.gemv_bf16.argtypes
    lib.gemm_amx_bf16.restype = _INT
    lib.has_amx = lib.gemm_amx_init() == 0  # the CPU has AMX-BF16 and Linux granted this process its tiles
    lib.gemm_f32.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _INT]
    lib.gemm_f32.restype = _INT
    lib.gemm_f32_tall.argtypes = lib.gemm_f32.argtypes
    lib.gemm_f32_tall.restype = _INT
    lib.has_f32 = bool(lib.gemm_f32_supported())
    lib.gemm_bf16w.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _INT, _P, _I64, _INT]
    lib.gemm_bf16w.restype = _INT
    lib.rms_norm_bf16.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _F32, _P, _INT]
    lib.rms_norm_bf16.restype = None
    lib.rms_norm_f32.argtypes = lib.rms_norm_bf16.argtypes
    lib.rms_norm_f32.restype = None
    for fn in (lib.swiglu_f32, lib.swiglu_bf16):
        fn.argtypes, fn.restype = [_P, _I64, _I64, _I64, _I64, _P, _INT], None
    for fn in (lib.rope_store_f32, lib.rope_store_bf16):
        fn.argtypes, fn.restype = [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _INT], None
    lib.sample_rows.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _INT]
    lib.sample_rows.restype = None
    lib.release_thread_pool.restype = _INT
    lib.layers_step.argtypes = [_P] * 13 + [_F32, _F32, _INT]
    lib.layers_step.restype = _INT
    return lib


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether paged_decode can run these: CPU tensors of a supported dtype and size."""
    if q.device.type != "cpu" or q.dtype not in _DTYPES or k_cache.dtype != q.dtype:
        return False
    if library() is None:
        return False
    G, rem = divmod(q.shape[1], k_cache.shape[2])
    return q.shape[-1] <= MAX_HEAD_DIM and G <= MAX_GROUP and rem == 0


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_idx: torch.Tensor,
                 lens: torch.Tensor, max_len: int, scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per pair over its paged context, reading the cache in place.

    q: [N, Hq, hd]; k_cache, v_cache: one layer's cache [blocks, block_size, Hkv, hd] (contiguous);
    block_idx: [N, nb] block ids; lens: [N] context lengths (<= nb * block_size, <= max_len) -> [N, Hq, hd].
    Call only where supports() is true."""
    lib = library()
    N, Hq, hd = q.shape
    _, bs, Hkv, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = q.contiguous()
    idx = block_idx.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), idx.data_ptr(),
                          lens.data_ptr(), N, idx.shape[1], Hq, Hkv, hd, bs, max_len,
                          hd ** -0.5 if scale is None else scale, int(q.dtype == torch.bfloat16), torch.get_num_threads())
    assert rc == 0, "paged_decode: shape outside the kernel's limits (check supports() first)"
    return out


# gemm_bf16w at every row count where it runs: below BF16_TALL_ROWS rows it widens W in registers (1.08-1.27x
# ATen's bf16 matrix-vector product at one row, 1.1-2.1x widening W into scratch at 1-5 rows), from there
# W block by block into L1 scratch for the tall kernel (5.6-6.7x ATen's emulated bf16 GEMM at 32 rows).
# SmolLM2's shapes, 30 cold copies, interleaved (tall / in-register): 1.25-2.1 at 4-6 rows, 0.98-1.03 at 8,
# 1.11-1.29 at 12 in two of three runs (0.98 for gate_up in the third), 0.88-1.01 at 14, 0.73-0.91 at 16.
BF16_TALL_ROWS = 13
GEMV_MAX_ROWS = 3  # csrc/gemv_bf16.c takes products of 1-3 rows (it handles up to 8; AMX wins from 4)
AMX_ROWS = (4, 64)  # csrc/gemm_amx_bf16.c: products of 4-64 rows where the CPU has AMX (1.4-1.8x oneDNN)


def rows_kernel(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Which of our bf16 product kernels takes x [M, K] @ w [N, K].T: "gemv" (1-3 rows, or up to 8
    without AMX), "amx" (4-64 rows, K % 32 == 0, N % 16 == 0), "widen" (any rows, on a CPU with neither:
    gemm_bf16w), or None (ATen's). bf16 CPU tensors with unit inner strides only."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu" or w.device.type != "cpu":
        return None
    if x.dim() != 2 or x.stride(1) != 1 or w.stride(1) != 1:
        return None
    lib = library()
    if lib is None:
        return None
    M, K = x.shape
    if lib.has_amx and AMX_ROWS[0] <= M <= AMX_ROWS[1] and K % 32 == 0 and w.shape[0] % 16 == 0:
        return "amx"
    if lib.has_gemv and 1 <= M <= (GEMV_MAX_ROWS if lib.has_amx else 8):
        return "gemv"
    if has_bf16_widen():
        return "widen"
    return None


@functools.lru_cache(maxsize=1)
def has_bf16_widen() -> bool:
    """Whether bf16 products run on gemm_bf16w here: where has_f32_rows and the CPU has no bf16 dot
    product of its own (no AVX-512 BF16, no AMX), so that ATen would emulate them."""
    lib = library()
    return has_f32_rows() and not lib.has_gemv and not lib.has_amx


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in out_dtype (bf16 or fp32), fp32 sums, on AVX-512 BF16 (M <= 8)."""
    return _rows(library().gemv_bf16, x, w, out_dtype)


def gemm_amx_bf16(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in out_dtype (bf16 or fp32), fp32 sums, on AMX tiles."""
    return _rows(library().gemm_amx_bf16, x, w, out_dtype)


def bf16_rows(x: torch.Tensor, w: torch.Tensor, kernel: str) -> torch.Tensor:
    """x @ w.T in bf16 on the kernel rows_kernel chose."""
    if kernel == "widen":
        return gemm_bf16w(x, w)
    return gemm_amx_bf16(x, w) if kernel == "amx" else gemv_bf16(x, w)


def _rows(fn, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=out_dtype)
    rc = fn(x.data_ptr(), M, x.stride(0), w.data_ptr(), N, K, w.stride(0), y.data_ptr(), N,
            int(out_dtype == torch.float32), torch.get_num_threads())
    assert rc == 0, "bf16 product kernel: outside its limits (check rows_kernel first)"
    return y


# From 6 rows gemm_f32_tall (packed x panels, broadcast W) beats gemm_f32 (W rows in place) since its
# panels' halves stop at their own K and tall_block is inlined (round 7): cold weights, interleaved, tall /
# rows on SmolLM2's shapes 0.83-0.92x at 4 rows, 0.91-1.03x at 6, 0.96-1.10x at 7-9, 1.04-1.20x at 10-11;
# SmolLM2 decode steps against a threshold of 12 (benchmarks/step_ab.py): 1.00-1.02x at batch 5-7, 1.08x
# at 8, 1.03x at 9, 1.07x at 10, 1.20x at 11; the three-chain model's mixed batch of 32 1.02x.
F32_TALL_ROWS = 6


@functools.lru_cache(maxsize=1)
def has_f32_rows() -> bool:
    """Whether fp32 products run on csrc/gemm_f32.c here: a CPU with AVX2 and FMA but not AVX-512
    (measured there only: 1.3-3.5x MKL at 1-32 rows, 1.0-1.5x at 64-256; ATen's MKL keeps AVX-512 CPUs)."""
    lib = library()
    return lib is not None and lib.has_f32 and " avx512f" not in _cpu_key()


def f32_rows_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemm_f32 takes x [M, K] @ w [N, K].T: fp32 CPU tensors with unit inner strides, where
    has_f32_rows. (Called for every product of a step: the cheap tests first.)"""
    return (x.dtype == torch.float32 and w.dtype == torch.float32 and has_f32_rows() and x.is_cpu
            and w.is_cpu and x.dim() == 2 and x.stride(1) == 1 and w.stride(1) == 1 and x.shape[0] >= 1)


def gemm_f32(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             row_k: Sequence[int] | None = None, tall: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T (+ bias) into out ([M, N], unit inner stride, may be a column block of a
    wider tensor) or a new tensor, on AVX2 FMAs: gemm_f32_tall from F32_TALL_ROWS rows (or as `tall`
    says), else gemm_f32 (at most 64 rows). Call only where f32_rows_ok.

    row_k (a mixed-chain LM head): row m uses x[m, :row_k[m]] only, non-increasing in m, and its other
    columns must be zero; groups of rows then stop at their first row's K, so the product's FLOPs follow
    each row's chains while W is read once."""
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty(M, N)
    elif out.shape != (M, N) or out.stride(1) != 1:
        raise ValueError("gemm_f32: out must be [M, N] with unit inner stride")
    ks = _row_k(row_k, M, K)
    lib = library()
    fn = lib.gemm_f32_tall if (M >= F32_TALL_ROWS if tall is None else tall) else lib.gemm_f32
    rc = fn(x.data_ptr(), M, x.stride(0), w.data_ptr(), N, K, w.stride(0), out.data_ptr(), out.stride(0),
            None if bias is None else bias.contiguous().data_ptr(), ks, torch.get_num_threads())
    assert rc == 0, "gemm_f32: outside its limits (check f32_rows_ok first)"
    return out


def _row_k(row_k: Sequence[int] | None, M: int, K: int):
    if row_k is None:
        return None
    if len(row_k) != M or not all(K >= a >= b >= 1 for a, b in zip(row_k, [*row_k[1:], 1])):
        raise ValueError("row_k must hold M non-increasing values in 1..K")
    return (ctypes.c_int64 * M)(*row_k)


def gemm_bf16w(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
               row_k: Sequence[int] | None = None, tall: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T, both bf16 with unit inner strides, into out ([M, N], bf16 or fp32, unit inner
    stride, may be a column block of a wider tensor) or a new bf16 tensor, on gemm_f32's kernels with
    both operands widened to fp32 (csrc/gemm_f32.c gemm_bf16w): gemm_f32's sums on x.float() and
    w.float(), bit for bit, rounded once to bf16 for a bf16 out, while W is read at half the bytes. row_k
    as in gemm_f32; tall: the tall kernel from BF16_TALL_ROWS rows unless True or False says (the few-row
    kernel, W widened in registers, takes any number of rows). Call where has_bf16_widen."""
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16)
    elif out.shape != (M, N) or out.stride(1) != 1 or out.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("gemm_bf16w: out must be [M, N], bf16 or fp32, with unit inner stride")
    rc = library().gemm_bf16w(x.data_ptr(), M, x.stride(0), w.data_ptr(), N, K, w.stride(0), out.data_ptr(),
                              out.stride(0), int(out.dtype == torch.float32), _row_k(row_k, M, K),
                              BF16_TALL_ROWS if tall is None else 1 if tall else M + 1, torch.get_num_threads())
    assert rc == 0, "gemm_bf16w: no memory or no AVX2 (check has_bf16_widen first)"
    return out


def rms_norm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether rms_norm_rows can take x [rows, n*c] (unit inner stride) with w [n*c]: bf16 or fp32 (both
    the same) on the CPU."""
    return (x.dtype in _DTYPES and w.dtype == x.dtype and x.device.type == "cpu" and x.dim() == 2
            and x.stride(1) == 1 and w.is_contiguous() and library() is not None)


def rms_norm_rows(x: torch.Tensor, w: torch.Tensor, segment: int, eps: float) -> torch.Tensor:
    """RMSNorm of each `segment`-wide slice of every row of x [rows, n*segment], slice j scaled by
    w[j*segment:(j+1)*segment] -> a new [rows, n*segment] tensor of x's dtype (bf16: rounded as
    transformers rounds it). Call only where rms_norm_ok."""
    rows, width = x.shape
    out = torch.empty(rows, width, dtype=x.dtype)
    fn = library().rms_norm_bf16 if x.dtype == torch.bfloat16 else library().rms_norm_f32
    fn(x.data_ptr(), rows, x.stride(0), w.data_ptr(), width // segment, segment, eps, out.data_ptr(),
       torch.get_num_threads())
    return out


def swiglu_ok(gu: torch.Tensor) -> bool:
    """Whether swiglu_rows can take gu [rows, chains * 2F]: fp32 or bf16 on the CPU, unit inner stride."""
    return gu.dtype in _DTYPES and gu.is_cpu and gu.dim() == 2 and gu.stride(1) == 1 and library() is not None


def swiglu_rows(gu: torch.Tensor, chains: int) -> torch.Tensor:
    """silu(g) * u of every chain of gu [rows, chains * 2F] (per chain F gate then F up columns) -> a new
    [rows, chains * F] of gu's dtype (bf16: rounded as F.silu(g) * u rounds, silu then the product). Call
    only where swiglu_ok."""
    rows, width = gu.shape
    F = width // (2 * chains)
    out = torch.empty(rows, chains * F, dtype=gu.dtype)
    fn = library().swiglu_bf16 if gu.dtype == torch.bfloat16 else library().swiglu_f32
    fn(gu.data_ptr(), rows, gu.stride(0), chains, F, out.data_ptr(), torch.get_num_threads())
    return out


def rope_store_ok(y: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether rope_store_rows can take this step: rows, tables and cache of one dtype (fp32 or bf16) on
    the CPU."""
    return (y.dtype in _DTYPES and cos.dtype == y.dtype and k_cache.dtype == y.dtype and y.is_cpu
            and y.dim() == 2 and y.stride(1) == 1 and k_cache.is_contiguous() and library() is not None)


def rope_store_rows(y: torch.Tensor, pools: int, q_heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                    rows: torch.Tensor | None) -> torch.Tensor:
    """Rope the queries and keys of y [T, pools * (q_heads + 2 kv_heads) * head_dim] at cos/sin [T, head_dim]
    (layers.rope_cache's layout), store the keys and values of pool-major rows `rows` (None: all P*T) at
    cache slots `slots` of k_cache/v_cache (one layer, [..., kv_heads, head_dim] contiguous), and return
    the roped queries [T, pools * q_heads, head_dim]. In bf16, rounded as layers.apply_rope rounds with bf16
    tables. Call only where rope_store_ok."""
    T = y.shape[0]
    cos, sin = cos.contiguous(), sin.contiguous()
    slots = slots.to(torch.int64).contiguous()
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    q = torch.empty(T, pools * q_heads, head_dim, dtype=y.dtype)
    fn = library().rope_store_bf16 if y.dtype == torch.bfloat16 else library().rope_store_f32
    fn(y.data_ptr(), T, y.stride(0), pools, q_heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
       k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), None if rows is None else rows.data_ptr(),
       slots.shape[0], torch.get_num_threads())
    return q


LAYERS_DIMS = ("T", "kmax", "NC", "cw", "C", "H", "hd", "F", "NP", "NB", "BS", "max_len", "R", "tall", "layers",
               "kv_stride", "bf16")  # csrc/layers_cpu.c's dims[], in order


def layers_ok(h: torch.Tensor, k_all: torch.Tensor | None) -> bool:
    """Whether layers_step can run a step over hidden rows h with this shared K/V tensor: contiguous CPU
    tensors of one dtype, fp32 where gemm_f32 runs or bf16 where gemm_bf16w does (the kernels the Python
    path picks there)."""
    return (((h.dtype == torch.float32 and has_f32_rows()) or (h.dtype == torch.bfloat16 and has_bf16_widen()))
            and h.is_cpu and h.dim() == 2 and h.is_contiguous() and k_all is not None and k_all.dtype == h.dtype
            and k_all.is_cpu and k_all.is_contiguous())


def layers_step(h: torch.Tensor, dims: dict[str, int], wtab: torch.Tensor, rows: Sequence[int], cos: torch.Tensor,
                sin: torch.Tensor, slots: torch.Tensor, kv_rows: torch.Tensor | None, q_idx: torch.Tensor | None,
                block_idx: torch.Tensor, lens: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, eps: float,
                scale: float) -> None:
    """Every layer of one step over h [T, kmax * cw] in place, in one C call (csrc/layers_cpu.c: the
    kernels of the Python path in its order, bit-identical), in h's dtype (weights, tables and K/V in the
    same). dims: LAYERS_DIMS but "tall" and "bf16" (filled in here from h's dtype, as the Python path's
    products pick their kernels); wtab: int64, per layer the two norm weights'
    addresses, then per product (qkv, o, gate_up, down) and chain: weight, bias (0: none), rows, columns,
    row stride. Call only where layers_ok."""
    i64 = lambda t: None if t is None else t.to(torch.int64).contiguous()
    bf16 = h.dtype == torch.bfloat16
    dims = {**dims, "tall": BF16_TALL_ROWS if bf16 else F32_TALL_ROWS, "bf16": int(bf16)}
    d = torch.tensor([dims[k] for k in LAYERS_DIMS], dtype=torch.int64)
    r = torch.tensor(list(rows), dtype=torch.int64)
    slots, kv_rows, q_idx, block_idx, lens = map(i64, (slots, kv_rows, q_idx, block_idx, lens))
    cos, sin = cos.contiguous(), sin.contiguous()
    ptr = lambda t: None if t is None else t.data_ptr()
    rc = library().layers_step(h.data_ptr(), d.data_ptr(), wtab.data_ptr(), r.data_ptr(), cos.data_ptr(),
                               sin.data_ptr(), slots.data_ptr(), ptr(kv_rows), ptr(q_idx), block_idx.data_ptr(),
                               lens.data_ptr(), k_all.data_ptr(), v_all.data_ptr(), eps, scale, torch.get_num_threads())
    assert rc == 0, "layers_step: a kernel refused the step's shapes (or no memory for its scratch)"


def sample_ok(logits: torch.Tensor) -> bool:
    """Whether sample_rows can take these logits: a 2-D fp32 CPU tensor with unit inner stride."""
    return (logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 2
            and logits.stride(1) == 1 and library() is not None)


def sample_rows(logits: torch.Tensor, temperatures: list[float], uniforms: torch.Tensor,
                top_k: list[int] | None = None, top_p: list[float] | None = None,
                min_p: list[float] | None = None) -> torch.Tensor:
    """One token per row of logits [B, V], drawn from softmax(logits / T) cut to the row's top-k, top-p
    and min-p (as sampler.processed_probs cuts; all three lists or none) with the row's uniform in
    [0, 1) (float64 [B]) -> int64 [B]; -1 for a row with no finite positive mass (NaN or +inf logits,
    or every token at -inf). Temperatures > 0. Call only where sample_ok."""
    B, V = logits.shape
    temps = torch.tensor(temperatures, dtype=torch.float32)
    u = uniforms.to(torch.float64).contiguous()
    out = torch.empty(B, dtype=torch.int64)
    cuts = (None, None, None)
    if top_k is not None:
        cuts = (torch.tensor(top_k, dtype=torch.int64), torch.tensor(top_p, dtype=torch.float32),
                torch.tensor(min_p, dtype=torch.float32))
    library().sample_rows(logits.data_ptr(), B, V, logits.stride(0), temps.data_ptr(), u.data_ptr(),
                          *(None if c is None else c.data_ptr() for c in cuts), out.data_ptr(), torch.get_num_threads())
    return out


def release_thread_pool() -> bool:
    """Let the calling thread's OpenMP worker threads exit (csrc/threads.c): the server's main thread,
    done loading the model, before the engine thread takes every step. False without the kernels."""
    lib = library()
    return lib is not None and lib.release_thread_pool() == 0
