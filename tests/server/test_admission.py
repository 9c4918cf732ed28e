"""Admission (server/admission): the batch-level time per token, the online prediction correction, the
offered load and the capacity signal, and the Admission object's decisions and feedback, on EngineStats
snapshots and the server's own objects."""

from __future__ import annotations

import pytest

from colm_runtime.testing import small_config
from server.admission import Admission, DegradationConfig, DegradationPolicy, DegradeReason, Finished
from server.admission.predictor import DRAIN_S, LatencyPredictor
from server.admission.signals import Demand, InFlightChains, Offered, OfferedLoad, PredictionCorrection
from server.errors import Overloaded
from server.metrics import ServerMetrics
from server.ratelimit import RateLimited, RateLimiter, RateLimits
from server.routing import ChainRouter, RouteHints
from server.tiers import default_tiers
from tests.server.helpers import STEP
from tests.server.helpers import engine_stats as stats

CFG = small_config()  # 4 chains of 2 heads


def predictor(widest=0, correction=1.0, offered: Offered | None = None, waiting=0,
              queue_wait=0.0) -> LatencyPredictor:
    return LatencyPredictor(CFG, stats(waiting), queue_wait, widest=widest, correction=correction,
                            offered=offered or Offered())


def admit(hints: RouteHints, p: LatencyPredictor, utilization=0.85, prompt=10, max_tokens=10, refuse=False):
    router = ChainRouter(CFG, "m", default_tiers(4), "premium")
    policy = DegradationPolicy(CFG, DegradationConfig(100, 0.5, 0.9, max_num_seqs=8, utilization=utilization,
                                                      refuse_unreachable=refuse))
    return policy.apply(router.route(hints, p, prompt, max_tokens), p.stats, p, prompt, max_tokens)


def test_time_per_token_is_the_widest_batch_step():
    """A request narrower than the widest one in flight waits for that one's step every token."""
    alone, behind_c4 = predictor(widest=0), predictor(widest=4)
    assert alone.predict(1, 0, 10) == pytest.approx(10 * STEP[1])
    assert behind_c4.predict(1, 0, 10) == behind_c4.predict(4, 0, 10) == pytest.approx(10 * STEP[4])
    # prefill follows the same batch: 10 prompt tokens at the 4-chain rate, not scaled down to 2
    assert predictor(widest=4).predict(2, 10, 0) == pytest.approx(10 * 0.001)
    assert predictor(widest=2).predict(3, 0, 10) == pytest.approx(10 * STEP[3])  # wider than the batch


def test_budget_routing_sees_the_batch():
    """With a 4-chain request in flight no chain count fits a budget that 1 chain alone would meet."""
    hints = RouteHints("m", latency_budget_ms=150)
    assert admit(hints, predictor(widest=1)).chains == 1  # 100 ms at 1 chain fits, 200 ms at 2 does not
    choice = admit(hints, predictor(widest=4))
    assert choice.chains == 1 and choice.predicted_s == pytest.approx(10 * 0.001 + 10 * STEP[4])  # it will miss


def test_correction_scales_predictions_and_is_recorded():
    p = predictor(correction=2.0)
    assert p.predict(3, 10, 10) == pytest.approx(2.0 * p.predict_raw(3, 10, 10))
    choice = admit(RouteHints("m", latency_budget_ms=500), p)
    # raw predictions 102.5 / 205 / 307.5 / 410 ms; doubled only 1 and 2 chains fit
    assert choice.chains == 2 and choice.correction == 2.0
    assert choice.predicted_s / choice.correction == pytest.approx(p.predict_raw(2, 10, 10))


def test_correction_is_the_quantile_of_recent_errors():
    c = PredictionCorrection(size=10, quantile=0.9, min_samples=5, lo=0.5, hi=8.0)
    for ratio in (3.0, 3.0, 3.0, 3.0):
        c.observe(ratio, 1.0)
    assert c.factor == 1.0  # too few samples: no correction yet
    for ratio in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10):  # the window keeps the last 10: 1..10
        c.observe(ratio * 0.5, 0.5)
    assert sorted(c.ratios) == [float(r) for r in range(1, 11)]
    assert c.factor == 8.0  # the 0.9 quantile, 10, clamped to hi
    for _ in range(10):
        c.observe(0.1, 1.0)
    assert c.factor == 0.5  # clamped to lo
    c.observe(1.0, 0.0)  # no prediction: ignored
    assert len(c.ratios) == 10


