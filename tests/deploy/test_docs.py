"""docs/deploy.md stays true to the files it describes."""

from __future__ import annotations

import re

from .common import REPO, alert_rules, container_env, k8s_object
from .dockerfile import env_pairs, parse

DOC = (REPO / "docs" / "deploy.md").read_text()


def test_paths_in_the_doc_exist():
    """Every repository path the doc names in backticks exists."""
    paths = set(re.findall(r"`((?:deploy|tests|docs)/[\w./-]*|Dockerfile)`", DOC))
    assert paths, "the doc names no paths?"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing


def test_every_alert_is_documented():
    """The alert table lists exactly the rules of alerts.yaml."""
    documented = set(re.findall(r"^\| `(Colm\w+)` \|", DOC, re.MULTILINE))
    assert documented == {r["alert"] for r in alert_rules()}


def test_numbers_in_the_doc_match_the_manifests():
    """Grace period, drain timeout, HPA target and the image's defaults as the doc states them."""
    dep = k8s_object("Deployment", "deployment.yaml")
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = container_env(dep)["COLM_DRAIN_TIMEOUT"]
    assert f"terminationGracePeriodSeconds: {grace}" in DOC and f"{drain} s drain" in DOC
    target = k8s_object("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert f"an average of {target} waiting requests" in DOC
    image_env = dict(p for i in parse(REPO / "Dockerfile").final.all("ENV") for p in env_pairs(i.value))
    for key in ("COLM_HOST", "COLM_PORT", "COLM_MODEL", "COLM_DEVICE"):
        assert f"`{key}={image_env[key]}`" in DOC, key
