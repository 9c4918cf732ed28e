"""Every metric (and label) that the dashboard, the alerts and the autoscaling queries read is one the
running server exports: a real `colm serve` on a loopback port, some traffic at every chain count,
then a live /metrics read with prometheus_client's parser."""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .common import (DASHBOARD, KEDA, REPO, adapter_rules, alert_rules, dashboard_queries, load_docs,
                     picker_metric_specs)
from .promql import SYNTHETIC_METRICS, TARGET_LABELS, references
from .server_process import ServerProcess, free_port

if not (REPO / "server" / "cli.py").exists():
    pytest.skip("server/ (the HTTP server issue) has not landed yet", allow_module_level=True)

_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created", ""), "info": ("_info",), "unknown": ("",)}


class Exported:
    """What one /metrics answer offers: sample names (also of families with no sample yet), and
    per sample name the label names and values seen."""

    def __init__(self, text: str):
        self.names: set[str] = set()
        self.labels: dict[str, dict[str, set[str]]] = {}
        self.types: dict[str, str] = {}  # family name -> type
        self.values: dict[str, float] = {}  # sample name -> value, for samples without labels
        for fam in text_string_to_metric_families(text):
            self.names.update(fam.name + s for s in _SUFFIXES[fam.type])
            self.types[fam.name] = fam.type
            for sample in fam.samples:
                if not sample.labels:
                    self.values[sample.name] = sample.value
                seen = self.labels.setdefault(sample.name, {})
                for k, v in sample.labels.items():
                    seen.setdefault(k, set()).add(v)

    def label_names(self, metric: str) -> set[str]:
        """Labels of the metric's samples (a histogram's _bucket also has `le`)."""
        return set(self.labels.get(metric, {}))


@pytest.fixture(scope="module")
def exported(plain_model_dir, tmp_path_factory) -> Exported:
    """Start the server, send traffic that touches every family, read /metrics once."""
    port = free_port()
    log_dir = tmp_path_factory.mktemp("metrics-server")
    server = ServerProcess([sys.executable, "-m", "colm_runtime.cli", "serve", "--host", "127.0.0.1",
                            "--port", str(port), "--model", str(plain_model_dir), "--kv-cache-memory", "4MiB"],
                           env={**_clean_env(), "PYTHONUNBUFFERED": "1"}, port=port, cwd=log_dir,
                           log=log_dir / "server.log")
    try:
        base = server.wait_ready(timeout=120).json()["model"]
        chains = httpx.get(server.url + "/ready").json()["chains"]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for k in range(1, chains + 1):
                r = client.post("/v1/completions", json={"model": f"{base}:c{k}", "prompt": "Hello there",
                                                         "max_tokens": 3, "temperature": 0})
                assert r.status_code == 200, r.text
            # A budget no request can meet (a miss), and a client mistake (a rejection).
            r = client.post("/v1/completions", json={"model": base, "prompt": "Hi", "max_tokens": 3,
                                                     "latency_budget_ms": 1})
            assert r.status_code == 200, r.text
            # All chains by tier, but a budget they miss: degraded (to the picker, a degrading replica).
            r = client.post("/v1/completions", json={"model": base, "prompt": "Hi", "max_tokens": 3,
                                                     "tier": "premium", "latency_budget_ms": 1})
            assert r.status_code == 200 and r.json()["colm"]["degrade_reasons"], r.text
            bad = client.post("/v1/completions", json={"model": base, "prompt": "Hi", "tier": "nope"})
            assert bad.status_code == 400, bad.text
            text = client.get("/metrics").text
        return Exported(text)
    finally:
        server.terminate(timeout=60)


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("COLM_")}


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query we ship."""
    out = [(f"dashboard: {q}", q) for q in dashboard_queries()]
    out += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    out += [(f"prometheus-adapter: {r['seriesQuery']}", r["seriesQuery"]) for r in adapter_rules()]
    out += [(f"prometheus-adapter: {r['metricsQuery']}", r["metricsQuery"]) for r in adapter_rules()]
    (scaled,) = load_docs(KEDA)
    out += [(f"KEDA: {t['metadata']['query']}", t["metadata"]["query"]) for t in scaled["spec"]["triggers"]]
    return out


def _dashboard_variables() -> list[tuple[str, str]]:
    """Grafana's label_values(metric, label) template queries."""
    out = []
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, f"unsupported variable query {var['query']}"
        out.append(m.groups())
    return out