def test_offered_load_is_a_sliding_window():
    o = OfferedLoad(window=2.0, min_span=1.0)
    assert o.snapshot(0.0) == Offered()
    for i in range(10):  # a burst after an idle spell: 10 admissions within 1 s
        o.observe(10.0 + i * 0.1, prompt_tokens=20 + i, max_tokens=8)
    snap = o.snapshot(10.95)  # within min_span of the burst's start: divided by min_span
    assert snap.rate == pytest.approx(10.0) and snap.prompt_tokens == pytest.approx(24.5) and snap.max_tokens == 8
    assert o.snapshot(11.5).rate == pytest.approx(10 / 1.5)  # by the span seen so far
    assert o.snapshot(12.55).rate == pytest.approx(4 / 2.0)  # the first 6 left the window
    assert o.snapshot(20.0) == Offered()
    o.observe(30.0, 5, 5)  # a new spell after the window emptied
    assert o.snapshot(30.2).rate == pytest.approx(1.0)


def test_demand_holds_through_a_pause():
    """A pause does not read as spare capacity until the longer window has seen it; a rise shows at once."""
    d = Demand(OfferedLoad(window=2.0), OfferedLoad(window=10.0))
    for i in range(100):  # 20 requests/s for 5 s
        d.observe(i * 0.05, prompt_tokens=10, max_tokens=4)
    assert d.snapshot(5.0).rate == pytest.approx(20.0)
    assert d.snapshot(8.0).rate == pytest.approx(100 / 8.0)  # 3 s of silence: the long window holds
    assert d.snapshot(16.0) == Offered()  # everything older than the long window: none
    for i in range(50):  # a burst at 50 requests/s after the pause
        d.observe(20.0 + i * 0.02, prompt_tokens=30, max_tokens=4)
    burst = d.snapshot(21.0)
    assert burst.rate == pytest.approx(50.0) and burst.prompt_tokens == 30


def test_in_flight_chains():
    f = InFlightChains()
    assert f.widest == 0
    for k in (1, 4, 4, 2):
        f.add(k)
    f.remove(4)
    assert f.widest == 4
    f.remove(4)
    assert f.widest == 2
    with pytest.raises(AssertionError):
        f.remove(3)


def utilization_at(rate: float, waiting: int = 0) -> dict[int, float]:
    p = predictor(offered=Offered(rate, prompt_tokens=10, max_tokens=10), waiting=waiting)
    return {k: p.utilization(k, max_num_seqs=8) for k in range(1, 5)}


def test_utilization_formula():
    # 10 requests/s x (10 tokens x step(k) / 8 slots + 10 prompt tokens x 1 ms x k/4)
    u = utilization_at(10.0)
    for k in range(1, 5):
        assert u[k] == pytest.approx(10 * (10 * STEP[k] / 8 + 10 * 0.001 * k / 4))
    assert utilization_at(0.0) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}
    # the waiting queue is load to drain within DRAIN_S: 30 waiting weigh as 30 / DRAIN_S more requests/s
    queued = utilization_at(10.0, waiting=30)
    for k in range(1, 5):
        assert queued[k] == pytest.approx(u[k] * (10 + 30 / DRAIN_S) / 10)


def test_unreachable_budgets_are_refused_only_when_asked():
    """Even 1 chain misses a 150 ms budget behind 1 s of queue: degraded to 1 chain by default, 429 with
    refuse_unreachable; a budget 1 chain meets is admitted either way, and requests without one are not
    refused."""
    late = predictor(waiting=5, queue_wait=1.0)
    assert admit(RouteHints("m", latency_budget_ms=150), late).chains == 1
    with pytest.raises(Overloaded) as e:
        admit(RouteHints("m", latency_budget_ms=150), late, refuse=True)
    assert e.value.code == "budget_unreachable" and e.value.status == 429
    assert admit(RouteHints("m", latency_budget_ms=1150), late, refuse=True).chains == 1  # 1102.5 ms fits
    assert admit(RouteHints("m"), late, refuse=True).chains == 4
    assert admit(RouteHints("m", chains=2, latency_budget_ms=150), late, refuse=True).chains == 2  # pinned


