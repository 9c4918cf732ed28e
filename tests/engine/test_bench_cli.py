"""Every `colm bench` benchmark runs end to end at tiny sizes and prints one JSON object."""

from __future__ import annotations

import json

from colm_runtime.cli import main


def run_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_bench_engine_reports_every_ratio(capsys):
    r = run_json(capsys, "engine", "--random", "tiny", "--requests", "4", "--single", "2", "--prompt-len", "4", "8",
                 "--output-len", "3", "--rounds", "1", "--no-transformers")
    for key in ("mixed_vs_separate", "mixed_vs_padded", "continuous_vs_sequential", "continuous_vs_sequential_full",
                "padded_flop_ratio"):
        assert r[key] > 0
    assert set(r["tokens_per_s"]) == {"mixed", "separate", "padded", "sequential", "full_single"}
    assert r["threads"] == 1 and r["model"] == "random(tiny)"


def test_bench_bandwidth_reports_every_chain_count(capsys):
    r = run_json(capsys, "bandwidth", "--size", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "2",
                 "--context", "16", "--rounds", "1")
    assert [s["chains"] for s in r["steps"]] == [1, 2, 3, 4]
    bytes_ = [s["bytes"] for s in r["steps"]]
    assert bytes_ == sorted(bytes_) and all(s["step_ms"] > 0 for s in r["steps"])


def test_bench_model_reports_the_chain_dividend(capsys, tmp_path):
    from colm_runtime.bench.model import equal_mix, step_flops
    from colm_runtime.checkpoint import load_config

    r = run_json(capsys, "model", "--random", "tiny", "--dividend-only", "--batch", "6", "--context", "16",
                 "--rounds", "2")
    d = r["dividend"]["6"]
    assert set(d["share"]) == set(d["flop_share"]) == set(d["dividend"]) == {"1", "2", "3", "mix"}
    steps = r["step_ms"]["6"]
    for k in ("1", "2", "3", "mix"):  # share = step time / the all-chains step; dividend = share / FLOP share
        assert abs(d["share"][k] - steps[k] / steps["4"]) < 2e-3 + 1e-3 * d["share"][k]
        assert abs(d["dividend"][k] - d["share"][k] / d["flop_share"][k]) < 0.01 * d["dividend"][k] + 2e-3
    assert equal_mix(4, 6) == [1, 1, 2, 3, 3, 4] and equal_mix(3, 6) == [1, 1, 2, 2, 3, 3]
    assert main(["bench", "model", "--random", "tiny", "--save", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    cfg = load_config(tmp_path / "m")
    mix = sum(step_flops(cfg, k, 16) for k in equal_mix(4, 6)) / (6 * step_flops(cfg, 4, 16))
    assert abs(d["flop_share"]["mix"] - mix) < 1e-3
    r = run_json(capsys, "bandwidth", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "float32",
                 "--batch", "2", "--context", "16", "--rounds", "1")
    assert [s["chains"] for s in r["steps"]] == [1, 2, 3, 4] and all(s["decode_tok_s"] > 0 for s in r["steps"])


def test_bench_prefill_reports_speedup_and_flop_ratio_per_length(capsys):
    r = run_json(capsys, "prefill", "--random-shape", "none", "--lengths", "16", "40", "--rounds", "1",
                 "--max-num-batched-tokens", "16")
    (model,) = r["speedup"]
    assert set(r["speedup"][model]) == {"16", "40"} and all(v > 0 for v in r["speedup"][model].values())
    assert all(v > 1 for v in r["flop_ratio"][model].values())  # chain 1 is always cheaper in FLOPs


def test_bench_speculative_reports_speedup_and_acceptance_per_chain_count(capsys):
    r = run_json(capsys, "speculative", "--output-len", "6", "--rounds", "1", "--gamma", "2")
    assert len(r["speedup"]) == 2  # both default models (or random stand-ins)
    for model, by_k in r["speedup"].items():
        assert set(by_k) == {"2", "3", "4"} and all(v > 0 for v in by_k.values())
        assert all(0 <= a <= 1 for a in r["acceptance"][model].values())


def test_bench_structured_reports_the_constrained_to_free_ratio(capsys):
    r = run_json(capsys, "structured", "--requests", "2", "--output-len", "6", "--rounds", "1")
    assert set(r["tokens_per_s"]) == {"unconstrained", "json_schema", "unconstrained_again"}
    assert r["ratio"] > 0 and r["control_ratio"] > 0 and len(r["ratio_per_round"]) == 1
    assert set(r["mean_output_tokens"].values()) == {6.0}  # the schema outlasts 6 tokens


def test_bench_prefix_reports_ttft_throughput_and_hit_rate_per_pool(capsys):
    r = run_json(capsys, "prefix", "--system-len", "64", "--requests", "4", "--concurrency", "2",
                 "--output-len", "3", "--rounds", "1")
    assert r["outputs_identical"] and r["system_len"] == 64
    assert set(r["ttft_p50_s"]) == set(r["tokens_per_s"]) == {"uncached", "cached"}
    assert r["ttft_ratio"] > 0 and r["throughput_ratio"] > 0
    # Requests at 1..4 chains after a warm-up at 4 chains: every pool they use has the system prompt.
    assert set(r["hit_rate"]) == {"1", "2", "3", "4"} and all(0.5 < h < 1 for h in r["hit_rate"].values())
