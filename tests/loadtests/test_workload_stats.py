"""The load generator's own logic, without a server: specs, traffic plans, percentiles, goodput."""

from __future__ import annotations

import random
import statistics

import pytest

from loadtests.client import CANCELLED, OK, REJECTED, RequestRecord, request_body
from loadtests.probe import TargetError, check_loopback, parse_metrics
from loadtests.runner import PhaseResult
from loadtests.spec import Distribution, LoadSpec, Selection, SpecError, parse_mix
from loadtests.stats import SLO, percentiles, summarise
from loadtests.workload import make_plans


def test_distribution_syntax_and_bounds():
    assert Distribution.parse("64") == Distribution("fixed", 64)
    u = Distribution.parse("uniform:8:12")
    rng = random.Random(0)
    draws = [u.sample(rng) for _ in range(500)]
    assert set(draws) == set(range(8, 13))
    n = Distribution.parse("normal:50:5")
    assert 47 < statistics.mean(n.sample(rng) for _ in range(2000)) < 53
    for bad in ("uniform:9:3", "zipf:3", "x", "0"):
        with pytest.raises(SpecError):
            Distribution.parse(bad)


def test_selection_syntax_maps_to_request_fields():
    mix = parse_mix("default@2,model=c1,chains=2,tier=economy,tier=premium+budget=1500@0.5")
    assert [s.label for s in mix] == ["default", "model=c1", "chains=2", "tier=economy", "tier=premium+budget=1500"]
    assert mix[0].weight == 2 and mix[4].weight == 0.5
    assert mix[1].model_id("colm-tiny") == "colm-tiny:c1" and mix[0].model_id("colm-tiny") == "colm-tiny"
    assert mix[4].body_fields() == {"tier": "premium", "latency_budget_ms": 1500.0}
    assert mix[0].body_fields() == {}
    for bad in ("budget", "size=3", "chains=two", "default@0"):
        with pytest.raises(SpecError):
            Selection.parse(bad)


def test_request_body_is_openai_plus_colm_fields():
    spec = LoadSpec(max_requests=1, mix=(Selection(chains=2, latency_budget_ms=900),))
    plan = make_plans(spec)[0]
    body = request_body(plan, "m", "completions")
    assert body["model"] == "m" and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["chains"] == 2 and body["latency_budget_ms"] == 900 and body["max_tokens"] == 32
    assert body["prompt"] == plan.prompt and len(plan.prompt) == 64
    chat = request_body(plan, "m", "chat")
    assert chat["messages"][0]["role"] == "user" and "prompt" not in chat


def test_plans_are_seeded_and_bounded():
    spec = LoadSpec(arrival="poisson", rate=50, duration_s=20, max_requests=100_000, seed=3,
                    output_tokens=Distribution("uniform", 2, 9), cancel_share=0.3)
    a, b = make_plans(spec), make_plans(spec)
    assert a == b
    assert all(p.send_at <= 20 for p in a) and a[-1].send_at > 19
    # Poisson: about rate x duration arrivals, exponential gaps with mean 1/rate.
    assert 900 < len(a) < 1100
    gaps = [y.send_at - x.send_at for x, y in zip(a, a[1:])]
    assert 0.018 < statistics.mean(gaps) < 0.022 and min(gaps) >= 0
    cancelled = [p for p in a if p.cancel_after is not None]
    assert 0.25 < len(cancelled) / len(a) < 0.35
    assert all(1 <= p.cancel_after < p.max_tokens for p in cancelled)
    assert len(make_plans(LoadSpec(arrival="constant", rate=4, duration_s=100, max_requests=7))) == 7
    const = make_plans(LoadSpec(arrival="constant", rate=4, duration_s=2.0))
    assert [p.send_at for p in const] == [i / 4 for i in range(9)]