@pytest.mark.parametrize("rate", [1.0, 10.0, 20.0, 30.0, 60.0, 200.0])
def test_capacity_keeps_the_batch_narrow_enough(rate):
    """Unpinned requests get the largest chain count whose utilization fits the target (else 1);
    pinned requests keep theirs."""
    u = utilization_at(rate)
    fitting = [k for k in range(1, 5) if u[k] <= 0.85]
    expect = max(fitting, default=1)
    p = predictor(offered=Offered(rate, prompt_tokens=10, max_tokens=10))
    choice = admit(RouteHints("m"), p)
    assert choice.chains == expect
    assert choice.degrade_reasons == (() if expect == 4 else ("capacity",))
    assert admit(RouteHints("m:c4"), p).chains == 4
    assert admit(RouteHints("m"), p, utilization=100.0).chains == 4  # off: every count fits


def make_admission(max_waiting: int = 100, rpm: int | None = None) -> tuple[Admission, ServerMetrics]:
    router = ChainRouter(CFG, "m", default_tiers(4), "premium")
    policy = DegradationPolicy(CFG, DegradationConfig(max_waiting, 0.5, 0.9, max_num_seqs=8))
    metrics = ServerMetrics(lambda: None)
    return Admission(CFG, router, policy, RateLimiter(RateLimits(requests_per_minute=rpm)), metrics), metrics


def test_admission_decides_counts_and_charges():
    """admit(): the routed choice, degraded with its reason counted, the key charged; a refusal
    counts nothing as routed."""
    adm, m = make_admission(max_waiting=10, rpm=2)
    choice = adm.admit(RouteHints("m"), stats(waiting=7), 10, 10, api_key="k")
    assert (choice.chains, choice.degrade_reasons) == (2, (DegradeReason.QUEUE,))
    assert choice.degrade_reasons == ("queue",)  # the enum's values are the metric labels
    assert m.downgrades.labels("queue")._value.get() == 1
    assert m.routed.labels("degraded", "2")._value.get() == 1
    with pytest.raises(Overloaded):  # pinned, full queue
        adm.admit(RouteHints("m:c4"), stats(waiting=10), 10, 10, api_key="k")
    adm.admit(RouteHints("m"), stats(), 10, 10, api_key="k")
    with pytest.raises(RateLimited):  # the third request of the minute for this key
        adm.admit(RouteHints("m"), stats(), 10, 10, api_key="k")
    assert sum(s.value for s in m.routed.collect()[0].samples if s.name.endswith("_total")) == 2


def test_admission_learns_from_finished_requests():
    """on_started / on_finished: the chain counts in flight set the batch width the next prediction uses;
    queue times feed the queue estimate; measured / predicted latency feeds the correction."""
    adm, _ = make_admission()
    first = adm.admit(RouteHints("m:c4"), stats(), 0, 10, api_key=None)
    adm.on_started(first)
    narrow = adm.admit(RouteHints("m:c1"), stats(), 0, 10, api_key=None)
    assert narrow.predicted_s == pytest.approx(10 * STEP[4])  # it joins a 4-chain batch
    adm.on_finished(first, [Finished(arrival=100.0, queue_s=0.3, e2e_s=2 * first.predicted_s)])
    assert adm.inflight.widest == 0 and adm.queue_time.value == 0.3
    assert list(adm.correction.ratios) == [pytest.approx(2.0)]
    adm.on_started(narrow)
    adm.on_finished(narrow, [Finished(arrival=100.0, queue_s=None, e2e_s=None)])  # aborted in the queue
    assert len(adm.correction.ratios) == 1 and adm.queue_time.value == 0.3
