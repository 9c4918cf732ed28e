"""One Chain-of-Linear map of a decode step (csrc/gemm_f32.c chain_gemm_f32, as the one-call layers run it)
at all chains, at the equal mix's rows, and each part of the mix alone: is a mixed batch's map the sum of
its chains' products, or do they overlap? Every layer's weights of the random model are walked in turn,
so W comes from memory as in a step (30 layers of SmolLM2's shape do not fit in any cache).

  python benchmarks/chain_map_parts.py                   # gate_up of the three-chain SmolLM2 shape, batch 32
  python benchmarks/chain_map_parts.py --map down --rounds 20
  python benchmarks/chain_map_parts.py --hot             # W from the L3 cache: what is left without the reads

Prints ms per layer, median over rounds, the cases interleaved in each round. Needs a CPU where gemm_f32
runs (AVX2 + FMA without AVX-512) and gcc.
"""
import argparse
import ctypes
import statistics
import time

import torch

from colm_runtime.bench.model import equal_mix, random_model
from colm_runtime.model import cpu_kernels

ap = argparse.ArgumentParser()
ap.add_argument("--random", default="smollm2-3chain", help="a random model of this shape (colm bench model --random)")
ap.add_argument("--map", default="gate_up", choices=["qkv", "o", "gate_up", "down"])
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--rounds", type=int, default=15)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--hot", action="store_true", help="walk the first 3 layers' weights 10 times instead of all 30 "
                                                   "once, so W comes from the L3 cache (where it fits)")
a = ap.parse_args()

if not cpu_kernels.has_f32_rows():
    raise SystemExit("chain_gemm_f32 runs on AVX2 CPUs without AVX-512 only")
torch.set_num_threads(a.threads)
lib = cpu_kernels.library()
lib.chain_gemm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
model = random_model(a.random, "cpu", torch.float32)
n = model.cfg.n_chains
maps = [getattr(blk.attn if a.map in ("qkv", "o") else blk.ffn, a.map) for blk in model.layers]
# per layer and chain: weight address, bias (none), out rows, in width, row stride (layers_cpu.c's table)
tables = [torch.tensor([[lin.weight.data_ptr(), 0, *lin.weight.shape, lin.weight.stride(0)] for lin in cl._lins],
                       dtype=torch.int64) for cl in maps]
if a.hot:
    tables = tables[:3] * 10
x = torch.randn(a.batch, maps[0].in_offsets[n])
y = torch.zeros(a.batch, maps[0].out_offsets[n])
mix = equal_mix(n, a.batch)
mix_rows = [sum(c > j for c in mix) for j in range(n)]  # rows using chain j: every row with more than j chains


def run(rows: list[int], first: int) -> float:
    """chains first..first+len(rows)-1 at these rows, every layer once: ms per layer."""
    r = torch.tensor(rows, dtype=torch.int64)
    col = maps[0].out_offsets[first]
    t0 = time.perf_counter()
    for tab in tables:
        sub = tab[first:first + len(rows)].contiguous()
        rc = lib.chain_gemm_f32(x.data_ptr(), x.stride(0), sub.data_ptr(), len(rows), r.data_ptr(),
                                cpu_kernels.F32_TALL_ROWS, y[:, col:].data_ptr(), y.stride(0), a.threads)
        assert rc == 0
    return (time.perf_counter() - t0) * 1e3 / len(tables)


top = mix_rows[-1]
cases = {f"all {n} chains, {a.batch} rows each": ([a.batch] * n, 0),
         f"equal mix, rows per chain {mix_rows}": (mix_rows, 0),
         f"  its chains 1-{n - 1} alone": (mix_rows[:-1], 0),
         f"  its chain {n} alone ({top} rows)": ([top], n - 1),
         f"chain {n} alone at {-(-top // 8) * 8} rows (its lanes)": ([-(-top // 8) * 8], n - 1),
         f"chain {n} alone at {a.batch} rows": ([a.batch], n - 1)}
times = {k: [] for k in cases}
for _ in range(a.rounds):
    for k, (rows, first) in cases.items():
        times[k].append(run(rows, first))
med = {k: statistics.median(v) for k, v in times.items()}
print(f"{a.random}, {a.map}, batch {a.batch}, {a.threads} threads, {len(tables)} layers walked"
      f"{' (3 layers, 10 times: W in L3)' if a.hot else ''}; ms per layer:")
for k, v in med.items():
    print(f"  {k:45s} {v:7.3f}")
keys = list(med)
print(f"mix / all: {med[keys[1]] / med[keys[0]]:.3f}; mix / (its parts alone): {med[keys[1]] / (med[keys[2]] + med[keys[3]]):.3f}")
