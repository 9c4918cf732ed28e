"""A phase's records -> the numbers of summary.json (latencies in milliseconds).

Goodput counts requests that met their SLOs: finished (not failed, refused, cancelled or timed out),
within their own latency budget if they had one, and within the optional TTFT / TPOT targets
(vLLM's --goodput). Per chain count groups requests by the chain count the server admitted them at
(its `colm` report); requests without a report (refused, or another server) fall under "unknown".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from loadtests.client import CANCELLED, ERROR, OK, PENDING, REJECTED, RequestRecord
from loadtests.runner import PhaseResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Optional per-token targets on top of each request's own latency budget (milliseconds)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, rec: RequestRecord) -> bool:
        if rec.outcome != OK or rec.budget_met is False:
            return False
        if self.ttft_ms is not None and (rec.ttft_s is None or rec.ttft_s * 1000 > self.ttft_ms):
            return False
        tpot = rec.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


def percentiles(values_s: list[float]) -> dict:
    """p50/p90/p99 and mean in milliseconds (None when there is nothing to summarise)."""
    if not values_s:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    ms = np.asarray(values_s) * 1000
    out = {f"p{p}": round(float(np.percentile(ms, p)), 3) for p in PERCENTILES}
    return out | {"mean": round(float(ms.mean()), 3)}


def latency_block(records: list[RequestRecord]) -> dict:
    """Count and TTFT / TPOT / ITL / e2e percentiles of finished requests, and the budget-met share."""
    done = [r for r in records if r.outcome == OK]
    budgeted = [r for r in records if r.budget_ms is not None and r.outcome != CANCELLED]
    met = sum(1 for r in budgeted if r.budget_met)
    return {
        "count": len(records), "completed": len(done),
        "ttft_ms": percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": percentiles([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": percentiles([x for r in done for x in r.itl_s]),
        "e2e_ms": percentiles([r.e2e_s for r in done if r.e2e_s is not None]),
        "budgeted": len(budgeted), "budget_met": met,
        "budget_met_share": round(met / len(budgeted), 4) if budgeted else None,
    }


def _error_samples(records: list[RequestRecord], limit: int = 5) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r.error and r.outcome in (ERROR, REJECTED) and r.error not in seen:
            seen.append(r.error)
    return seen[:limit]


def summarise(phase: PhaseResult, slo: SLO = SLO()) -> dict:
    """Everything summary.json says about one phase."""
    recs = phase.records
    outcomes = Counter(r.outcome for r in recs)
    duration = max(phase.ended - phase.started, 1e-9)
    sending = max(phase.sending_ended - phase.started, 1e-9)
    out_tokens = sum(r.tokens for r in recs if r.outcome in (OK, CANCELLED))
    good = sum(1 for r in recs if slo.met(r))
    chosen = Counter(str(r.chains) for r in recs if r.chains is not None)
    offered = phase.spec.offered_rate
    return {
        "name": phase.name, "mode": phase.mode, "spec": phase.spec.to_dict(),
        "offered_rate_rps": offered if offered is not None else round(len(recs) / sending, 4),
        "offered_rate_kind": "open loop" if offered is not None else "closed loop (achieved send rate)",
        "achieved_send_rate_rps": round(len(recs) / sending, 4),
        # Open loop: how late the client sent (a saturated client lowers the real offered load).
        "send_lag_ms": percentiles([r.sent_at - phase.started - r.planned_s for r in recs])
        if offered is not None else None,
        "requests": len(recs), "completed": outcomes[OK], "errors": outcomes[ERROR],
        "rejected": outcomes[REJECTED], "cancelled": outcomes[CANCELLED], "timed_out": outcomes[PENDING],
        "error_samples": _error_samples(recs),
        "duration_s": round(duration, 3),
        "request_throughput_rps": round(outcomes[OK] / duration, 4),
        "output_tokens": out_tokens,
        "throughput_tokens_per_s": round(out_tokens / duration, 3),
        "good_requests": good,
        "goodput_requests_per_s": round(good / duration, 4),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "per_request_budget": True},
        "chosen_chains": dict(sorted(chosen.items())),
        "route_reasons": dict(Counter(r.reason for r in recs if r.reason)),
        "degraded": sum(1 for r in recs if r.reason == "degraded"),
        "shrunk_while_running": sum(1 for r in recs if r.final_chains is not None and r.chains is not None
                                    and r.final_chains < r.chains),
        "prediction": prediction_error(recs),
        "overall": latency_block(recs),
        "per_chains": per_chains(recs),
    }


def prediction_error(records: list[RequestRecord]) -> dict | None:
    """How the server's predicted latency (its `colm` report) compares with what the client measured:
    percentiles of measured / predicted over finished requests (None when the server predicts nothing)."""
    ratios = [r.e2e_s * 1000 / r.predicted_ms for r in records
              if r.outcome == OK and r.e2e_s is not None and r.predicted_ms]
    if not ratios:
        return None
    q = np.percentile(ratios, PERCENTILES)
    return {"measured_over_predicted": {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, q)},
            "count": len(ratios)}


def per_chains(records: list[RequestRecord]) -> dict:
    """latency_block of each admitted chain count ("unknown": no `colm` report)."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(str(r.chains) if r.chains is not None else "unknown", []).append(r)
    return {k: latency_block(v) for k, v in sorted(groups.items())}


def combine(results: list[PhaseResult], phases: list[dict]) -> dict:
    """Run-level totals over every phase (rates over the summed phase durations; per chain count
    over every record of the run)."""
    duration = sum(p["duration_s"] for p in phases) or 1e-9
    keys = ("requests", "completed", "errors", "rejected", "cancelled", "timed_out", "output_tokens",
            "good_requests")
    total = {k: sum(p[k] for p in phases) for k in keys}
    return total | {
        "duration_s": round(duration, 3),
        "throughput_tokens_per_s": round(total["output_tokens"] / duration, 3),
        "goodput_requests_per_s": round(total["good_requests"] / duration, 4),
        "per_chains": per_chains([r for res in results for r in res.records]),
    }
