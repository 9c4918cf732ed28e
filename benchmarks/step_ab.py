"""A/B of one decode step (`forward_step`, 128 cached tokens per sequence, or --context) between a clone of
another commit ("before") and this tree ("after"), interleaved round by round in one process so machine noise
hits both alike. Prints the median of each side and before/after (> 1: this tree is faster).

  git clone -q . /tmp/before-14 && git -C /tmp/before-14 checkout -q <before-commit>
  python benchmarks/step_ab.py bfloat16 1 32 --threads 1                          # same dtype both sides
  python benchmarks/step_ab.py bfloat16 1 32 --before-dtype float32 --threads 1   # main's fp32 vs our bf16
  python benchmarks/step_ab.py bfloat16 32 --random smollm2-3chain --chains mix   # a mixed batch
  python benchmarks/step_ab.py float32 128 512 --prefill   # one fresh prompt of 128, then 512 tokens
  python benchmarks/step_ab.py float32 32 --before-loop    # this tree: layers in one C call vs the Python loop
  python benchmarks/step_ab.py float32 8 32 --context 512  # longer contexts: attention's share grows
"""
import argparse
import os
import statistics
import sys
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("dtype")
ap.add_argument("batch", type=int, nargs="+")
ap.add_argument("--model", default="/work/peers/smollm2-colm")
ap.add_argument("--random", default=None, help="a random model of this shape (colm bench model --random)")
ap.add_argument("--rounds", type=int, default=12)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--context", type=int, default=128, help="cached tokens per sequence of a decode step")
ap.add_argument("--chains", default="1", help="chain count of every row, or 'mix' (equal split over 1..n)")
ap.add_argument("--before", default="/tmp/before-14", help="checkout of the 'before' commit")
ap.add_argument("--before-dtype", default=None, help="dtype of the 'before' side (default: DTYPE)")
ap.add_argument("--prefill", action="store_true", help="time the prefill step of one fresh prompt of BATCH tokens "
                                                      "instead (its logits: the last token's)")
ap.add_argument("--before-loop", action="store_true", help="the 'before' side is this tree with every layer run by "
                                                          "forward_step's Python loop (no layers_step call)")
a = ap.parse_args()
torch.set_num_threads(a.threads)


def steps(root: str, dtype: torch.dtype, loop: bool = False) -> dict:
    """DecodeSteps of `root`'s code: its colm_runtime modules are imported afresh from root."""
    for k in [m for m in sys.modules if m.startswith("colm_runtime")]:
        del sys.modules[k]
    sys.path.insert(0, root)
    from colm_runtime.bench.model import DecodeStep, equal_mix, random_model
    from colm_runtime.checkpoint import load_model

    m = random_model(a.random, "cpu", dtype) if a.random else load_model(a.model, "cpu", dtype)
    sys.path.pop(0)
    if loop:
        m._layers_in_c = lambda *args: False
    if a.prefill:
        return {b: prefill_step(m, b) for b in a.batch}
    return {b: DecodeStep(m, equal_mix(m.cfg.n_chains, b) if a.chains == "mix" else int(a.chains), b, a.context)
            for b in a.batch}


def prefill_step(model, n: int):
    """One prompt of n tokens from an empty cache, at --chains chains (with the modules of the side
    that loaded `model`)."""
    batch_mod, cache_mod = sys.modules["colm_runtime.model.batch"], sys.modules["colm_runtime.model.kv_cache"]
    cfg, bs, k = model.cfg, 16, int(a.chains)
    nb = -(-n // bs)
    cache = cache_mod.ChainKVCache(cfg, [nb] * cfg.n_kv_pools, bs, model.embed.weight.dtype, "cpu")
    spec = batch_mod.SeqSpec([100 + i % 1000 for i in range(n)], 0, k, [list(range(nb))] * cfg.pools_for(k))
    batch = batch_mod.ForwardBatch.build(cfg, [spec], bs, "cpu")
    return lambda: model.forward_step(batch, cache)


sides = {"before": steps(os.getcwd() if a.before_loop else a.before, getattr(torch, a.before_dtype or a.dtype),
                        a.before_loop),
         "after": steps(os.getcwd(), getattr(torch, a.dtype))}
for side in sides.values():
    for f in side.values():
        f(), f()
t = {(s, b): [] for s in sides for b in a.batch}
for _ in range(a.rounds):
    for b in a.batch:
        for s, side in sides.items():
            start = time.perf_counter()
            side[b]()
            t[s, b].append(time.perf_counter() - start)
for b in a.batch:
    bm, am = statistics.median(t["before", b]), statistics.median(t["after", b])
    what = f"prefill of {b} tokens" if a.prefill else f"batch {b}, context {a.context}"
    print(f"{a.before_dtype or a.dtype} -> {a.dtype}, {what}, chains {a.chains}: before {bm * 1e3:.1f} ms, "
          f"after {am * 1e3:.1f} ms, before/after {bm / am:.2f}")
