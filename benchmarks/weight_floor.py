"""The weight-read floor of a decode step, side by side with the steps themselves: one streaming pass over
every weight of a model (what any decode step with at least one row at every chain must read, since
each chain's weights serve the rows that use it), and the decode steps at all chains, at one chain and
at the equal mix, interleaved round by round. A mixed batch reads as many weight bytes as a full one,
so where the floor is a large share of the full step, the mix's time cannot follow its FLOP share.

  python benchmarks/weight_floor.py                           # the random three-chain SmolLM2 shape, fp32
  python benchmarks/weight_floor.py --batch 8 --dtype bfloat16
"""
import argparse
import statistics
import time

import torch

from colm_runtime.bench.model import DecodeStep, equal_mix, random_model

ap = argparse.ArgumentParser()
ap.add_argument("--random", default="smollm2-3chain", help="a random model of this shape (colm bench model --random)")
ap.add_argument("--dtype", default="float32")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--context", type=int, default=128)
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
m = random_model(a.random, "cpu", getattr(torch, a.dtype))
params = [p.detach() for p in m.parameters()]
nbytes = sum(p.numel() * p.element_size() for p in params)


def read_all() -> None:
    for p in params:
        p.sum()


n = m.cfg.n_chains
fns = {"read every weight": read_all,
       **{name: DecodeStep(m, c, a.batch, a.context) for name, c in (
           (f"{n} chains", n), ("equal mix", equal_mix(n, a.batch)), ("1 chain", 1))}}
for f in fns.values():
    f(), f()
t = {k: [] for k in fns}
for _ in range(a.rounds):
    for k, f in fns.items():
        start = time.perf_counter()
        f()
        t[k].append(time.perf_counter() - start)
ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
full = ms[f"{n} chains"]
print(f"{a.random}, {a.dtype}, batch {a.batch}: weights {nbytes / 1e6:.0f} MB")
for k, v in ms.items():
    extra = f" ({nbytes / v / 1e6:.1f} GB/s)" if k == "read every weight" else ""
    print(f"  {k}: {v:.1f} ms, {v / full:.3f} of the {n}-chain step{extra}")
