"""Metric and label names that a PromQL expression reads, without a full PromQL parser.

Enough for our dashboard, alerts and autoscaling queries: strings, range selectors, Grafana
variables and prometheus-adapter templates are blanked out, then every identifier that is not a
function, keyword or label is a metric name. Label names come from `{...}` matchers (attached to
their metric) and from by/without/on/ignoring/group_* lists (checked against the expression's metrics).
"""

from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "atan2", "topk", "bottomk"}
# Labels that Prometheus adds to every scraped series (target labels), or that Kubernetes service
# discovery adds: they are never in /metrics itself.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "endpoint", "container", "node"}
# Series Prometheus itself makes for each target.
SYNTHETIC_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_TEMPLATE = re.compile(r"<<[^>]*>>")  # prometheus-adapter's <<.Series>>, <<.LabelMatchers>>
_RANGE = re.compile(r"\[[^\]]*\]")
_GRAFANA_VAR = re.compile(r"\$\{?\w+\}?")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?!\w)")


def _blank_strings(expr: str) -> str:
    return _STRING.sub('""', _TEMPLATE.sub(" ", expr))


def references(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, labels matched per metric, labels used for grouping) of one expression."""
    # Label matchers keep their strings until their label names are read.
    no_templates = _GRAFANA_VAR.sub(" ", _TEMPLATE.sub(" ", expr))
    matched: dict[str, set[str]] = {}
    for metric, body in _SELECTOR.findall(no_templates):
        labels = set(_MATCHER_LABEL.findall(_STRING.sub('""', body)))
        matched.setdefault(metric or "", set()).update(labels)
    text = _blank_strings(no_templates)
    grouping: set[str] = set()
    for _, body in _GROUPING.findall(text):
        grouping.update(x.strip() for x in body.split(",") if x.strip())
    text = _GROUPING.sub(" ", text)
    text = _SELECTOR.sub(lambda m: " " + (m.group(1) or "") + " ", text)
    text = _RANGE.sub(" ", text)
    metrics = set()
    for m in _IDENT.finditer(text):
        name = m.group(1)
        after = text[m.end():].lstrip()
        if name.lower() in KEYWORDS or after.startswith("("):
            continue  # a keyword or a function call
        if re.fullmatch(r"\d.*", name):
            continue
        metrics.add(name)
    matched.pop("", None)
    return metrics, matched, grouping


def histogram_base(name: str) -> str:
    """colm_x_seconds_bucket -> colm_x_seconds (the family of a histogram's sample)."""
    return re.sub(r"_(bucket|sum|count)$", "", name)
