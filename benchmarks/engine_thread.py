#!/usr/bin/env python3
"""Decode steps of the engine run on a thread, as `colm serve` runs them (AsyncEngine's colm-engine
thread), with and without the loading thread's OpenMP pool released first (what AsyncEngine.start
does). Prints the median step of each mode; run the modes alternately, several times, on a quiet
machine:

  for m in keep release keep release; do python benchmarks/engine_thread.py --batch 32 --mode $m; done

The model is loaded (and its kernels warmed) on the main thread in both modes, as the server loads it.
"""
import argparse
import random
import threading
import time

from colm_runtime.engine.config import EngineConfig
from colm_runtime.engine.llm_engine import LLMEngine
from colm_runtime.engine.types import EngineRequest, SamplingParams
from colm_runtime.model import cpu_kernels

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="/work/peers/smollm2-colm")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--mode", choices=("keep", "release"), required=True)
ap.add_argument("--dtype", default="bfloat16")
a = ap.parse_args()

eng = LLMEngine.from_model_dir(a.model, EngineConfig(dtype=a.dtype, cpu_threads=2, max_num_seqs=a.batch))
rng = random.Random(0)


def run(tag: str) -> None:
    for i in range(a.batch):
        eng.add_request(EngineRequest(f"{tag}{i}", [rng.randrange(100, 49000) for _ in range(128)],
                                      SamplingParams(max_tokens=64, temperature=1.0, ignore_eos=True), chains=1))
    steps = []
    while eng.has_unfinished:
        s = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - s)
    steps.sort()
    if tag == "measured":
        print(f"{a.mode}: batch {a.batch}, median step {steps[len(steps) // 2] * 1e3:.1f} ms", flush=True)


if a.mode == "release":
    cpu_kernels.release_thread_pool()
for tag in ("warm", "measured"):  # each on a new thread, as the server's engine thread is one
    t = threading.Thread(target=run, args=(tag,))
    t.start()
    t.join()
