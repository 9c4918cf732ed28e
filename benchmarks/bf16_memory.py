"""Resident memory of the model step over many distinct batch shapes (oneDNN keeps a kernel per matmul
shape in bf16; linear_rows buckets the row counts and CoLMModel.warm_kernels builds them up front).
Runs STEPS random steps (mixed chain counts, decode rows and prefill chunks, up to ~4000 rows) of
colm-tiny (or a random model of its shape) in DTYPE on one thread and prints the RSS growth after
the first 20 steps.

  python benchmarks/bf16_memory.py bfloat16 400            # warm_kernels first (as the engine does)
  python benchmarks/bf16_memory.py bfloat16 400 --no-warm  # kernels built as shapes come
"""
import argparse
import random
import time

import torch

from colm_runtime.bench.model import load_or_random
from colm_runtime.model import ChainKVCache, ForwardBatch, SeqSpec

ap = argparse.ArgumentParser()
ap.add_argument("dtype")
ap.add_argument("steps", type=int)
ap.add_argument("--no-warm", action="store_true")
a = ap.parse_args()
torch.set_num_threads(1)


def rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


model, source = load_or_random(None, "cpu", getattr(torch, a.dtype))
cfg = model.cfg
if not a.no_warm:
    t0, r0 = time.perf_counter(), rss_mib()
    n = model.warm_kernels(4096, 64)
    print(f"{source}: warm_kernels ran {n} products in {time.perf_counter() - t0:.2f} s, +{rss_mib() - r0:.0f} MiB")
cache = ChainKVCache(cfg, [4096] * cfg.n_kv_pools, 16, getattr(torch, a.dtype))
rng = random.Random(0)
base = None
for it in range(a.steps):
    specs = []
    for b in range(rng.randrange(1, 64)):
        q = rng.choice([1, 1, 1, rng.randrange(2, 60)])
        ctx, k = rng.randrange(0, 100), rng.randrange(1, cfg.n_chains + 1)
        specs.append(SeqSpec([5] * q, ctx, k, [list(range(b * 8, b * 8 + -(-(ctx + q) // 16)))] * cfg.pools_for(k)))
    model.forward_step(ForwardBatch.build(cfg, specs, 16), cache)
    if it == 20:
        base = rss_mib()
print(f"RSS growth after the first 20 steps: {rss_mib() - base:.0f} MiB over {a.steps - 20} steps")
