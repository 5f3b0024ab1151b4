"""Metric names in PromQL expressions, and the names our code really exports."""

from __future__ import annotations

import importlib
import re

from prometheus_client import REGISTRY

# Keywords, aggregation operators and modifiers: identifiers that are never metric names.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "le", "atan2",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER_SUFFIX = re.compile(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?[smhdwy]?\b")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and Grafana variables removed)."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables such as $__rate_interval
    text = _NUMBER_SUFFIX.sub(" ", text)
    return {name for name, call in _IDENT.findall(text) if not call and name.lower() not in _KEYWORDS}


def exported_metric_names() -> set[str]:
    """Sample names scheduler/metrics.py and agent/metrics.py expose on /metrics."""
    for module in ("facefleet.scheduler.metrics", "facefleet.agent.metrics"):
        importlib.import_module(module)  # registers the collectors

    names: set[str] = set()
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.collect():
            if not family.name.startswith("facefleet_"):
                continue
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"),
                "info": ("_info",),
                "gauge": ("",),
            }[family.type]
            names.update(family.name + suffix for suffix in suffixes)
    return names


# Not defined by our code but always present or optional by design.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
