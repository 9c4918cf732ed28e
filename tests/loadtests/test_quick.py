"""The quick scenario end to end: the real CLI against a real server, and what it must guarantee."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import httpx

from loadtests.probe import parse_metrics

from .conftest import REPO

LATENCIES = ("ttft_ms", "tpot_ms", "e2e_ms")


def run_cli(*args: str, timeout: float = 150.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtests", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def check_block(block: dict) -> None:
    assert block["count"] >= block["completed"] >= 0
    for key in LATENCIES:
        p = block[key]
        if block["completed"] and key != "tpot_ms":
            assert p["p50"] is not None
        if p["p50"] is not None:
            assert 0 <= p["p50"] <= p["p90"] <= p["p99"]


def test_quick_scenario(load_server, tmp_path):
    url, _ = load_server
    out = tmp_path / "quick"
    before = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    proc = run_cli("--url", url, "--scenario", "quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    s = json.loads((out / "summary.json").read_text())
    assert s["schema"] == "colm-loadtest/1" and s["scenario"] == "quick" and s["passed"] is True
    assert s["requests"] > 0 and s["errors"] == 0 and s["rejected"] == 0 and s["timed_out"] == 0
    assert s["cancelled"] > 0, "the quick scenario must disconnect some clients mid-stream"
    # The server saw those disconnects as aborts (a disconnect racing the last token may finish instead).
    aborted = after.finished.get("abort", 0) - before.finished.get("abort", 0)
    assert 0 < aborted <= s["cancelled"]
    assert s["throughput_tokens_per_s"] > 0 and s["goodput_requests_per_s"] > 0
    assert s["checks"]["no_leaked_blocks"]["passed"] and s["checks"]["no_leaked_blocks"]["leaked_blocks"] == 0
    assert s["checks"]["no_errors"]["passed"] and s["checks"]["disconnects_abort"]["passed"]
    n = s["target"]["n_chains"]
    assert {"1", str(n)} <= set(s["per_chains"]), "model=c1 and the default (all chains) are in the mix"
    for block in s["per_chains"].values():
        check_block(block)
    assert len(s["phases"]) == 2
    for p in s["phases"]:
        assert p["requests"] == p["completed"] + p["cancelled"]
        assert sum(p["chosen_chains"].values()) == p["requests"]
        for block in p["per_chains"].values():
            check_block(block)
    assert (out / "summary.md").read_text().startswith("# Load test: quick")
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == s["requests"]  # one line per request sent, in every phase
    assert {r["phase"] for r in records} == {p["name"] for p in s["phases"]}
    assert sum(r["outcome"] == "cancelled" for r in records) == s["cancelled"]
    assert all(r["sent_at"] >= 0 and "itl_s" not in r for r in records)
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("latency_vs_load.png", "chains_vs_load.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_blocks_held_after_the_run(load_server, tmp_path):
    """Independently of the tool's own check: once idle, every pool's blocks are free again."""
    url, _ = load_server
    proc = run_cli("--url", url, "--scenario", "quick", "--out", str(tmp_path / "again"), "--duration", "4",
                   "--rate", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    snap = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    assert snap.kv_total and snap.leaked_blocks == 0 and not snap.running and not snap.waiting


def test_refuses_non_loopback_target(tmp_path):
    proc = run_cli("--url", "http://10.255.255.1:8000", "--scenario", "quick", "--out", str(tmp_path / "x"),
                   timeout=30)
    assert proc.returncode == 2
    assert "--allow-remote" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_chat_endpoint_with_text_prompts(load_server, tmp_path):
    """The chat path: text prompts, role-only first chunk not taken for a token, usage counted."""
    url, _ = load_server
    out = tmp_path / "chat"
    proc = run_cli("--url", url, "--scenario", "quick", "--out", str(out), "--endpoint", "chat",
                   "--prompt-format", "text", "--duration", "3", "--rate", "2", "--output-tokens", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["errors"] == 0 and s["completed"] > 0
    finished = s["completed"]
    assert s["output_tokens"] >= 8 * finished  # ignore_eos: every finished request has all 8 tokens
    for p in s["phases"]:
        assert p["spec"]["endpoint"] == "chat" and p["spec"]["prompt_format"] == "text"
