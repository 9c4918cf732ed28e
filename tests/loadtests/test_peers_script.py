"""benchmarks/peers.py: its help, its ratios over `vllm bench serve` result files, and a peer that cannot
start is reported in the JSON (exit 1) instead of stopping the comparison."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"


def load():
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module
    spec.loader.exec_module(module)
    return module


def test_help_says_how_to_reproduce():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "vllm bench serve" in out and "--vllm-venv" in out and "docs/performance.md" in out


def test_ratios_are_ours_over_theirs_per_concurrency():
    peers = load()
    # The keys of a `vllm bench serve --save-result` file that the script reads.
    theirs = peers.figures({"output_throughput": 400.0, "median_ttft_ms": 900.0, "median_tpot_ms": 75.0,
                            "median_itl_ms": 70.0, "p99_ttft_ms": 2000.0, "completed": 128, "date": "x"})
    ours = {"c32": {**theirs, "output_throughput": 600.0, "median_ttft_ms": 450.0}, "startup_s": 3.0,
            "command": "colm serve"}
    r = peers.ratios(ours, {"c32": theirs, "c1": theirs, "command": "vllm serve", "startup_s": 150.0})
    assert r == {"c32": {"output_throughput": 1.5, "median_ttft_ms": 0.5, "median_tpot_ms": 1.0,
                         "median_itl_ms": 1.0, "p99_ttft_ms": 1.0}}


def test_a_peer_that_cannot_start_is_reported(tmp_path):
    out = tmp_path / "peers.json"
    rc = subprocess.run([sys.executable, str(SCRIPT), "--colm-model", "models/colm-tiny", "--hf-model", str(tmp_path),
                         "--vllm-venv", str(tmp_path / "no-venv"), "--skip", "colm", "--out", str(out),
                         "--logs", str(tmp_path / "logs")], capture_output=True, text=True, timeout=60).returncode
    assert rc == 1
    result = json.loads(out.read_text())
    assert "error" in result["raw"]["vllm"] and "colm" not in result["raw"]
    assert result["better"]["output_throughput"] == "higher" and result["better"]["median_ttft_ms"] == "lower"
