"""Shared paths, loaders and tool lookup for the deployment checks (Dockerfile, deploy/, docs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "colm-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ADAPTER = K8S_DIR / "prometheus-adapter.yaml"
KEDA = K8S_DIR / "keda" / "scaledobject.yaml"
# CI installs every tool these tests use; on a developer machine a missing tool skips its test.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(path: str | None, what: str, install: str) -> str:
    """The tool's path; in CI a missing tool fails the test, elsewhere it skips it."""
    if path:
        return path
    message = f"{what} is not installed ({install})"
    if IN_CI:
        pytest.fail(message + ": CI must install it")
    pytest.skip(message)


def load_docs(path: Path) -> list[dict]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_files() -> list[Path]:
    """Every manifest under deploy/k8s (the GPU and KEDA variants included)."""
    return sorted(K8S_DIR.rglob("*.yaml"))


def k8s_objects() -> list[tuple[str, dict]]:
    """(file relative to deploy/k8s, object) for every manifest document."""
    return [(p.relative_to(K8S_DIR).as_posix(), d) for p in k8s_files() for d in load_docs(p)]


def k8s_object(kind: str, file: str | None = None) -> dict:
    """The one object of this kind (in `file`, when several files have one)."""
    found = [d for f, d in k8s_objects() if d["kind"] == kind and (file is None or f == file)]
    assert len(found) == 1, f"expected one {kind} in {file or 'deploy/k8s'}, found {len(found)}"
    return found[0]


def container(deployment: dict) -> dict:
    """The server container of a Deployment."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the CoLM pod runs one container"
    return containers[0]


def container_env(deployment: dict) -> dict[str, str | None]:
    """name -> literal value (None for values from secrets and other references)."""
    return {e["name"]: e.get("value") for e in container(deployment).get("env", [])}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard (panels, rows included)."""
    dash = json.loads(DASHBOARD.read_text())
    panels = list(dash["panels"])
    for p in dash["panels"]:
        panels.extend(p.get("panels", []))
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    """Every rule of deploy/prometheus/alerts.yaml."""
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def adapter_rules() -> list[dict]:
    """The prometheus-adapter rules embedded in its ConfigMap."""
    (cm,) = load_docs(ADAPTER)
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


# The Gateway API Inference Extension objects (deploy/k8s/gateway/).
GATEWAY = [d for f, d in k8s_objects() if f.startswith("gateway/")]


def gw(kind: str, name: str | None = None) -> dict:
    """The one object of this kind (and name) in deploy/k8s/gateway/."""
    found = [d for d in GATEWAY if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s/gateway, found {len(found)}"
    return found[0]


def epp_flags() -> dict[str, str]:
    """The endpoint picker's `--flag value` / `--flag=value` arguments."""
    args, flags, i = container(gw("Deployment"))["args"], {}, 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if eq:
            flags[name] = value
            i += 1
        else:
            flags[name] = args[i + 1]
            i += 2
    return flags


def picker_metric_specs() -> dict[str, str]:
    """What the picker reads, by the model server protocol's name, from its flags (test_gateway.py
    checks that its plugin config says the same)."""
    f = epp_flags()
    return {"TotalQueuedRequests": f["--total-queued-requests-metric"],
            "TotalRunningRequests": f["--total-running-requests-metric"],
            "KVCacheUtilization": f["--kv-cache-usage-percentage-metric"]}
