"""The C kernels (colm_runtime/model/cpu_kernels.py, csrc/): decode attention against the
torch path it replaces (gather the paged blocks, SDPA over the copy), and its own properties: a pair's
output does not depend on the batch or the thread count; with COLM_CPU_KERNELS=0, or no compiler, the
torch path serves the same tokens. The bf16 product of a few rows (gemv_bf16) against an fp32 product of
the same bf16 values."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from colm_runtime.model import cpu_kernels

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler to build the kernel")


def paged_case(pairs, q_heads, kv_heads, hd, bs, dtype, seed=0, blocks=64):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks, bs, kv_heads, hd, generator=g).to(dtype)
    v = torch.randn(blocks, bs, kv_heads, hd, generator=g).to(dtype)
    q = torch.randn(pairs, q_heads, hd, generator=g).to(dtype)
    lens = torch.randint(1, 6 * bs, (pairs,), generator=g)
    lens[0] = 6 * bs  # one pair fills its blocks to the last slot
    nb = 6
    idx = torch.stack([torch.randperm(blocks, generator=g)[:nb] for _ in range(pairs)])
    return q, k, v, idx, lens


@contextlib.contextmanager
def torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_path(q, k, v, idx, lens):
    """What attention.py does without the kernel: gather, mask, SDPA (in fp32 here, as the reference)."""
    L = int(lens.max())
    K = k.index_select(0, idx.flatten()).view(idx.shape[0], -1, *k.shape[2:])[:, :L].float()
    V = v.index_select(0, idx.flatten()).view(idx.shape[0], -1, *v.shape[2:])[:, :L].float()
    mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float().unsqueeze(2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask,
                                       enable_gqa=q.shape[1] != k.shape[2])
    return o[:, :, 0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_heads,kv_heads,hd,bs", [(9, 3, 64, 16), (4, 4, 128, 4), (6, 2, 24, 8), (2, 1, 16, 1),
                                                     (8, 2, 64, 16), (8, 1, 64, 5), (16, 2, 128, 16), (3, 1, 33, 16),
                                                     (2, 2, 64, 8), (10, 1, 64, 16)],
                         ids=["gqa3-hd64", "mha-hd128", "gqa3-hd24", "bs1", "gqa4-hd64", "gqa8-hd64-bs5", "gqa8-hd128",
                              "gqa3-hd33", "mha-hd64", "gqa10-portable"])
@pytest.mark.parametrize("pairs", [3, 24])
def test_kernel_equals_gather_and_sdpa(dtype, tol, q_heads, kv_heads, hd, bs, pairs):
    # With AVX-512, groups of 1-8 query heads take code specialised for their size (head_dim 64 and 128
    # apart, other head sizes with a masked last vector); 10 takes the portable path. On AVX2, 24 pairs
    # on 2 threads with several kv heads run one task per pair (attend_pair256), 3 one per (pair, head).
    q, k, v, idx, lens = paged_case(pairs, q_heads, kv_heads, hd, bs, dtype)
    assert cpu_kernels.supports(q, k)
    with torch_threads(2):
        got = cpu_kernels.paged_decode(q, k, v, idx, lens, int(lens.max()))
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), torch_path(q, k, v, idx, lens), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 2, 128), (8, 8, 64)], ids=["gqa3-hd64", "gqa8-hd128", "mha-hd64"])
def test_a_pair_does_not_depend_on_its_batch_or_the_thread_count(dtype, heads):
    # On AVX2 the batch of 16 on 2 threads runs one task per pair, every kv head at once; a pair alone runs
    # a task per (pair, kv head), on 1 thread and on 2: the same sums, bit for bit.
    q, k, v, idx, lens = paged_case(16, *heads, 16, dtype, seed=1)
    with torch_threads(2):
        batched = cpu_kernels.paged_decode(q, k, v, idx, lens, int(lens.max()))
    for n in (1, 2):
        with torch_threads(n):
            for i in (0, 5, 15):
                alone = cpu_kernels.paged_decode(q[i : i + 1], k, v, idx[i : i + 1], lens[i : i + 1], int(lens[i]))
                assert torch.equal(alone[0], batched[i])


def test_unsupported_inputs_keep_the_torch_path():
    q, k, v, idx, lens = paged_case(2, 4, 4, 16, 4, torch.float16)
    assert not cpu_kernels.supports(q, k)  # fp16: no kernel
    q, k, v, idx, lens = paged_case(2, 6, 4, 16, 4, torch.float32)
    assert not cpu_kernels.supports(q, k)  # 6 query heads do not group over 4 KV heads
    q, k, v, idx, lens = paged_case(2, 2, 1, 512, 1, torch.float32, blocks=8)
    assert not cpu_kernels.supports(q, k)  # head_dim above the kernel's limit


SERVE = """
import sys, torch
from colm_runtime.model import cpu_kernels
from tests.engine._helpers import make_engine, prompt, req
eng = make_engine()
outs = eng.generate([req(prompt(5 + 3 * i, seed=i), chains=1 + i % 4, max_tokens=12) for i in range(6)])
print(cpu_kernels.library() is not None, [c[0].token_ids for c in outs.values()])
"""


def test_the_engine_serves_the_same_tokens_with_and_without_the_kernel(tmp_path):
    # Two fresh processes (the library is loaded once per process), one building the kernel into an
    # empty cache folder, one with COLM_CPU_KERNELS=0: same greedy tokens on a batch of mixed chain counts.
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    runs = {}
    for name, extra in (("kernel", {}), ("torch", {"COLM_CPU_KERNELS": "0"})):
        out = subprocess.run([sys.executable, "-c", SERVE], env={**env, **extra}, capture_output=True, text=True,
                             timeout=300, cwd=Path(__file__).parents[2])
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = out.stdout.strip()
    assert runs["kernel"].startswith("True ") and runs["torch"].startswith("False ")
    assert runs["kernel"][5:] == runs["torch"][6:]
    assert list((tmp_path / "colm" / "kernels").glob("colm-kernels-*.so")), "built into $XDG_CACHE_HOME/colm/kernels"


needs_bf16_dot = pytest.mark.skipif(not (cpu_kernels.library() and cpu_kernels.library().has_gemv),
                                    reason="this CPU has no AVX-512 BF16")


@needs_bf16_dot
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(49, 576), (7, 40), (130, 1537)], ids=["tail-rows", "short-k", "odd-k"])
def test_gemv_equals_an_fp32_product_of_the_bf16_inputs(rows, n, k):
    # bf16 products are exact in fp32 and the kernel sums in fp32: against an fp32 product of the same
    # bf16 values the difference is summation order only; the bf16 output is that, rounded.
    check_product(cpu_kernels.gemv_bf16, rows, n, k)


def check_product(product, rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    torch.testing.assert_close(product(x, w, torch.float32), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(product(x, w).float(), ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    # the same x row gives the same output row whatever else is in the batch (its sums' order is fixed)
    alone = product(x[-1:].expand(min(rows, 4), k).contiguous(), w, torch.float32)
    assert torch.equal(alone[0], product(x, w, torch.float32)[-1])


@needs_bf16_dot
def test_gemv_takes_strided_rows_and_refuses_what_it_cannot_do():
    wide, xs, w, x = check_strided(cpu_kernels.gemv_bf16, 6, 200)
    assert cpu_kernels.rows_kernel(x, w) in ("gemv", None if cpu_kernels.library().has_amx else "gemv")
    assert cpu_kernels.rows_kernel(x.float(), w.float()) is None  # fp32: MKL's path
    assert cpu_kernels.rows_kernel(x, wide.T[:, :96]) is None  # columns of W not contiguous


@pytest.mark.parametrize("chains,c", [(1, 576), (3, 64), (2, 40)])
def test_rms_norm_kernel_rounds_as_the_torch_path(chains, c):
    # The torch path (ChainRMSNorm._norm in bf16): the normalised x is cast to bf16, then the weight
    # multiplies it. The kernel's fp32 sum runs in another order, so a value may land one bf16 step away.
    g = torch.Generator().manual_seed(c)
    wide = (torch.randn(17, chains * c + 8, generator=g) * 3).to(torch.bfloat16)
    x = wide[:, : chains * c]  # a column prefix, as ChainRMSNorm takes x[..., :width]
    w = (1 + torch.randn(chains * c, generator=g) * 0.1).to(torch.bfloat16)
    assert cpu_kernels.rms_norm_ok(x, w)
    got = cpu_kernels.rms_norm_rows(x, w, c, 1e-5)
    ref = (F.rms_norm(x.unflatten(-1, (chains, c)), (c,), eps=1e-5) * w.view(chains, c)).flatten(-2)
    step = ref.float().abs().clamp_min(1e-30) * 2 ** -7  # one bf16 step (8 significant bits) or less
    assert ((got.float() - ref.float()).abs() <= step).all()
    assert (got == ref).float().mean() > 0.97  # nearly all bitwise equal


@pytest.mark.parametrize("chains,c", [(1, 576), (3, 64), (2, 40)])
def test_fp32_rms_norm_kernel_equals_torch(chains, c):
    g = torch.Generator().manual_seed(c)
    wide = torch.randn(17, chains * c + 8, generator=g) * 3
    x = wide[:, : chains * c]
    w = 1 + torch.randn(chains * c, generator=g) * 0.1
    assert cpu_kernels.rms_norm_ok(x, w)
    got = cpu_kernels.rms_norm_rows(x, w, c, 1e-5)
    ref = (F.rms_norm(x.unflatten(-1, (chains, c)), (c,), eps=1e-5) * w.view(chains, c)).flatten(-2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not cpu_kernels.rms_norm_ok(x, w.to(torch.bfloat16))  # mixed dtypes: the torch path


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor, max_off: float = 1e-3) -> None:
    """bf16 results of our kernel and of torch's ops rounded at the same points: the fp32 values before
    each rounding differ in their last bits at most (another exp, a fused multiply-add), so a rounding
    can land one bf16 step apart, rarely (at most max_off of the values), and never further."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    off = got != want
    step = want.float().abs() * 2.0 ** -7 + 1e-30  # one bf16 step at want's size (8 bits of mantissa)
    assert ((got.float() - want.float()).abs()[off] <= step[off] * 1.01).all()
    assert off.float().mean() <= max_off, f"{int(off.sum())} of {off.numel()} values differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chains,F_", [(1, 1536), (3, 40)])
