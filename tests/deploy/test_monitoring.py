"""Prometheus config and alerts (promtool, a real Prometheus) and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from promql_metric_names import DCGM_METRICS, PROMETHEUS_BUILTINS, exported_metric_names, metric_names

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "facefleet.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60)


def _consul_to_file_sd(config: dict[str, Any], targets_file: str) -> dict[str, Any]:
    """Same config with consul_sd_configs swapped for file_sd_configs.

    Debian's Prometheus is built without Consul SD, so promtool there rejects the field; everything
    else (relabel regexes, rule files, alerting) is still checked by promtool on the copy.
    """
    converted = json.loads(json.dumps(config))
    for block in [*converted["scrape_configs"], *converted.get("alerting", {}).get("alertmanagers", [])]:
        if block.pop("consul_sd_configs", None) is not None:
            block["file_sd_configs"] = [{"files": [targets_file]}]
    return converted


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


# --- metric names -------------------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(facefleet_agent_stage_seconds_bucket{pool=~"$pool"}'
        "[$__rate_interval]))) / ignoring(x) max without (gpu) (DCGM_FI_DEV_GPU_UTIL offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"facefleet_agent_stage_seconds_bucket", "DCGM_FI_DEV_GPU_UTIL"}
    assert metric_names('absent(up{job="facefleet-scheduler"} == 1)') == {"up"}
    assert metric_names("label_values(facefleet_agents, pool)") == {"facefleet_agents", "pool"}


def test_exported_names_come_from_the_code() -> None:
    names = exported_metric_names()
    assert "facefleet_placements_total" in names
    assert "facefleet_dispatch_latency_seconds_bucket" in names
    assert "facefleet_rules_info" in names
    assert "facefleet_queue_depth" in names
    assert "facefleet_placements" not in names


def test_alerts_name_only_exported_metrics(alert_rules: list[dict[str, Any]]) -> None:
    allowed = exported_metric_names() | PROMETHEUS_BUILTINS
    for rule in alert_rules:
        unknown = metric_names(rule["expr"]) - allowed
        assert not unknown, f"alert {rule['alert']} names metrics no code exports: {sorted(unknown)}"


def test_dashboard_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    allowed = exported_metric_names() | PROMETHEUS_BUILTINS | DCGM_METRICS
    used: set[str] = set()
    for expr in _dashboard_exprs(dashboard):
        variable_query = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr)
        names = {variable_query.group(1)} if variable_query else metric_names(expr)
        unknown = names - allowed
        assert not unknown, f"dashboard query {expr!r} names metrics no code exports: {sorted(unknown)}"
        used |= names
    assert len(used & exported_metric_names()) >= 15, "dashboard covers too little of what the code exports"


def test_alerts_cover_the_required_conditions(alert_rules: list[dict[str, Any]]) -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules}
    assert exprs["FacefleetNoLeader"].strip() == "max(facefleet_leader) < 1"
    required = {
        "FacefleetBudgetAlert": "facefleet_budget_alert",
        "FacefleetAgentsLost": "facefleet_agents",
        "FacefleetQueueWaitOverSLA": "facefleet_task_queue_wait_seconds_bucket",
        "FacefleetRuleLoadErrors": "facefleet_rules_load_errors_total",
        "FacefleetPriceFeedStale": "facefleet_price_feed_stale",
    }
    for alert, metric in required.items():
        assert metric in metric_names(exprs[alert]), alert
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# --- promtool -----------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    result = _promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_config(prometheus_config: dict[str, Any], tmp_path: Path) -> None:
    direct = _promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    if direct.returncode == 0:
        return
    assert "consul_sd_configs not found" in direct.stdout + direct.stderr, direct.stdout + direct.stderr
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "targets.json").write_text("[]")
    converted = _consul_to_file_sd(prometheus_config, "targets.json")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(converted))
    result = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana variables replaced by values)."""
    rules = []
    for index, expr in enumerate(_dashboard_exprs(dashboard)):
        if expr.startswith("label_values("):
            continue
        promql = expr.replace("$__rate_interval", "1m").replace("$pool", ".*")
        rules.append({"record": f"dashboard:query_{index}", "expr": promql})
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    result = _promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_consul_service_discovery_blocks(prometheus_config: dict[str, Any]) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    for job_name in ("facefleet-scheduler", "facefleet-agent"):
        (consul,) = jobs[job_name]["consul_sd_configs"]
        assert consul["services"] == [job_name]
        host, _, port = consul["server"].rpartition(":")
        assert host and port.isdigit()
    # Agents' own `pool` label must survive (not become exported_pool): honor_labels.
    assert jobs["facefleet-agent"]["honor_labels"] is True
    targets = [r.get("target_label") for r in jobs["facefleet-scheduler"]["relabel_configs"]]
    assert "pool" not in targets, "scheduler metrics carry per-pool labels; a target pool would clobber them"
    assert "alerts.yml" in prometheus_config["rule_files"]


