"""Where a decode step's time goes, part by part, at all chains, at the equal mix and at one chain: the
step whose layers run in one C call (csrc/layers_cpu.c, fp32 or bf16) built with -DCOLM_LAYER_TIMING, so every
part of every layer adds its wall time (norms, the four Chain-of-Linear maps, rope + K/V store,
attention, SwiGLU and residual adds). What is left of the step is outside the layers: the embedding, the
final norm, the LM head and the Python around them. Each part's time is also given as a share of the
all-chain step's same part, beside that part's FLOP share (a map: the chain blocks its rows use;
attention: the chains its rows attend with).

  python benchmarks/layer_parts.py                       # random three-chain SmolLM2 shape, batch 32
  python benchmarks/layer_parts.py --batch 8 --rounds 20
  python benchmarks/layer_parts.py --dtype bfloat16

Needs a CPU where the one-call layers run (AVX2 + FMA without AVX-512) and gcc; the timing build is
cached beside the normal one (another compile flag, another file).
"""
import argparse
import ctypes
import time

import torch

from colm_runtime.model import cpu_kernels

PARTS = ["norm", "qkv", "rope", "attn", "o", "gate_up", "swiglu+add", "down"]
MAPS = {"qkv", "o", "gate_up", "down"}

ap = argparse.ArgumentParser()
ap.add_argument("--random", default="smollm2-3chain", help="a random model of this shape (colm bench model --random)")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--context", type=int, default=128)
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
a = ap.parse_args()

cpu_kernels.COMPILE_FLAGS = [*cpu_kernels.COMPILE_FLAGS, "-DCOLM_LAYER_TIMING"]  # before the first library() call
lib = cpu_kernels.library()
if lib is None or not hasattr(lib, "layer_parts"):
    raise SystemExit("the CPU kernels did not build here")
lib.layer_parts.argtypes = [ctypes.c_void_p]

from colm_runtime.bench.model import DecodeStep, equal_mix, random_model  # noqa: E402

torch.set_num_threads(a.threads)
model = random_model(a.random, "cpu", getattr(torch, a.dtype))
n = model.cfg.n_chains
buf = (ctypes.c_double * len(PARTS))()
all_chains = f"{n} chains"
runs = {all_chains: [n] * a.batch, "equal mix": equal_mix(n, a.batch), "1 chain": [1] * a.batch}
steps = {name: DecodeStep(model, ks, a.batch, a.context) for name, ks in runs.items()}
lib.layer_parts(buf)
for step in steps.values():
    step()
lib.layer_parts(buf)
if sum(buf) == 0:
    raise SystemExit("this step does not run its layers in one C call here (needs AVX2 + FMA without AVX-512)")

totals = {name: [0.0] * (len(PARTS) + 1) for name in steps}
for _ in range(a.rounds):  # interleaved: round by round, every step once
    for name, step in steps.items():
        lib.layer_parts(buf)
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        lib.layer_parts(buf)
        for i in range(len(PARTS)):
            totals[name][i] += buf[i]
        totals[name][-1] += dt


def flop_share(ks: list[int], part: str) -> float:
    if part in MAPS:  # chain j's output block reads chains 1..j: k chains use k(k+1)/2 of n(n+1)/2 blocks
        return sum(k * (k + 1) for k in ks) / (len(ks) * n * (n + 1))
    return sum(ks) / (len(ks) * n)


ms = {name: [v / a.rounds * 1000 for v in t] for name, t in totals.items()}
full = ms[all_chains]
print(f"{a.random}, {a.dtype}, batch {a.batch}, context {a.context}, {a.rounds} rounds; ms per step "
      f"(share of the {n}-chain step's part / FLOP share)")
for name, t in ms.items():
    layers = sum(t[:-1])
    cells = []
    for i, part in enumerate(PARTS):
        share = ""
        if name != all_chains and full[i]:
            share = f" ({t[i] / full[i]:.2f}/{flop_share(runs[name], part):.2f})"
        cells.append(f"{part} {t[i]:.3g}{share}")
    print(f"{name}: step {t[-1]:.1f} ms ({t[-1] / full[-1]:.3f}), layers {layers:.1f}, outside {t[-1] - layers:.1f}")
    print("   " + ", ".join(cells))