def test_every_query_metric_is_exported(exported):
    """No panel, alert or autoscaler reads a metric the server does not export."""
    missing = []
    for where, expr in _queries():
        metrics, _, _ = references(expr)
        missing += [f"{m} ({where})" for m in metrics - exported.names - SYNTHETIC_METRICS]
    missing += [f"{m} (dashboard variable)" for m, _ in _dashboard_variables() if m not in exported.names]
    assert not missing, "not exported by the server:\n" + "\n".join(missing)


def test_every_query_label_is_exported(exported):
    """Labels in matchers exist on their metric, and grouping labels on one of the expression's
    metrics (target labels like instance or pod come from Prometheus, not /metrics)."""
    problems = []
    for where, expr in _queries():
        metrics, matched, grouping = references(expr)
        metrics -= SYNTHETIC_METRICS
        have = set().union(*(exported.label_names(m) for m in metrics)) if metrics else set()
        for m, labels in matched.items():
            if m in SYNTHETIC_METRICS:
                continue
            problems += [f"{m}{{{lb}}} ({where})" for lb in labels - exported.label_names(m) - TARGET_LABELS]
        if metrics:
            problems += [f"by {lb} ({where})" for lb in grouping - have - TARGET_LABELS]
    assert not problems, "labels the server does not export:\n" + "\n".join(problems)


def test_referenced_families_have_samples(exported):
    """The traffic above produced a sample for every family the queries read, so the label check
    had something to look at (a family with only HELP/TYPE lines would pass it vacuously)."""
    empty = sorted({m for _, expr in _queries() for m in references(expr)[0] - SYNTHETIC_METRICS
                    if m not in exported.labels})
    assert not empty, f"no samples after traffic: {empty}"


def test_matched_label_values_exist(exported):
    """`reason=~"queue_full|draining"`-style matchers name values the server really uses."""
    pattern = re.compile(r'(colm_\w+)\{([^}]*)\}')
    problems = []
    for where, expr in _queries():
        for metric, body in pattern.findall(expr):
            for label, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', body):
                if label in TARGET_LABELS or "$" in value:
                    continue
                values = exported.labels.get(metric, {}).get(label, set())
                problems += [f'{metric}{{{label}="{v}"}} ({where})' for v in value.split("|") if v not in values]
    assert not problems, "label values the server never exports:\n" + "\n".join(problems)


def test_issue_metrics_are_exported(exported):
    """The metrics the HTTP server issue promises, which the dashboard is built on."""
    promised = {"colm_requests_running", "colm_requests_waiting", "colm_kv_cache_usage_ratio",
                "colm_time_to_first_token_seconds_bucket", "colm_time_per_output_token_seconds_bucket",
                "colm_e2e_request_latency_seconds_bucket", "colm_request_queue_time_seconds_bucket",
                "colm_prompt_tokens_total", "colm_generation_tokens_total", "colm_requests_total",
                "colm_chain_downgrades_total", "colm_latency_budget_misses_total", "colm_preemptions_total",
                "colm_rejected_requests_total"}
    assert promised <= exported.names, promised - exported.names
    assert "chains" in exported.label_names("colm_time_to_first_token_seconds_bucket")
    assert "chain" in exported.label_names("colm_kv_cache_usage_ratio")


def test_endpoint_picker_reads_exported_gauges(exported):
    """The Gateway API Inference Extension's picker (deploy/k8s/gateway/epp.yaml) reads gauges, as its
    model server protocol requires, that the server exports with the labels its specs match."""
    for what, spec in picker_metric_specs().items():
        name, _, labels = spec.partition("{")
        assert exported.types.get(name) == "gauge", f"{what}: {name} is not an exported gauge"
        for pair in filter(None, labels.rstrip("}").split(",")):
            label, value = (x.strip().strip('"') for x in pair.split("="))
            assert value in exported.labels.get(name, {}).get(label, set()), f"{what}: {spec}"


def test_degrading_replica_reads_as_full_to_the_picker(exported):
    """Of the two unpinned requests above (routed by budget; by tier with a budget it misses), one
    was degraded: the share of degraded admissions is 1/2, and the KV gauge the picker reads is
    raised to it above the pools' usage (the pools are nearly empty after that little traffic)."""
    v = exported.values
    assert v["colm_degraded_requests_ratio"] == 0.5
    assert v["colm_kv_cache_usage_max_ratio"] < 0.5
    assert v["colm_epp_kv_cache_usage_ratio"] == 0.5
