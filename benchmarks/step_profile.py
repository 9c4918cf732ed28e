"""torch.profiler's op table of one decode step (batch 32, 128 cached tokens, 3 steps), for each of
the all-chains, equal-mix and one-chain batches of MODEL (a --random shape name or a directory).

  python benchmarks/step_profile.py smollm2-3chain bfloat16
"""
import sys
from pathlib import Path

import torch
from torch.profiler import profile

from colm_runtime.bench.model import DecodeStep, equal_mix, load_or_random, random_model

torch.set_num_threads(1)
dtype = getattr(torch, sys.argv[2])
model = load_or_random(sys.argv[1], "cpu", dtype)[0] if Path(sys.argv[1]).is_dir() else \
    random_model(sys.argv[1], "cpu", dtype)
n = model.cfg.n_chains
for name, chains in ((f"all {n} chains", n), ("equal mix", equal_mix(n, 32)), ("1 chain", 1)):
    step = DecodeStep(model, chains, 32, 128)
    for _ in range(3):
        step()
    with profile() as p:
        for _ in range(3):
            step()
    print(f"===== {name}\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