def test_swiglu_kernel_equals_torch(chains, F_, dtype):
    """bf16: rounded as torch's F.silu(g) * u in bf16 rounds (silu, then the product)."""
    g = torch.Generator().manual_seed(F_)
    wide = (torch.randn(13, chains * 2 * F_ + 5, generator=g) * 4).to(dtype)
    gu = wide[:, : chains * 2 * F_]  # strided rows, as a column block of a wider output would be
    assert cpu_kernels.swiglu_ok(gu)
    gate, up = gu.unflatten(-1, (chains, 2, F_)).unbind(-2)
    got, want = cpu_kernels.swiglu_rows(gu, chains), (F.silu(gate) * up).flatten(-2)
    if dtype == torch.bfloat16:
        assert_bf16_close(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not cpu_kernels.swiglu_ok(gu.to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pools,some_rows", [(1, False), (3, False), (3, True)], ids=["one", "all-pools", "some-rows"])
def test_rope_and_store_kernel_equals_the_torch_path(pools, some_rows, dtype):
    """Queries roped, keys roped and values copied into their cache slots, as attention.py's torch path
    does (apply_rope, index_copy_); with some_rows, later rows own fewer pools (a mixed batch). bf16: rows,
    tables and cache in bf16, rounded as apply_rope rounds with bf16 tables."""
    from colm_runtime.model.layers import apply_rope, rope_cache

    g = torch.Generator().manual_seed(pools)
    T, C, H, hd = 5, 3, 1, 16
    y = torch.randn(T, pools * (C + 2 * H) * hd + 7, generator=g).to(dtype)[:, : pools * (C + 2 * H) * hd]
    cos, sin = (t.index_select(0, torch.tensor([3, 9, 10, 11, 40])).to(dtype) for t in rope_cache(hd, 64, 10000.0))
    rows = None
    if some_rows:  # pool p keeps its first T - p rows
        rows = torch.cat([torch.arange(p * T, p * T + T - p) for p in range(pools)])
    n = pools * T if rows is None else rows.shape[0]
    slots = torch.randperm(40, generator=g)[:n]
    kc, vc = torch.zeros(40, H, hd, dtype=dtype), torch.zeros(40, H, hd, dtype=dtype)
    assert cpu_kernels.rope_store_ok(y, cos, kc) and not cpu_kernels.rope_store_ok(y, cos.float(), kc.half())
    q = cpu_kernels.rope_store_rows(y, pools, C, H, hd, cos, sin, kc, vc, slots, rows)
    yc = y.reshape(T, pools, C + 2 * H, hd)
    qk = apply_rope(yc[:, :, : C + H].reshape(T, pools * (C + H), hd), cos, sin).view(T, pools, C + H, hd)
    k = qk[:, :, C:].transpose(0, 1).reshape(pools * T, H, hd)
    v = yc[:, :, C + H :].transpose(0, 1).reshape(pools * T, H, hd)
    if rows is not None:
        k, v = k.index_select(0, rows), v.index_select(0, rows)
    zeros = torch.zeros(40, H, hd, dtype=dtype)
    kref, vref = zeros.clone().index_copy_(0, slots, k), zeros.clone().index_copy_(0, slots, v)
    close = assert_bf16_close if dtype == torch.bfloat16 else partial(torch.testing.assert_close, rtol=1e-6, atol=1e-6)
    close(q, qk[:, :, :C].reshape(T, pools * C, hd))
    close(kc, kref)
    assert torch.equal(vc, vref)


def check_strided(product, rows, k):
    """A column prefix of W (the mixed head's slices) against every other x row."""
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(96, k + 256, generator=g).to(torch.bfloat16)
    xs = torch.randn(rows, k + 256, generator=g).to(torch.bfloat16)
    w, x = wide[:, :k], xs[::2, :k]
    torch.testing.assert_close(product(x, w, torch.float32), x.float() @ w.float().T, rtol=1e-5, atol=1e-4)
    return wide, xs, w, x


needs_amx = pytest.mark.skipif(not (cpu_kernels.library() and cpu_kernels.library().has_amx),
                               reason="this CPU (or kernel) gives no AMX tiles")


@needs_amx
@pytest.mark.parametrize("rows", [1, 4, 9, 16, 17, 32, 33, 50, 64])
@pytest.mark.parametrize("n,k", [(48, 576), (16, 32), (3072, 1536)], ids=["odd-blocks", "one-tile", "wide"])
def test_amx_equals_an_fp32_product_of_the_bf16_inputs(rows, n, k):
    # 48 rows of W: one pair of 16-row blocks and a single block; 17, 33, 50 x rows: partial x tiles.
    check_product(cpu_kernels.gemm_amx_bf16, rows, n, k)


@needs_amx
def test_amx_takes_strided_operands_and_the_routing_keeps_its_limits():
    wide, xs, w, x = check_strided(cpu_kernels.gemm_amx_bf16, 40, 384)
    assert cpu_kernels.rows_kernel(x, w) == "amx"
    assert cpu_kernels.rows_kernel(xs[:3, :384], w) == "gemv"  # 1-3 rows: the AVX-512 kernel
    assert cpu_kernels.rows_kernel(xs[:, :384].repeat(2, 1), w) is None  # 80 rows: oneDNN
    assert cpu_kernels.rows_kernel(xs[:8, :200], wide[:, :200]) is None  # K not a multiple of 32
    assert cpu_kernels.rows_kernel(xs[:8, :384], wide[:40, :384]) is None  # N not a multiple of 16
    lib = cpu_kernels.library()  # and the kernel itself refuses what it cannot do, writing nothing
    y = torch.zeros(8, 40, dtype=torch.bfloat16)
    assert lib.gemm_amx_bf16(xs.data_ptr(), 8, 640, wide.data_ptr(), 40, 384, 640, y.data_ptr(), 40, 0, 2) == -1
    assert lib.gemm_amx_bf16(xs.data_ptr(), 65, 640, wide.data_ptr(), 48, 384, 640, y.data_ptr(), 40, 0, 2) == -1
    assert not y.any()


needs_f32_kernel = pytest.mark.skipif(not (cpu_kernels.library() and cpu_kernels.library().has_f32),
                                      reason="this CPU has no AVX2/FMA")


@needs_f32_kernel
@pytest.mark.parametrize("tall", [False, True], ids=["rows", "tall"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 16, 32, 33, 64, 130])
@pytest.mark.parametrize("n,k", [(49, 576), (7, 40), (130, 1537), (2, 3)], ids=["tail-rows", "short-k", "odd-k", "tiny"])
def test_gemm_f32_equals_a_float64_product(tall, rows, n, k):
    # gemm_f32: every x-row group (4, then 1-3 left), every W block (3, then 1-2 left), K tails of 1-7
    # values. gemm_f32_tall: full and zero-padded x panels of 16, W blocks of 6 and the 1-5 rows left.
    if rows > 64 and not tall:
        pytest.skip("gemm_f32 takes at most 64 rows")
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ w.double().T
    torch.testing.assert_close(cpu_kernels.gemm_f32(x, w, tall=tall).double(), ref, rtol=1e-5, atol=1e-4 * k ** 0.5)
    torch.testing.assert_close(cpu_kernels.gemm_f32(x, w, bias=b, tall=tall).double(), ref + b.double(), rtol=1e-5,
                               atol=1e-4 * k ** 0.5)


@needs_f32_kernel
@pytest.mark.parametrize("tall", [False, True], ids=["rows", "tall"])
def test_gemm_f32_takes_strided_operands_and_writes_column_blocks(tall):
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(96, 600, generator=g)  # W: a column prefix of a wider row-major matrix (a chain's head)
    xs = torch.randn(40, 600, generator=g)
    w, x = wide[:, 192:384], xs[::2, 192:384]  # strided x rows, W rows not starting at column 0
    y = torch.full((20, 200), 5.0)
    out = cpu_kernels.gemm_f32(x, w, out=y[:, 50:146], tall=tall)  # a column block of a wider output
    ref = x.double() @ w.double().T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    assert (y[:, :50] == 5).all() and (y[:, 146:] == 5).all()  # nothing outside the block is written
    lib = cpu_kernels.library()  # the kernel refuses rows outside 1..64, writing nothing
    z = torch.zeros(65, 96)
    assert lib.gemm_f32(xs.data_ptr(), 65, 600, wide.data_ptr(), 96, 192, 600, z.data_ptr(), 96, None, None, 2) == -1
    assert lib.gemm_f32(xs.data_ptr(), 0, 600, wide.data_ptr(), 96, 192, 600, z.data_ptr(), 96, None, None, 2) == -1
    assert lib.gemm_f32_tall(xs.data_ptr(), 0, 600, wide.data_ptr(), 96, 192, 600, z.data_ptr(), 96, None, None, 2) == -1
    assert not z.any()
    assert not cpu_kernels.f32_rows_ok(x.to(torch.bfloat16), w.to(torch.bfloat16))
    assert not cpu_kernels.f32_rows_ok(x, wide.T[:, :40])  # columns of W not contiguous


@needs_f32_kernel
@pytest.mark.parametrize("tall", [False, True], ids=["rows", "tall"])
@pytest.mark.parametrize("counts", [(3, 3, 3), (10, 11, 11), (16, 0, 16), (1, 20, 7), (0, 0, 5), (5, 9, 0)])
def test_gemm_f32_with_ragged_rows_equals_the_product_of_the_zeroed_rows(tall, counts):
    # A mixed-chain head: counts[i] rows use the first (3 - i) * 200 - 7 columns (a K tail), ordered
    # widest first, their other columns zero. Group boundaries (4 rows; panel halves of 8) fall inside and
    # between the runs.
    widths = [593, 393, 193]
    row_k = [wd for wd, c in zip(widths, counts) for _ in range(c)]
    g = torch.Generator().manual_seed(sum(counts))
    w = torch.randn(50, 600, generator=g)[:, :593]
    x = torch.randn(len(row_k), 593, generator=g)
    for m, k in enumerate(row_k):
        x[m, k:] = 0
    got = cpu_kernels.gemm_f32(x, w, row_k=row_k, tall=tall)
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4 * 593 ** 0.5)


@needs_f32_kernel
@pytest.mark.parametrize("tall", [False, True], ids=["rows", "tall"])
def test_gemm_f32_does_not_read_columns_past_a_groups_row_k(tall):
    # 16 rows at K 576, 16 at K 192: every group of rows (4, or half a panel of 16) is uniform, so the
    # garbage in the second run's columns 192.. is never multiplied: the FLOPs follow the chains.
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(30, 576, generator=g), torch.randn(32, 576, generator=g)
    zeroed = x.clone()
    zeroed[16:, 192:] = 0
    got = cpu_kernels.gemm_f32(x, w, row_k=[576] * 16 + [192] * 16, tall=tall)
    torch.testing.assert_close(got.double(), zeroed.double() @ w.double().T, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError):
        cpu_kernels.gemm_f32(x, w, row_k=[192] * 16 + [576] * 16)  # increasing
    with pytest.raises(ValueError):
        cpu_kernels.gemm_f32(x, w, row_k=[577] * 32)  # past K
    with pytest.raises(ValueError):
        cpu_kernels.gemm_f32(x, w, row_k=[576] * 31)  # not one per row


needs_bf16_widen = pytest.mark.skipif(not cpu_kernels.has_bf16_widen(),
                                      reason="this CPU has a bf16 dot product (or no AVX2): bf16 stays on it or ATen")


@needs_bf16_widen
@pytest.mark.parametrize("tall", [False, True], ids=["rows", "tall"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(49, 576), (7, 40), (130, 1537), (2, 3)], ids=["tail-rows", "short-k", "odd-k", "tiny"])
def test_gemm_bf16w_sums_as_gemm_f32_on_the_widened_operands(tall, rows, n, k):
    # Widening a bf16 is exact, and the same kernels sum in the same order: the same bits as gemm_f32 on
    # the widened x and w, through every x group, W block (3 or 6, and the rows left) and K tail (1-7
    # values); a bf16 out is that sum rounded once, as torch rounds.
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w = (torch.randn(r, k, generator=g).to(torch.bfloat16) for r in (rows, n))
    ref = cpu_kernels.gemm_f32(x.float(), w.float(), tall=tall)
    assert torch.equal(cpu_kernels.gemm_bf16w(x, w, out=torch.empty(rows, n), tall=tall), ref)
    assert torch.equal(cpu_kernels.gemm_bf16w(x, w, tall=tall), ref.to(torch.bfloat16))


@needs_bf16_widen
@pytest.mark.parametrize("tall", [False, True], ids=["rows", "tall"])
def test_gemm_bf16w_takes_strided_operands_writes_column_blocks_and_ragged_rows(tall):
    g = torch.Generator().manual_seed(8)
    wide, xs = (torch.randn(r, 600, generator=g).to(torch.bfloat16) for r in (96, 64))
    w, x = wide[:, 192:576], xs[::2, 192:576]  # W: a column block of a wider matrix; x: strided rows
    y = torch.full((32, 200), 5.0, dtype=torch.bfloat16)
    out = cpu_kernels.gemm_bf16w(x, w, out=y[:, 50:146], tall=tall)
    assert torch.equal(out, cpu_kernels.gemm_f32(x.float(), w.float(), tall=tall).to(torch.bfloat16))
    assert (y[:, :50] == 5).all() and (y[:, 146:] == 5).all()  # nothing outside the block is written
    row_k = [384] * 10 + [200] * 11 + [8] * 11  # a mixed head: rows widest first, their other columns zero
    xz = x.clone()
    for m, kk in enumerate(row_k):
        xz[m, kk:] = 0
    assert torch.equal(cpu_kernels.gemm_bf16w(xz, w, out=torch.empty(32, 96), row_k=row_k, tall=tall),
                       cpu_kernels.gemm_f32(xz.float(), w.float(), row_k=row_k, tall=tall))
    with pytest.raises(ValueError):
        cpu_kernels.gemm_bf16w(xz, w, row_k=row_k[::-1])
    with pytest.raises(ValueError):
        cpu_kernels.gemm_bf16w(xz, w, out=torch.empty(32, 96, dtype=torch.float16))


@needs_bf16_widen
def test_bf16_products_route_to_the_widening_kernel_at_every_row_count():
    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(40, 96, generator=g).to(torch.bfloat16), torch.randn(70, 96, generator=g).to(torch.bfloat16)
    for m in (1, 2, 9, cpu_kernels.BF16_TALL_ROWS, 70):
        assert cpu_kernels.rows_kernel(x[:m], w) == "widen"
        from colm_runtime.model.layers import linear_rows

        y = linear_rows(x[:m], w)
        assert y.dtype == torch.bfloat16  # rounded once, from fp32 sums, as the other bf16 kernels round
        assert torch.equal(y, cpu_kernels.gemm_f32(x[:m].float(), w.float()).to(torch.bfloat16))
    assert cpu_kernels.rows_kernel(x[:4], w.T.contiguous().T) is None  # W's rows not contiguous: ATen


@needs_bf16_widen
def test_bf16_chain_layers_and_heads_on_the_widening_kernel_equal_aten(monkeypatch):
    """A bf16 model of three chains: its ChainLinear, mixed-chain head (row_k), uniform heads and the
    one-chain head's contiguous copy through gemm_bf16w, against the same model on ATen's products."""
    from colm_runtime.testing import random_model, small_config

    model = random_model(small_config(chains=(2, 3, 2), head_dim=8, vocab_size=300)).to(torch.bfloat16)
    model.column_major_head()
    assert model.head_weight.stride(1) == 1  # row-major: the kernel reads W's rows where they lie
    rows = [40, 27, 10]
    h = torch.randn(rows[0], model.cfg.dim, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    lin = model.layers[0].ffn.gate_up

    def run():
        with torch.inference_mode():
            return lin(h, 3, rows), model.logits(h, 3, rows), model.logits(h, 2), model.logits(h, 1)

    got = run()
    assert model._head0 is not None and model._head0[1].dtype == torch.bfloat16
    monkeypatch.setattr(cpu_kernels, "rows_kernel", lambda x, w: None)
    ref = run()
    for a, b in zip(got, ref):  # each rounded once to bf16 from fp32 sums in another order
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.skipif(not cpu_kernels.has_f32_rows(), reason="fp32 decode products stay on MKL on this CPU")
@pytest.mark.parametrize("rows", [[9, 6, 2], [40, 27, 10]], ids=["few", "tall"])
def test_fp32_chain_layers_and_mixed_head_on_the_kernel_equal_the_torch_path(monkeypatch, rows):
    """ChainLinear into column blocks (rows a chain skips stay zero) and the mixed-chain head (one product,
    the columns a row does not use zeroed, each group of rows stopping at its width) through gemm_f32, against the same model with the kernel routed
    off (ATen: each chain's slice accumulated on its own rows)."""
    from colm_runtime.testing import random_model, small_config

    model = random_model(small_config(chains=(2, 3, 2), head_dim=8, vocab_size=300))
    assert model.head_weight.stride(1) == 1  # fp32 head kept row-major for the kernel
    # a mixed batch: rows[0] rows use chain 1, rows[1] chain 2, rows[2] chain 3 (the head: ragged rows)
    h = torch.randn(rows[0], model.cfg.dim, generator=torch.Generator().manual_seed(3))
    lin = model.layers[0].ffn.gate_up
    def run():
        with torch.inference_mode():  # ChainLinear writes into column blocks at inference only
            return lin(h, 3, rows), model.logits(h, 3, rows), model.logits(h, 2)

    got = run()
    monkeypatch.setattr(cpu_kernels, "f32_rows_ok", lambda x, w: False)
    ref = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (got[0][rows[2]:, lin.out_offsets[2]:] == 0).all()


@pytest.mark.skipif(not cpu_kernels.has_f32_rows(), reason="fp32 decode products stay on MKL on this CPU")
@pytest.mark.parametrize("n", [1, 9], ids=["few", "tall"])
def test_one_chain_logits_read_a_copy_of_the_heads_first_chain_that_follows_the_head(n):
    """One-chain fp32 logits of a model of several chains read a contiguous copy of the head's first
    chain's columns: the same bits as the strided prefix of the head itself, and the copy is made again
    when the head changes in place or moves (a stale copy would serve the old weights)."""
    from colm_runtime.testing import random_model, small_config

    model = random_model(small_config(chains=(2, 3, 2), head_dim=8, vocab_size=300))
    W, w0 = model.head_weight, model.norm.offsets[1]
    h = torch.randn(n, model.cfg.dim, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = model.logits(h, 1)
    assert model._head0 is not None and model._head0[1].is_contiguous()
    assert torch.equal(got, cpu_kernels.gemm_f32(h[:, :w0], W[:, :w0]))
    with torch.no_grad():
        W[:, :w0] *= 2  # in place: same address, new version
    with torch.inference_mode():
        assert torch.equal(model.logits(h, 1), cpu_kernels.gemm_f32(h[:, :w0], W[:, :w0]))
    model.to(torch.float64)
    assert model._head0 is None  # dropped on a move; a float64 head has no copy
    with torch.inference_mode():
        W = model.head_weight
        torch.testing.assert_close(model.logits(h.double(), 1), (h.double()[:, :w0] @ W[:, :w0].t()).float())
    assert model._head0 is None
    one = random_model(small_config(chains=(2,), head_dim=8, vocab_size=300))
    with torch.inference_mode():
        one.logits(h[:, : one.cfg.dim], 1)
    assert one._head0 is None  # one chain: the head's columns are contiguous already


def test_sample_rows_never_draws_a_token_of_probability_zero_whatever_the_uniform():
    # Mass in the first and last chunks of 256 only (a partial last chunk: V = 1000), masked tokens in
    # between and at both ends; uniforms at 0, just below 1 and in between.
    V = 1000
    row = torch.full((V,), float("-inf"))
    row[1:200:3] = torch.randn(67, generator=torch.Generator().manual_seed(0))
    row[900:-1] = torch.randn(99, generator=torch.Generator().manual_seed(1))
    u = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5, 1e-300, *torch.rand(60, dtype=torch.float64).tolist()], dtype=torch.float64)
    ids = cpu_kernels.sample_rows(row.expand(len(u), V), [0.8] * len(u), u)  # row stride 0
    assert torch.isfinite(row[ids]).all(), ids
    assert ids[0] == 1 and ids[1] == V - 2  # u = 0 takes the first token of mass, u -> 1 the last


def test_sample_rows_follows_the_softmax_at_its_temperature():
    g = torch.Generator().manual_seed(2)
    V, n = 700, 60000
    logits = torch.randn(V, generator=g) * 2
    ids = cpu_kernels.sample_rows(logits.expand(n, V), [0.7] * n, torch.rand(n, generator=g, dtype=torch.float64))
    expected = (logits / 0.7).softmax(-1).double() * n
    counts = torch.bincount(ids, minlength=V).double()
    assert ((counts - expected) ** 2 / expected).sum() < V + 5 * (2 * V) ** 0.5  # chi-square


def test_sample_rows_reads_strided_rows_and_flags_rows_without_mass():
    V = 300
    wide = torch.randn(4, 2 * V)
    x = wide[:, :V]  # row stride 2V
    x[1] = float("-inf")
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    u = torch.full((4,), 0.3, dtype=torch.float64)
    ids = cpu_kernels.sample_rows(x, [1.0] * 4, u)
    assert ids[1:].tolist() == [-1, -1, -1] and 0 <= ids[0] < V
    assert ids[0] == cpu_kernels.sample_rows(x[:1].contiguous(), [1.0], u[:1])[0]
    # an overflowing temperature is flagged too; sample() then takes the torch path for that row
    assert cpu_kernels.sample_rows(x[:1], [1e-38], u[:1]).tolist() == [-1]


@pytest.mark.parametrize("top_k,top_p,min_p", [(50, 1.0, 0.0), (0, 0.8, 0.0), (300, 0.5, 0.0), (0, 1.0, 0.05),
                                               (40, 0.9, 0.1), (2, 0.01, 0.0), (10**6, 0.999, 0.0), (0, 5e-324, 0.0),
                                               (3, 1e-30, 0.5)])  # 5e-324: 0 in the kernel's float32 (a fuzzed 500)
def test_sample_rows_cuts_top_k_top_p_min_p_as_the_torch_path(top_k, top_p, min_p):
    # A grid of uniforms maps onto the CDF: each token's share of the draws is its probability to within
    # a grid step, so the kernel's distribution (histogram select, one bucket sorted) must equal
    # processed_probs' (a full sort), token for token.
    from colm_runtime.engine.sampler import processed_probs
    from colm_runtime.engine.types import SamplingParams

    V, n = 3000, 50_000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(top_k + int(top_p * 100))) * 3
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = processed_probs(logits[None], [params])[0].double()
    probs /= probs.sum()
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ids = cpu_kernels.sample_rows(logits.expand(n, V), [0.8] * n, u, [top_k] * n, [top_p] * n, [min_p] * n)  # row stride 0
    share = torch.bincount(ids, minlength=V).double() / n
    drawn, support = set(ids.unique().tolist()), set(probs.nonzero()[:, 0].tolist())
    assert drawn <= support and {j for j in support if probs[j] >= 2 / n} <= drawn
    assert (share - probs).abs().max() < 2 / n


def test_releasing_a_threads_openmp_pool_keeps_later_parallel_work_correct():
    # AsyncEngine.start releases the loading thread's pool; a later parallel region there (a test, a
    # second engine) starts a new one and computes the same.
    x = torch.randn(64, 4096)
    before = x.exp().sum(dim=1)
    assert cpu_kernels.release_thread_pool()
    torch.testing.assert_close(x.exp().sum(dim=1), before, rtol=0, atol=0)
    q, k, v, idx, lens = paged_case(16, 9, 3, 64, 16, torch.float32, seed=3)
    first = cpu_kernels.paged_decode(q, k, v, idx, lens, int(lens.max()))
    assert cpu_kernels.release_thread_pool()
    assert torch.equal(cpu_kernels.paged_decode(q, k, v, idx, lens, int(lens.max())), first)
