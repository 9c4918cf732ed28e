"""deploy/k8s: schema validation (kubernetes-validate for built-in kinds, structural schemas for the
CRDs) and the cross-references between the objects that no schema can see."""

from __future__ import annotations

import copy

import jsonschema
import pytest

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (extra: deploy)")

from .common import (DEPLOY, KEDA, REPO, adapter_rules, container, container_env, k8s_object,  # noqa: E402
                     k8s_objects, load_docs)
from .crds import SCHEMAS, validate_custom_resource  # noqa: E402
from .dockerfile import parse  # noqa: E402

# The oldest Kubernetes we support (autoscaling/v2 and policy/v1 are GA there) and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ["1.27.0", kv.utils.latest_version()]
OBJECTS = k8s_objects()


def _validate(doc: dict, version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in SCHEMAS:
        validate_custom_resource(doc, version)
    else:
        kv.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("file,doc", OBJECTS, ids=[f"{f}:{d['kind']}" for f, d in OBJECTS])
def test_manifest_validates(file, doc, version):
    """Built-in kinds against the Kubernetes schemas (strict: unknown fields fail); the CRD kinds
    (ServiceMonitor, PrometheusRule, ScaledObject) against tests/deploy/crds.py."""
    _validate(doc, version)


def test_every_kind_is_covered():
    """A manifest of a kind neither kubernetes-validate nor crds.py knows fails here, not silently."""
    kinds = {(d["apiVersion"], d["kind"]) for _, d in OBJECTS}
    assert {("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"), ("monitoring.coreos.com/v1", "ServiceMonitor")} <= kinds
    for api, kind in kinds - set(SCHEMAS):
        try:
            kv.validate({"apiVersion": api, "kind": kind, "metadata": {"name": "x"}}, K8S_VERSIONS[-1], strict=True)
        except kv.utils.SchemaNotFoundError:
            pytest.fail(f"{api} {kind} has no schema: add one to tests/deploy/crds.py")
        except kv.utils.ValidationError:
            pass  # a schema exists (it rightly rejects this stub)


@pytest.mark.parametrize("mutate", ["typo", "type"])
def test_validation_can_fail(mutate):
    """The checks above reject a broken Deployment and a broken ServiceMonitor."""
    dep = copy.deepcopy(k8s_object("Deployment", "deployment.yaml"))
    sm = copy.deepcopy(k8s_object("ServiceMonitor"))
    if mutate == "typo":
        c = container(dep)
        c["readinesProbe"] = c.pop("readinessProbe")
        sm["spec"]["endpoint"] = sm["spec"].pop("endpoints")
    else:
        dep["spec"]["replicas"] = "two"
        sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        _validate(dep, K8S_VERSIONS[-1])
    with pytest.raises(jsonschema.ValidationError):
        _validate(sm, K8S_VERSIONS[-1])


def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("file", ["deployment.yaml", "gpu/deployment.yaml"])
def test_selectors_and_ports_line_up(file):
    """Service, PDB and ServiceMonitor select the pods; the probes and the Service use the named
    port that the server listens on."""
    dep = k8s_object("Deployment", file)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _selects(dep["spec"]["selector"], pod_labels)
    svc = k8s_object("Service", "service.yaml")
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert _selects(k8s_object("PodDisruptionBudget")["spec"]["selector"], pod_labels)
    sm = k8s_object("ServiceMonitor")
    assert _selects(sm["spec"]["selector"], svc["metadata"]["labels"])
    svc_port = {p["name"]: p for p in svc["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http"] and "http" in svc_port
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert svc_port["http"]["targetPort"] == "http" and ports["http"] == int(container_env(dep)["COLM_PORT"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("file", ["deployment.yaml", "gpu/deployment.yaml"])
def test_termination_covers_prestop_and_drain(file):
    """The kubelet's SIGKILL comes terminationGracePeriodSeconds after preStop starts: it must
    leave the preStop sleep plus the server's whole drain timeout, with a margin to exit."""
    from server.settings import ServerSettings

    dep = k8s_object("Deployment", file)
    c = container(dep)
    drain = float(container_env(dep).get("COLM_DRAIN_TIMEOUT") or ServerSettings.model_fields["drain_timeout"].default)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain + 5


def _compose_grace_seconds() -> tuple[float, float]:
    (compose,) = load_docs(DEPLOY / "compose.yaml")
    svc = compose["services"]["colm"]
    assert svc["stop_grace_period"].endswith("s")
    return float(svc["stop_grace_period"][:-1]), float(svc["environment"]["COLM_DRAIN_TIMEOUT"])


def test_compose_stop_grace_covers_drain():
    """`docker compose stop` waits longer than the server drains."""
    grace, drain = _compose_grace_seconds()
    assert grace > drain


def test_upgrades_keep_capacity():
    """Rolling updates add a pod before removing one; disruptions take one pod at a time; the
    autoscaler never goes under two replicas (so the PDB can always let one go)."""
    dep = k8s_object("Deployment", "deployment.yaml")
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"].get("maxUnavailable") == 1
    hpa = k8s_object("HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2 and dep["spec"]["replicas"] >= hpa["spec"]["minReplicas"]


def test_pod_runs_as_the_image_user():
    """runAsUser is the Dockerfile's numeric USER, and not root."""
    user = parse(REPO / "Dockerfile").final.last("USER").value.split(":")[0]
    for file in ("deployment.yaml", "gpu/deployment.yaml"):
        pod = k8s_object("Deployment", file)["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == user != "0"


def test_gpu_variant_differs_only_in_device_fields():
    """gpu/deployment.yaml is deployment.yaml plus a GPU: image, device, KV budget, resources,
    node placement. Anything else (probes, drain, security) must not drift."""
    cpu = copy.deepcopy(k8s_object("Deployment", "deployment.yaml"))
    gpu = copy.deepcopy(k8s_object("Deployment", "gpu/deployment.yaml"))
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container_env(gpu)["COLM_DEVICE"] == "cuda" and container_env(cpu)["COLM_DEVICE"] == "cpu"
    assert gpu["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    for dep in (cpu, gpu):
        spec = dep["spec"]["template"]["spec"]
        spec.pop("nodeSelector", None)
        spec.pop("tolerations", None)
        c = container(dep)
        for key in ("image", "resources"):
            c.pop(key)
        c["env"] = [e for e in c["env"] if e["name"] not in ("COLM_DEVICE", "COLM_KV_CACHE_MEMORY")]
    assert cpu == gpu


def test_server_settings_accept_the_manifest_env(plain_model_dir):
    """Every COLM_* variable in the Deployments, the compose file and the Dockerfile is a setting of
    `colm serve`, and its value passes the server's own validation."""
    from server.settings import ServerSettings

    fields = ServerSettings.model_fields
    sources = {f: container_env(k8s_object("Deployment", f)) for f in ("deployment.yaml", "gpu/deployment.yaml")}
    (compose,) = load_docs(DEPLOY / "compose.yaml")
    sources["compose.yaml"] = dict(compose["services"]["colm"]["environment"])
    final = parse(REPO / "Dockerfile").final
    from .dockerfile import env_pairs

    sources["Dockerfile"] = dict(p for i in final.all("ENV") for p in env_pairs(i.value))
    for where, env in sources.items():
        values = {}
        for name, value in env.items():
            if not name.startswith("COLM_"):
                continue
            key = name.removeprefix("COLM_").lower()
            assert key in fields, f"{where}: {name} is not a ServerSettings field"
            if value is not None and key != "model":  # the model path exists only in the image
                values[key] = value
        ServerSettings(model=plain_model_dir, **values)


def test_autoscaling_metric_is_the_adapter_metric():
    """The HPA's pods metric is the one the prometheus-adapter rule serves, built from the series
    the server exports (tests/deploy/test_metric_names.py checks it on a live server)."""
    hpa = k8s_object("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s_object("Deployment", "deployment.yaml")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    served = {r["name"]["as"]: r for r in adapter_rules()}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
    rule = served[metric["pods"]["metric"]["name"]]
    assert rule["seriesQuery"].startswith("colm_requests_waiting{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    (scaled,) = load_docs(KEDA)
    assert scaled["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
    assert "colm_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_prometheus_rule_is_the_alert_file():
    """The PrometheusRule carries exactly the rules of deploy/prometheus/alerts.yaml."""
    (alerts,) = load_docs(DEPLOY / "prometheus" / "alerts.yaml")
    assert k8s_object("PrometheusRule")["spec"] == alerts
