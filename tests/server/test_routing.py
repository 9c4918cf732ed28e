"""Chain selection: every path (model id, chains, tier, latency budget, default, headers), its `colm`
report and X-CoLM-Chains header, budget routing at both ends, and the router/degradation policy on
EngineStats snapshots (the engine's own value type) for the cases a live server cannot pin down."""

from __future__ import annotations

import time

import httpx
import pytest

from colm_runtime.engine.types import EngineStats
from colm_runtime.testing import small_config
from server.admission import DegradationConfig, DegradationPolicy
from server.admission.predictor import LatencyPredictor
from server.errors import InvalidRequest, ModelNotFound, Overloaded
from server.routing import ChainRouter, RouteHints
from server.tiers import TierError, default_tiers, load_tiers
from tests.server import helpers
from tests.server.helpers import engine_stats as stats


def post(app, body: dict, headers: dict | None = None, path: str = "/v1/completions") -> httpx.Response:
    """helpers.post with this file's defaults: a short prompt, 4 tokens."""
    return helpers.post(app, {"prompt": "Route me", "max_tokens": 4, "ignore_eos": True, **body}, headers, path)


def colm_of(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    colm = r.json()["colm"]
    assert r.headers["x-colm-chains"] == str(colm["chains"])
    assert r.headers["x-colm-route-reason"] == colm["reason"]
    assert r.json()["colm"]["final_chains"] == colm["chains"]
    return colm


def test_model_id_pins_chains(app, model_info):
    base = model_info["base"]
    for k in range(1, model_info["n_chains"] + 1):
        # the model id beats every other hint
        colm = colm_of(post(app, {"model": f"{base}:c{k}", "chains": 1, "tier": "economy"}))
        assert (colm["chains"], colm["reason"]) == (k, "model")


def test_chains_field_and_header(app, model_info):
    base, n = model_info["base"], model_info["n_chains"]
    colm = colm_of(post(app, {"model": base, "chains": 2, "tier": "premium", "latency_budget_ms": 0.001}))
    assert (colm["chains"], colm["reason"]) == (2, "chains")
    colm = colm_of(post(app, {"model": base}, {"X-CoLM-Chains": "1"}))
    assert (colm["chains"], colm["reason"]) == (1, "chains")
    colm = colm_of(post(app, {"model": base, "chains": n}, {"X-CoLM-Chains": "1"}))  # body beats header
    assert colm["chains"] == n


def test_tiers(app, model_info):
    base, n = model_info["base"], model_info["n_chains"]
    expect = {"economy": (1, -10), "standard": (max(1, n // 2), 0), "premium": (n, 10)}
    for tier, (k, priority) in expect.items():
        colm = colm_of(post(app, {"model": base, "tier": tier, "latency_budget_ms": 1e7}))
        # The router's choice is requested_chains; the shared app may still carry the earlier tests' load,
        # and then admission's capacity signal (nothing else) may take chains off (test_degradation.py).
        assert (colm["requested_chains"], colm["tier"], colm["priority"]) == (k, tier, priority), colm
        assert (colm["chains"], colm["reason"]) == (k, "tier") or (
            colm["reason"] == "degraded" and colm["degrade_reasons"] == ["capacity"] and colm["chains"] < k), colm
    colm = colm_of(post(app, {"model": base}, {"X-CoLM-Tier": "economy"}))
    assert (colm["chains"], colm["reason"]) == (1, "tier")
    colm = colm_of(post(app, {"model": base, "tier": "economy", "priority": 3}))
    assert colm["priority"] == 3  # an explicit priority overrides the tier's


def test_budget_routing(app, model_info):
    """A loose budget gets every chain; a budget nothing can meet gets the smallest chain count."""
    base, n = model_info["base"], model_info["n_chains"]
    loose = colm_of(post(app, {"model": base, "latency_budget_ms": 1e7}))
    assert (loose["chains"], loose["reason"], loose["latency_budget_ms"]) == (n, "budget", 1e7)
    tight = colm_of(post(app, {"model": base, "latency_budget_ms": 0.001}))
    assert (tight["chains"], tight["reason"]) == (1, "budget")
    assert tight["predicted_latency_ms"] > 0.001  # the prediction really misses: that is why
    by_header = colm_of(post(app, {"model": base}, {"X-CoLM-Latency-Budget-Ms": "0.001"}))
    assert (by_header["chains"], by_header["reason"]) == (1, "budget")


def test_budget_between(app, model_info):
    """A budget between the chain counts' predictions: the router picks the largest count predicted to
    fit. The predictions come from the idle app's own admission, as the request will see them (nothing
    runs in between, so nothing they read changes)."""
    base, n = model_info["base"], model_info["n_chains"]
    prompt_tokens = app.client.post("/tokenize", json={"prompt": "Route me"}).json()["count"]
    predictor = app.state.admission.predictor(app.state.stats(), time.monotonic())
    times = {k: predictor.predict(k, prompt_tokens, 4) for k in range(1, n + 1)}
    ordered = sorted(set(times.values()))
    gaps = [(b - a, (a + b) / 2) for a, b in zip(ordered, ordered[1:])]
    budget_s = max(gaps)[1] if gaps else ordered[0] * 2  # the middle of the widest gap: robust to noise
    expect = max((k for k, t in times.items() if t <= budget_s), default=1)
    colm = colm_of(post(app, {"model": base, "latency_budget_ms": budget_s * 1000}))
    assert (colm["chains"], colm["reason"]) == (expect, "budget"), times
    assert colm["predicted_latency_ms"] <= budget_s * 1000


def test_default_and_chat(app, model_info):
    colm = colm_of(post(app, {"model": model_info["base"]}))
    assert (colm["chains"], colm["reason"], colm["requested_chains"]) == (model_info["n_chains"], "default",
                                                                         model_info["n_chains"])
    chat = post(app, {"model": model_info["base"], "messages": [{"role": "user", "content": "hi"}],
                         "tier": "economy", "prompt": None}, path="/v1/chat/completions")
    assert colm_of(chat)["chains"] == 1


def test_custom_tiers_and_default_tier(auth_app):
    """Tiers from a YAML file; the default tier is configurable (bronze: 1 chain here)."""
    h = {"Authorization": "Bearer test-key-1"}
    base = auth_app.client.get("/v1/models", headers=h).json()["data"][0]
    colm = colm_of(post(auth_app, {"model": base["id"]}, h))
    assert (colm["chains"], colm["reason"], colm["priority"]) == (1, "default", -5)
    colm = colm_of(post(auth_app, {"model": base["id"], "tier": "gold"}, h))
    assert (colm["chains"], colm["latency_budget_ms"]) == (base["chains"], 60000)
    r = post(auth_app, {"model": base["id"], "tier": "economy"}, h)
    assert r.status_code == 400 and "bronze" in r.json()["error"]["message"]


# ---- the policy objects on EngineStats snapshots ------------------------------------------------

CFG = small_config()  # 4 chains of 2 heads, one pool per chain


def route(hints: RouteHints, s: EngineStats, prompt=10, max_tokens=10, queue_wait=0.0):
    router = ChainRouter(CFG, "m", default_tiers(4), "premium")
    p = LatencyPredictor(CFG, s, queue_wait)
    return router.route(hints, p, prompt, max_tokens), p


def test_predictor_formula_and_extrapolation():
    p = LatencyPredictor(CFG, stats(waiting=2), queue_wait_s=0.5)
    # queue + prompt x prefill(k) + max_tokens x TPOT(k); prefill at 2 chains scaled from 4 by width
    assert p.predict(2, 10, 10) == pytest.approx(0.5 + 10 * 0.001 * 2 / 4 + 10 * 0.02)
    assert LatencyPredictor(CFG, stats(), 0.5).predict(4, 0, 10) == pytest.approx(0.4)  # no queue: no wait
    assert LatencyPredictor(CFG, stats(decode={}, prefill={}), 0.0).predict(4, 10, 10) == 0.0


@pytest.mark.parametrize("budget_ms,expect", [(1e6, 4), (311, 3), (250, 2), (150, 1), (50, 1)])
def test_budget_picks_largest_fitting(budget_ms, expect):
    choice, _ = route(RouteHints("m", latency_budget_ms=budget_ms), stats(), prompt=10, max_tokens=10)
    # predictions: k x 100 ms decode + 10 x 1 ms x k/4 prefill -> 102.5, 205, 307.5, 410 ms
    assert (choice.chains, choice.reason) == (expect, "budget")


def test_router_errors():
    with pytest.raises(ModelNotFound):
        route(RouteHints("other"), stats())
    with pytest.raises(ModelNotFound):
        route(RouteHints("m:c5"), stats())
    with pytest.raises(InvalidRequest) as e:
        route(RouteHints("m", tier="gold"), stats())
    assert e.value.param == "tier"


def policy(max_waiting=10) -> DegradationPolicy:
    return DegradationPolicy(CFG, DegradationConfig(max_waiting, 0.5, 0.9))


def test_queue_degradation_is_linear_and_spares_pinned():
    p = policy()
    for waiting, expect in [(0, 4), (5, 4), (6, 3), (7, 2), (9, 1), (10, 1), (14, 1)]:
        s = stats(waiting=waiting)
        choice, pred = route(RouteHints("m"), s)
        out = p.apply(choice, s, pred, 10, 10)
        assert out.chains == expect, waiting
        assert (out.reason == "degraded") == (expect < 4) and out.requested_chains == 4
        pinned, _ = route(RouteHints("m", chains=4), s)
        if waiting < 10:
            assert p.apply(pinned, s, pred, 10, 10).chains == 4
        else:
            with pytest.raises(Overloaded):  # a full queue refuses pinned requests ...
                p.apply(pinned, s, pred, 10, 10)
    # past max_waiting unpinned requests still queue at 1 chain, up to the engine's own queue bound (the one
    # bound, engine/validation.py check_queue: test_async_engine), which admission does not re-check
    s = stats(waiting=15)
    choice, pred = route(RouteHints("m"), s)
    assert p.apply(choice, s, pred, 10, 10).chains == 1


def test_kv_and_budget_degradation():
    s = stats(kv=(0.5, 0.6, 0.95, 0.99))
    choice, pred = route(RouteHints("m", tier="premium"), s)
    out = policy().apply(choice, s, pred, 10, 10)
    assert (out.chains, out.degrade_reasons) == (2, ("kv_cache",))
    s = stats()
    choice, pred = route(RouteHints("m", tier="premium", latency_budget_ms=250), s)
    out = policy().apply(choice, s, pred, 10, 10)
    assert (out.chains, out.reason, out.degrade_reasons) == (2, "degraded", ("budget",))


def test_tier_file_validation(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"tiers": {"a": {"chains": "half", "priority": 1}}}')
    assert load_tiers(f, 4)["a"].chains == 2
    for bad in ('{"tiers": {"a": {"chains": 9}}}', '{"tiers": {}}', '{"tiers": {"a": {"colour": 1}}}', "[1"):
        f.write_text(bad)
        with pytest.raises(TierError):
            load_tiers(f, 4)


def test_queue_wait_follows_the_live_queue():
    """Little's law on the live queue: waiting / drain rate; the moving average before any rate."""
    from server.admission.signals import QueueTimeAverage

    q = QueueTimeAverage(window=10.0)
    q.observe(0.5)  # no departure time yet: the moving average answers
    assert q.estimate(3, now=100.0) == 0.5
    for t in range(10):  # the queue drained at 2 requests/s over the last 5 s
        q.observe(0.5, left_at=95.0 + 0.5 * t)
    assert q.estimate(0, now=100.0) == 0.0
    assert q.estimate(8, now=100.0) == pytest.approx(8 / 2.0, rel=0.01)
    assert q.estimate(8, now=130.0) == q.value  # departures older than the window are forgotten
