"""The C kernels (colm_runtime/model/cpu_kernels.py, csrc/): decode attention against the
torch path it replaces (gather the paged blocks, SDPA over the copy), and its own properties: a pair's
output does not depend on the batch or the thread count; with COLM_CPU_KERNELS=0, or no compiler, the
torch path serves the same tokens. The bf16 product of a few rows (gemv_bf16) against an fp32 product of
the same bf16 values."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
def test_kernel_equals_gather_and_sdpa(dtype, tol, q_heads, kv_heads, hd, bs):
    # With AVX-512, groups of 1-8 query heads take code specialised for their size (head_dim 64 and 128
    # apart, other head sizes with a masked last vector); 10 takes the portable path.
    q, k, v, idx, lens = paged_case(7, q_heads, kv_heads, hd, bs, dtype)
    assert cpu_kernels.supports(q, k)
    got = cpu_kernels.paged_decode(q, k, v, idx, lens, int(lens.max()))
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), torch_path(q, k, v, idx, lens), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_pair_does_not_depend_on_its_batch_or_the_thread_count(dtype):
    q, k, v, idx, lens = paged_case(16, 9, 3, 64, 16, dtype, seed=1)
    batched = cpu_kernels.paged_decode(q, k, v, idx, lens, int(lens.max()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for i in (0, 5, 15):
            alone = cpu_kernels.paged_decode(q[i : i + 1], k, v, idx[i : i + 1], lens[i : i + 1], int(lens[i]))
            assert torch.equal(alone[0], batched[i])
    finally:
        torch.set_num_threads(threads)


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
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    assert cpu_kernels.gemv_ok(x, w)
    torch.testing.assert_close(cpu_kernels.gemv_bf16(x, w, torch.float32), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_kernels.gemv_bf16(x, w).float(), ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


@needs_bf16_dot
def test_gemv_takes_strided_rows_and_refuses_what_it_cannot_do():
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(64, 300, generator=g).to(torch.bfloat16)
    xs = torch.randn(6, 300, generator=g).to(torch.bfloat16)
    w, x = wide[:, :200], xs[::2, :200]  # a column prefix of W (the mixed head's slices), every other x row
    torch.testing.assert_close(cpu_kernels.gemv_bf16(x, w, torch.float32), x.float() @ w.float().T, rtol=1e-5, atol=1e-4)
    assert not cpu_kernels.gemv_ok(torch.zeros(9, 200, dtype=torch.bfloat16), w)  # more rows than it takes
    assert not cpu_kernels.gemv_ok(x.float(), w.float())  # fp32: MKL's path
    assert not cpu_kernels.gemv_ok(x, wide.T[:, :300])  # columns of W not contiguous


@pytest.mark.parametrize("chains,c", [(1, 576), (3, 64), (2, 40)])
def test_rms_norm_kernel_rounds_as_the_torch_path(chains, c):
    # The torch path (ChainRMSNorm._norm in bf16): the normalised x is cast to bf16, then the weight
    # multiplies it. The kernel's fp32 sum runs in another order, so a value may land one bf16 step away.
    g = torch.Generator().manual_seed(c)
    wide = (torch.randn(17, chains * c + 8, generator=g) * 3).to(torch.bfloat16)
    x = wide[:, : chains * c]  # a column prefix, as ChainRMSNorm takes x[..., :width]
    w = (1 + torch.randn(chains * c, generator=g) * 0.1).to(torch.bfloat16)
    assert cpu_kernels.rms_norm_ok(x, w)
    got = cpu_kernels.rms_norm_bf16(x, w, c, 1e-5)
    ref = (F.rms_norm(x.unflatten(-1, (chains, c)), (c,), eps=1e-5) * w.view(chains, c)).flatten(-2)
    step = ref.float().abs().clamp_min(1e-30) * 2 ** -7  # one bf16 step (8 significant bits) or less
    assert ((got.float() - ref.float()).abs() <= step).all()
    assert (got == ref).float().mean() > 0.97  # nearly all bitwise equal
