#!/usr/bin/env python3
"""The sampler of this checkout against the sampler of an earlier commit, interleaved in one process.

  python benchmarks/sampler_ab.py --old 0bdc61e~1 --vocab 49152 --batch 1 32

For each batch size and parameter set (temperature 1; greedy; top_p 0.9), prints the median ms per
`sample()` call of each side and old / new. Logits are random, the same for both sides.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from colm_runtime.engine import sampler as new
from colm_runtime.engine.types import SamplingParams

CASES = {"temperature 1": SamplingParams(temperature=1.0), "greedy": SamplingParams(temperature=0.0),
         "top_p 0.9": SamplingParams(temperature=1.0, top_p=0.9)}


def old_sampler(rev: str):
    """colm_runtime/engine/sampler.py at `rev`, imported as a separate module."""
    src = subprocess.run(["git", "show", f"{rev}:colm_runtime/engine/sampler.py"], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "sampler_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sampler_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sampler_old"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="git revision of the old sampler")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    old = old_sampler(args.old)
    for B in args.batch:
        logits = torch.randn(B, args.vocab, generator=torch.Generator().manual_seed(0))
        for label, params in CASES.items():
            sides = {"old": (old, [old.SamplingRow(params, None, (), ())] * B),
                     "new": (new, [new.SamplingRow(params, None, (), ())] * B)}
            gen = torch.Generator().manual_seed(0)
            times: dict[str, list[float]] = {k: [] for k in sides}
            for r in range(args.rounds + 3):
                for name, (mod, rows) in sides.items():
                    x = logits.clone()
                    t = time.perf_counter()
                    mod.sample(x, rows, gen)
                    if r >= 3:  # the first three rounds warm up
                        times[name].append(time.perf_counter() - t)
            o, n = (statistics.median(times[k]) * 1e3 for k in ("old", "new"))
            print(f"batch {B:3d}  {label:14s} old {o:8.2f} ms  new {n:8.2f} ms  old/new {o / n:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