def test_same_seed_same_prompts_for_any_mix():
    """Elastic and pinned phases must send the same prompts at the same times."""
    base = LoadSpec(rate=5, duration_s=10, seed=1, prompt_tokens=Distribution("uniform", 4, 40))
    elastic = make_plans(LoadSpec(**{**base.__dict__, "mix": (Selection(latency_budget_ms=500),)}))
    pinned = make_plans(LoadSpec(**{**base.__dict__, "mix": (Selection(model_chains=4, latency_budget_ms=500),)}))
    assert [(p.send_at, p.prompt, p.max_tokens) for p in elastic] == [(p.send_at, p.prompt, p.max_tokens)
                                                                       for p in pinned]


def test_percentiles_match_numpy_definition():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p = percentiles(values)
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert p["mean"] == pytest.approx(50.5)
    assert percentiles([])["p50"] is None


def _rec(i, outcome=OK, e2e=1.0, budget=None, chains=4, ttft=0.1, tokens=11):
    return RequestRecord(i, "x", budget, tokens, sent_at=1.0, outcome=outcome, e2e_s=e2e, ttft_s=ttft,
                         chains=chains, output_tokens=tokens)


def test_goodput_counts_only_requests_within_their_slos():
    recs = [_rec(0, e2e=0.5, budget=1000), _rec(1, e2e=1.5, budget=1000), _rec(2, e2e=9.0),
            _rec(3, outcome=REJECTED, budget=1000, chains=None), _rec(4, outcome=CANCELLED, chains=1),
            _rec(5, e2e=0.2, chains=1, ttft=0.15)]
    phase = PhaseResult("p", LoadSpec(rate=2), recs, started=0.0, sending_ended=5.0, ended=10.0)
    s = summarise(phase)
    assert s["good_requests"] == 3 and s["goodput_requests_per_s"] == pytest.approx(0.3)
    assert s["overall"]["budgeted"] == 3 and s["overall"]["budget_met_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert (s["completed"], s["rejected"], s["cancelled"]) == (4, 1, 1)
    assert set(s["per_chains"]) == {"1", "4", "unknown"} and s["chosen_chains"] == {"1": 2, "4": 3}
    assert s["overall"]["tpot_ms"]["p50"] == pytest.approx(90.0)  # (1.0 - 0.1) s / 10 tokens, median
    strict = summarise(phase, SLO(ttft_ms=120))
    assert strict["good_requests"] == 2  # request 5 misses the TTFT target


def test_leaked_blocks_from_metrics_text():
    text = ("colm_requests_running 0\ncolm_requests_waiting 0\n"
            'colm_kv_cache_free_blocks{chain="1"} 10\ncolm_kv_cache_free_blocks{chain="2"} 7\n'
            'colm_kv_cache_total_blocks{chain="1"} 10\ncolm_kv_cache_total_blocks{chain="2"} 10\n')
    snap = parse_metrics(text)
    assert snap.leaked_blocks == 3 and not snap.idle
    assert parse_metrics(text.replace("} 7", "} 10")).idle
    # Blocks the prefix cache keeps are free, not leaked: an idle server with a full cache is idle.
    cached = parse_metrics(text.replace("} 7", "} 10") + 'colm_kv_cache_cached_free_blocks{chain="2"} 9\n')
    assert cached.idle and cached.kv_cached == {"2": 9.0} and cached.to_dict()["kv_cached_free_blocks"] == {"2": 9.0}


def test_loopback_only_unless_allowed():
    assert check_loopback("http://127.0.0.1:8000/", False) == "http://127.0.0.1:8000"
    assert check_loopback("http://localhost:8000", False) == "http://localhost:8000"
    check_loopback("http://[::1]:8000", False)
    with pytest.raises(TargetError, match="--allow-remote"):
        check_loopback("http://192.0.2.7:8000", False)
    assert check_loopback("http://192.0.2.7:8000", True) == "http://192.0.2.7:8000"
    with pytest.raises(TargetError):
        check_loopback("ftp://127.0.0.1", False)
