"""fp32 products of SmolLM2's shapes: our kernels (csrc/gemm_f32.c) against ATen's (MKL's sgemm), or
against the kernels of another commit (--before), calls interleaved so machine noise hits both alike,
every weight cold (a pool of ~300 MB of distinct weights is cycled, as a decode step reads every weight
once). Prints each side's median and ours / theirs speed.

  python benchmarks/gemm_f32_ab.py                 # rows 1 4 8 16 32 64 128
  python benchmarks/gemm_f32_ab.py --rows 1 32 --threads 1
  python benchmarks/gemm_f32_ab.py --before HEAD~1 --rows 21 32 128   # this tree's kernels against HEAD~1's
  python benchmarks/gemm_f32_ab.py --routes --rows 8 10 12 13 15      # gemm_f32_tall against gemm_f32

Needs a CPU with AVX2 and FMA (the kernels refuse to run otherwise).
"""
import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from colm_runtime.model import cpu_kernels

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--rounds", type=int, default=40)
ap.add_argument("--before", default=None, help="a git revision: its csrc/gemm_f32.c against this tree's, both "
                                               "built here with the same flags, instead of ATen against ours")
ap.add_argument("--routes", action="store_true", help="gemm_f32_tall against gemm_f32 at the same rows (where "
                                                     "F32_TALL_ROWS should be)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
lib = cpu_kernels.library()
assert lib is not None and lib.has_f32, "no AVX2/FMA kernel on this CPU"
SRC = Path(cpu_kernels.__file__).with_name("csrc") / "gemm_f32.c"


def build(source: str, tmp: str, name: str):
    """gemm_f32.c's two entry points, called raw (no Python wrapper on either side). Their 11th argument
    is row_k (a pointer) here and `int accumulate` in older commits: a zero of 8 bytes passes as both."""
    c, so = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
    c.write_text(source)
    subprocess.run(["gcc", *cpu_kernels.COMPILE_FLAGS, f"-I{SRC.parent}", "-shared", str(c), "-o", str(so)],
                   check=True)  # -I: the headers gemm_f32.c includes (bf16.h) stay beside this tree's source
    dll = ctypes.CDLL(str(so))
    for fn in (dll.gemm_f32, dll.gemm_f32_tall):
        fn.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        (m, k), n = x.shape, w.shape[0]
        y = torch.empty(m, n)
        fn = dll.gemm_f32_tall if m >= cpu_kernels.F32_TALL_ROWS else dll.gemm_f32
        assert fn(x.data_ptr(), m, x.stride(0), w.data_ptr(), n, k, w.stride(0), y.data_ptr(), n, None, 0,
                  a.threads) == 0
        return y
    return run


tmp = tempfile.TemporaryDirectory()
if a.before:
    old = subprocess.run(["git", "show", f"{a.before}:colm_runtime/model/csrc/gemm_f32.c"], capture_output=True,
                         text=True, check=True, cwd=SRC.parent).stdout
    sides = {"before": build(old, tmp.name, "before"), "ours": build(SRC.read_text(), tmp.name, "ours")}
elif a.routes:  # "ours": the tall kernel
    sides = {"rows": lambda x, w: cpu_kernels.gemm_f32(x, w, tall=False),
             "ours": lambda x, w: cpu_kernels.gemm_f32(x, w, tall=True)}
else:
    sides = {"aten": lambda x, w: torch.mm(x, w.T), "ours": cpu_kernels.gemm_f32}
theirs = next(iter(sides))

# head1: the first chain's columns (192 of 576, rows strided) of a three-chain model's head
SHAPES = {"qkv": (960, 576, 576), "o": (576, 576, 576), "gate_up": (3072, 576, 576), "down": (576, 1536, 1536),
          "head": (49152, 576, 576), "head1": (49152, 192, 576)}
for name, (n, k, ld) in SHAPES.items():
    pool = [torch.randn(n, ld)[:, :k] for _ in range(max(2, 300_000_000 // (n * ld * 4)))]
    for m in a.rows:
        x = torch.randn(m, k)
        for run in sides.values():
            torch.testing.assert_close(run(x, pool[0]), x @ pool[0].T, rtol=1e-4, atol=1e-3)
        times = {s: [] for s in sides}
        for r in range(a.rounds):
            for side, run in sides.items():
                w = pool[(2 * r + (side == "ours")) % len(pool)]
                t = time.perf_counter()
                run(x, w)
                times[side].append(time.perf_counter() - t)
        th, ours = (statistics.median(times[s]) for s in (theirs, "ours"))
        print(f"{name:8s} [{n} x {k}] rows {m:4d}: {theirs} {th * 1e6:8.0f} us, ours {ours * 1e6:8.0f} us "
              f"({2 * m * n * k / ours / 1e9:5.1f} GFLOP/s, {n * k * 4 / ours / 1e9:5.1f} GB/s of W), "
              f"ours/{theirs} {th / ours:.2f}x")
