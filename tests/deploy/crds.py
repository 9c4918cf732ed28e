"""Structural schemas for the custom resources in deploy/k8s (kubernetes-validate knows only the
built-in kinds). Written for this repository from the fields documented by the Prometheus Operator
(monitoring.coreos.com/v1 ServiceMonitor, PrometheusRule) and KEDA (keda.sh/v1alpha1 ScaledObject):
they cover the fields we use, reject unknown ones (so a typo fails), and reuse the Kubernetes
definitions shipped with kubernetes-validate for the embedded built-in types (ObjectMeta,
LabelSelector, the HPA behavior). They are not the operators' full OpenAPI schemas.

The Gateway API Inference Extension's kinds (InferencePool, InferenceObjective) are checked against
their upstream CRDs, vendored in tests/deploy/vendor/ (release v1.5.0): the openAPIV3Schema of each
served version, made strict (an object that lists its properties rejects others, as the API server's
pruning would silently drop them). CEL rules (x-kubernetes-validations) are not evaluated.
HTTPRoute (Gateway API) has a hand-written schema like the operators' kinds.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                         r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(required: list[str], **properties) -> dict:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return _obj(["apiVersion", "kind", "metadata", "spec"],
                apiVersion={"const": api_version}, kind={"const": kind},
                metadata={"$ref": K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}, spec=spec)


_ENDPOINT = _obj(["port"], port={"type": "string"}, path={"type": "string", "pattern": "^/"},
                 scheme={"enum": ["http", "https"]}, interval=DURATION, scrapeTimeout=DURATION,
                 honorLabels={"type": "boolean"})
SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", _obj(
    ["selector", "endpoints"],
    selector={"$ref": K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
    namespaceSelector=_obj([], any={"type": "boolean"}, matchNames={"type": "array", "items": {"type": "string"}}),
    jobLabel={"type": "string"},
    endpoints={"type": "array", "minItems": 1, "items": _ENDPOINT}))

_RULE = {"oneOf": [
    _obj(["alert", "expr"], alert={"type": "string", "minLength": 1}, expr={"type": "string", "minLength": 1},
         annotations=STR_MAP, labels=STR_MAP, **{"for": DURATION, "keep_firing_for": DURATION}),
    _obj(["record", "expr"], record={"type": "string", "minLength": 1}, expr={"type": "string", "minLength": 1},
         labels=STR_MAP)]}
PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", _obj(
    ["groups"], groups={"type": "array", "minItems": 1, "items": _obj(
        ["name", "rules"], name={"type": "string", "minLength": 1}, interval=DURATION,
        rules={"type": "array", "items": _RULE})}))

_TRIGGER = _obj(["type", "metadata"], type={"type": "string"}, name={"type": "string"},
                metadata=STR_MAP, metricType={"enum": ["AverageValue", "Value", "Utilization"]})
SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", _obj(
    ["scaleTargetRef", "triggers"],
    scaleTargetRef=_obj(["name"], apiVersion={"type": "string"}, kind={"type": "string"},
                        name={"type": "string"}, envSourceContainerName={"type": "string"}),
    minReplicaCount={"type": "integer", "minimum": 0}, maxReplicaCount={"type": "integer", "minimum": 1},
    pollingInterval={"type": "integer", "minimum": 1}, cooldownPeriod={"type": "integer", "minimum": 0},
    idleReplicaCount={"type": "integer", "minimum": 0},
    advanced=_obj([], restoreToOriginalReplicaCount={"type": "boolean"},
                  horizontalPodAutoscalerConfig=_obj(
                      [], name={"type": "string"},
                      behavior={"$ref": K8S + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"})),
    triggers={"type": "array", "minItems": 1, "items": _TRIGGER}))

_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PARENT_REF = _obj(["name"], group={"type": "string"}, kind={"type": "string"}, name=_NAME,
                   namespace={"type": "string"}, sectionName={"type": "string"},
                   port={"type": "integer", "minimum": 1, "maximum": 65535})
_BACKEND_REF = _obj(["name"], group={"type": "string"}, kind={"type": "string"}, name=_NAME,
                    namespace={"type": "string"}, port={"type": "integer", "minimum": 1, "maximum": 65535},
                    weight={"type": "integer", "minimum": 0})
_MATCH = _obj([], path=_obj([], type={"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                            value={"type": "string"}),
              method={"type": "string"},
              headers={"type": "array", "items": _obj(["name", "value"], type={"enum": ["Exact", "RegularExpression"]},
                                                      name={"type": "string"}, value={"type": "string"})})
HTTP_ROUTE = _resource("gateway.networking.k8s.io/v1", "HTTPRoute", _obj(
    [], parentRefs={"type": "array", "items": _PARENT_REF}, hostnames={"type": "array", "items": {"type": "string"}},
    rules={"type": "array", "items": _obj(
        [], matches={"type": "array", "items": _MATCH}, backendRefs={"type": "array", "items": _BACKEND_REF},
        timeouts=_obj([], request=DURATION, backendRequest=DURATION))}))

VENDOR = Path(__file__).parent / "vendor" / "gateway-api-inference-extension"


def _strict(node):
    """A copy in which every object schema that lists its properties rejects unknown ones."""
    if isinstance(node, list):
        return [_strict(i) for i in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if k != "properties"}
    if "properties" in node:
        out["properties"] = {name: _strict(sub) for name, sub in node["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def vendored_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict schema of each served version of the vendored CRDs."""
    out = {}
    for path in sorted(VENDOR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"$ref": K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
                schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec"} & set(schema["properties"]))
                out[(f"{group}/{version['name']}", kind)] = schema
    return out


SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
           ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
           ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
           ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
           **vendored_schemas()}


def _registry(k8s_version: str) -> Registry:
    path = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{k8s_version}-local-strict/_definitions.json")
    definitions = Resource.from_contents(json.loads(path.read_text()))
    return definitions @ Registry()


def validate_custom_resource(doc: dict, k8s_version: str) -> None:
    """Raise jsonschema.ValidationError if `doc` breaks its CRD's structural schema; KeyError if
    its kind has no schema here."""
    schema = SCHEMAS[(doc["apiVersion"], doc["kind"])]
    jsonschema.Draft202012Validator(schema, registry=_registry(k8s_version)).validate(doc)