# --- a real Prometheus applies our relabelling --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def agent_metrics_endpoint() -> Iterator[int]:
    registry = CollectorRegistry()
    slots = Gauge("facefleet_agent_slots_free", "Free task slots on this agent.", ["pool"], registry=registry)
    slots.labels(pool="onprem-a").set(3)
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port
    server.shutdown()
    thread.join(timeout=5)


@pytest.mark.prometheus
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
def test_real_prometheus_relabels_consul_targets(
    prometheus_config: dict[str, Any], agent_metrics_endpoint: int, tmp_path: Path
) -> None:
    """Targets shaped like Consul's (same __meta_consul_* labels) through our relabel rules."""
    assert PROMETHEUS is not None
    config = _consul_to_file_sd(prometheus_config, str(tmp_path / "targets.json"))
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = []
    config.pop("alerting")
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "facefleet-agent"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    consul_like_target = {
        "targets": ["127.0.0.1:50061"],  # the service's gRPC port, as Consul reports it
        "labels": {
            "__meta_consul_address": "127.0.0.1",
            "__meta_consul_service_address": "",
            "__meta_consul_service_metadata_metrics_port": str(agent_metrics_endpoint),
            "__meta_consul_service_metadata_pool": "onprem-a",
            "__meta_consul_service_metadata_trust_zone": "private",
            "__meta_consul_tags": ",pool=ignored-when-meta-set,",
            "__meta_consul_node": "gpu-host-1",
            "__meta_consul_dc": "dc1",
        },
    }
    (tmp_path / "targets.json").write_text(json.dumps([consul_like_target]))
    web_port = _free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        api = f"http://127.0.0.1:{web_port}/api/v1"
        result: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                reply = requests.get(f"{api}/query", params={"query": "facefleet_agent_slots_free"}, timeout=2)
            except requests.ConnectionError:
                continue
            result = reply.json()["data"]["result"] if reply.ok else []
        assert result, "Prometheus never scraped the agent through the relabelled metrics port"
        (series,) = result
        labels = series["metric"]
        assert labels["pool"] == "onprem-a" and "exported_pool" not in labels
        assert labels["instance"] == f"127.0.0.1:{agent_metrics_endpoint}"
        assert labels["trust_zone"] == "private" and labels["node"] == "gpu-host-1"
        assert series["value"][1] == "3"
        up = requests.get(f"{api}/query", params={"query": "up"}, timeout=2).json()["data"]["result"]
        assert up[0]["metric"]["pool"] == "onprem-a"
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- Grafana ------------------------------------------------------------------------------------


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "facefleet-overview"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in dashboard["panels"]}
    for required in (
        "Queue depth by priority",
        "Placements by pool and rule",
        "Dispatch latency",
        "Spend vs budget",
        "GPU utilisation",
        "Frames per second",
        "Agents by pool and state",
        "Spot prices",
    ):
        assert required in titles, f"dashboard lacks panel {required!r}"
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


def test_dashboard_provisioning_points_at_the_mounted_folder() -> None:
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "facefleet.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
