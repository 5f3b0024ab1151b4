"""Write components/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yml.

deploy/prometheus/alerts.yml is the one source of the alert rules (promtool tests it); the
PrometheusRule for the Prometheus Operator carries the same groups unchanged. Run after editing the
alerts: `python deploy/k8s/prometheusrule_from_alerts.py` (`--check` exits 1 when the file is stale;
tests/deploy/test_kubernetes.py fails the same way).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
TARGET = HERE / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/alerts.yml by deploy/k8s/prometheusrule_from_alerts.py: do not edit.\n"


def render() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "facefleet", "labels": {"app.kubernetes.io/name": "facefleet"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if TARGET.read_text() != text:
            print(f"error: {TARGET} is stale", file=sys.stderr)
            print("hint: python deploy/k8s/prometheusrule_from_alerts.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
