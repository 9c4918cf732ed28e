"""deploy/k8s/gateway: the Gateway API Inference Extension objects line up with each other and with
the colm-serve Deployment (schemas are checked with every manifest in test_k8s.py, against the
vendored upstream CRDs); the picker reads the metrics the server exports (test_metric_names.py checks
them on a live server)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (extra: deploy)")

from .common import GATEWAY, container, epp_flags, gw, k8s_object  # noqa: E402
from .crds import validate_custom_resource  # noqa: E402

def epp_config() -> dict:
    (text,) = gw("ConfigMap")["data"].values()
    return yaml.safe_load(text)


def engine_config() -> dict:
    """The core-metrics-extractor's config of the engine the picker assumes for our pods."""
    (plugin,) = [p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor"]
    params = plugin["parameters"]
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"]]
    return engine


@pytest.mark.parametrize("kind, path, value", [
    ("InferencePool", ("spec", "targetPorts", 0, "number"), "8000"),
    ("InferencePool", ("spec", "endpointPickerRef", "failureMode"), "Open"),
    ("InferencePool", ("spec", "selector", "matchLabel"), {"a": "b"}),
    ("InferenceObjective", ("spec", "priority"), "high"),
    ("HTTPRoute", ("spec", "rules", 0, "backendRef"), []),
])
def test_schemas_reject_mistakes(kind, path, value):
    """The vendored CRD schemas (made strict) catch a wrong type, a bad enum and a misspelt field."""
    doc = copy.deepcopy(GATEWAY[[d["kind"] for d in GATEWAY].index(kind)])
    validate_custom_resource(doc, "1.27.0")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_custom_resource(doc, "1.27.0")


@pytest.mark.parametrize("file", ["deployment.yaml", "gpu/deployment.yaml"])
def test_pool_selects_the_server_pods_on_their_port(file):
    pool = gw("InferencePool")["spec"]
    server = k8s_object("Deployment", file)
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pool["selector"]["matchLabels"].items())
    http = {p["name"]: p["containerPort"] for p in container(server)["ports"]}["http"]
    assert [p["number"] for p in pool["targetPorts"]] == [http]
    # ... and not the picker's own pod.
    epp_labels = gw("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not all(epp_labels.get(k) == v for k, v in pool["selector"]["matchLabels"].items())


def test_pool_points_at_the_picker_service():
    ref = gw("InferencePool")["spec"]["endpointPickerRef"]
    svc, dep = gw("Service", ref["name"]), gw("Deployment")
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    ports = {p["name"]: p["containerPort"] for p in container(dep)["ports"]}
    assert ports[port["targetPort"]] == 9002  # the picker's ext-proc port
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert ref.get("failureMode") == "FailOpen"


def test_picker_rbac():
    """The picker's service account may read pods, the pool and the objectives: nothing more."""
    dep, sa, role, binding = gw("Deployment"), gw("ServiceAccount"), gw("Role"), gw("RoleBinding")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "pods"), ("inference.networking.k8s.io", "inferencepools"),
                       ("inference.networking.x-k8s.io", "inferenceobjectives")}
    assert all(set(rule["verbs"]) == {"get", "watch", "list"} for rule in role["rules"])


def test_picker_flags_and_plugin_config_agree():
    """The legacy flags and the core-metrics-extractor's engine config name the same metrics; the
    pool and the config file are the ones deployed."""
    f, engine = epp_flags(), engine_config()
    assert engine["queuedRequestsSpec"] == f["--total-queued-requests-metric"]
    assert engine["runningRequestsSpec"] == f["--total-running-requests-metric"]
    assert engine["kvUsageSpec"] == f["--kv-cache-usage-percentage-metric"]
    assert engine["loraSpec"] == f["--lora-info-metric"] == ""  # no LoRA adapters
    assert engine["cacheInfoSpec"] == f["--cache-info-metric"] == ""  # no prefix caching
    assert f["--pool-name"] == gw("InferencePool")["metadata"]["name"]
    assert f["--pool-group"] == "inference.networking.k8s.io"
    (mount,) = container(gw("Deployment"))["volumeMounts"]
    assert f["--config-file"].startswith(mount["mountPath"] + "/")
    assert f["--config-file"].rsplit("/", 1)[1] in gw("ConfigMap")["data"]
    cfg = epp_config()
    assert cfg["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in cfg["plugins"]}
    (profile,) = cfg["schedulingProfiles"]
    assert {r["pluginRef"] for r in profile["plugins"]} <= types
    assert {"queue-scorer", "kv-cache-utilization-scorer"} <= {r["pluginRef"] for r in profile["plugins"]}


def test_objectives_are_the_default_tiers():
    """One objective per default tier, same name and priority, all on the pool."""
    from server.tiers import default_tiers

    objectives = {d["metadata"]["name"]: d["spec"] for d in GATEWAY if d["kind"] == "InferenceObjective"}
    tiers = default_tiers(4)
    assert set(objectives) == set(tiers)
    for name, spec in objectives.items():
        assert spec["priority"] == tiers[name].priority, name
        assert spec["poolRef"] == {"group": "inference.networking.k8s.io", "name": gw("InferencePool")["metadata"]["name"]}


def test_route_sends_to_the_pool():
    (rule,) = gw("HTTPRoute")["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": gw("InferencePool")["metadata"]["name"]}]
