"""fp32 products of SmolLM2's shapes: our kernels (csrc/gemm_f32.c) against ATen's (MKL's sgemm), calls
interleaved so machine noise hits both alike, every weight cold (a pool of ~300 MB of distinct weights
is cycled, as a decode step reads every weight once). Prints each side's median and ours / ATen's speed.

  python benchmarks/gemm_f32_ab.py                 # rows 1 4 8 16 32 64 128
  python benchmarks/gemm_f32_ab.py --rows 1 32 --threads 1

Needs a CPU with AVX2 and FMA (the kernels refuse to run otherwise).
"""
import argparse
import statistics
import time

import torch

from colm_runtime.model import cpu_kernels

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--rounds", type=int, default=40)
a = ap.parse_args()
torch.set_num_threads(a.threads)
lib = cpu_kernels.library()
assert lib is not None and lib.has_f32, "no AVX2/FMA kernel on this CPU"

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
for name, (n, k) in SHAPES.items():
    pool = [torch.randn(n, k) for _ in range(max(2, 300_000_000 // (n * k * 4)))]
    for m in a.rows:
        x = torch.randn(m, k)
        torch.testing.assert_close(cpu_kernels.gemm_f32(x, pool[0]), x @ pool[0].T, rtol=1e-4, atol=1e-3)
        times = {"aten": [], "ours": []}
        for r in range(a.rounds):
            for side in times:
                w = pool[(2 * r + (side == "ours")) % len(pool)]
                t = time.perf_counter()
                torch.mm(x, w.T) if side == "aten" else cpu_kernels.gemm_f32(x, w)
                times[side].append(time.perf_counter() - t)
        aten, ours = (statistics.median(times[s]) for s in ("aten", "ours"))
        print(f"{name:8s} [{n} x {k}] rows {m:4d}: ATen {aten * 1e6:8.0f} us, ours {ours * 1e6:8.0f} us "
              f"({2 * m * n * k / ours / 1e9:5.1f} GFLOP/s, {n * k * 4 / ours / 1e9:5.1f} GB/s of W), "
              f"ours/ATen {aten / ours:.2f}x")
