"""Prometheus config and alert rules (promtool from Debian's `prometheus` package: check config,
check rules, and the alert unit tests in tests/deploy/promtool/), the Grafana provisioning and
dashboard, and the compose file that wires them to the server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .common import ALERTS, DASHBOARD, DEPLOY, PROMETHEUS_CONFIG, alert_rules, dashboard_queries, load_docs, \
    require_tool
from .promql import references

PROMTOOL_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = require_tool(shutil.which("promtool"), "promtool", "apt-get install --no-install-recommends prometheus")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_checks_config_and_rules():
    """prometheus.yml is a valid config (it also loads alerts.yaml) and the rules parse."""
    out = _promtool("check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_CONFIG.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    out = _promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert out.returncode == 0 and f"{len(alert_rules())} rules found" in out.stdout, out.stdout + out.stderr


def test_alerts_fire_when_they_should():
    """promtool's rule unit tests: each alert fires on its trouble and not on a healthy twin."""
    out = _promtool("test", "rules", PROMTOOL_TESTS.name, cwd=PROMTOOL_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert needs a promtool test"


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check can fail: a rule with a PromQL syntax error is refused."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum(rate(colm_requests_total[5m])\n")
    assert _promtool("check", "rules", bad.name, cwd=tmp_path).returncode != 0


def test_alert_rules_structure():
    """Without promtool too: every alert has an expression that reads a metric, a severity and a
    summary, and names are unique."""
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    expected = {"ColmServerDown", "ColmLatencyBudgetMisses", "ColmKVCacheNearFull", "ColmQueueGrowing"}
    assert expected <= {r["alert"] for r in rules}
    for r in rules:
        assert references(r["expr"])[0], r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"]


def test_scrape_job_is_what_the_alerts_and_kubernetes_use():
    """`up{job="colm-serve"}` matches both the compose scrape job and the Service the
    ServiceMonitor scrapes (the operator names the job after the Service)."""
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = cfg["scrape_configs"]
    (svc,) = [d for d in load_docs(DEPLOY / "k8s" / "service.yaml")]
    assert job["job_name"] == svc["metadata"]["name"]
    assert cfg["rule_files"] == [ALERTS.name]
    down = next(r for r in alert_rules() if r["alert"] == "ColmServerDown")
    assert f'job="{job["job_name"]}"' in down["expr"]


def test_compose_wires_server_prometheus_grafana():
    """Prometheus scrapes the compose service on its container port; the mounted directories exist
    and hold what the configs point at; Grafana's data source is the Prometheus service."""
    (compose,) = load_docs(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"colm", "prometheus", "grafana"}
    assert services["colm"]["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").is_file()
    assert "8000:8000" in services["colm"]["ports"]
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["colm:8000"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            src, dst = volume.split(":")[:2]
            if src.startswith("."):
                assert (DEPLOY / src).is_dir(), volume
                mounts[dst] = DEPLOY / src
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    ds = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards" / "colm.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (mounts[path] / DASHBOARD.name).is_file()
    for service in services.values():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, "pin every image"


def test_dashboard_structure():
    """Valid JSON with unique panel ids, the provisioned data source everywhere, panels inside the
    24-column grid, and a query in every panel."""
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == uid and t["expr"] for t in p["targets"]), p["title"]


def test_dashboard_covers_the_issue():
    """Traffic and TTFT / TPOT / end-to-end percentiles per chain count, queue depth, KV usage per
    chain pool, downgrades by reason, budget misses and rejections each have a query."""
    queries = dashboard_queries()

    def grouped_by(metric: str, label: str) -> bool:
        return any(metric in references(q)[0] and label in references(q)[2] for q in queries)

    for hist in ("colm_time_to_first_token_seconds", "colm_time_per_output_token_seconds",
                 "colm_e2e_request_latency_seconds"):
        quantiles = {q.split(",")[0] for q in queries if f"{hist}_bucket" in q}
        assert quantiles == {f"histogram_quantile({x}" for x in ("0.5", "0.95", "0.99")}, hist
        assert grouped_by(f"{hist}_bucket", "chains") and grouped_by(f"{hist}_bucket", "le")
    assert grouped_by("colm_requests_total", "chains")
    assert grouped_by("colm_kv_cache_usage_ratio", "chain")
    assert grouped_by("colm_chain_downgrades_total", "reason")
    assert grouped_by("colm_rejected_requests_total", "reason")
    used = set().union(*(references(q)[0] for q in queries))
    assert {"colm_requests_waiting", "colm_latency_budget_misses_total"} <= used


@pytest.mark.parametrize("path", sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_grafana_provisioning_parses(path):
    """Provisioning files are Grafana's apiVersion 1 documents."""
    assert yaml.safe_load(path.read_text())["apiVersion"] == 1
