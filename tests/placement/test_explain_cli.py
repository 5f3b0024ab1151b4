"""`facefleet explain` and `facefleet simulate` end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.scheduler.rules_source.files import default_policy_dir

POLICY = default_policy_dir()
WORLD = POLICY / "world.yaml"


def test_explain_json_for_a_list_of_tasks(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        "- {id: a, project: medical-study, sensitivity: private, priority: urgent, frames: 10}\n"
        "- {id: b, project: nope, sensitivity: public, priority: low, frames: 100000, sla_seconds: 5}\n"
    )
    result = CliRunner().invoke(app, ["explain", str(tasks), "--policy", str(POLICY), "--world", str(WORLD), "--json"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)
    assert [i["task"] for i in items] == ["a", "b"]
    first = items[0]
    assert {"outcome", "pool", "rule", "candidates", "estimate"} <= set(first)
    assert first["outcome"] == "dispatch" and first["pool"] == "onprem-local" and first["rule"] == "private-onprem"
    assert set(first["estimate"]) >= {"cost_usd", "completion_s"}
    cloud = next(c for c in first["candidates"] if c["pool"] == "cloud-local")
    assert set(cloud) >= {"pool", "feasible", "failed_filter", "detail", "score"}
    assert cloud["failed_filter"] == "residency" and "private" in cloud["detail"]
    assert items[1]["outcome"] == "reject"


def test_explain_single_task_table_and_json_object(tmp_path: Path) -> None:
    task = tmp_path / "t.yaml"
    task.write_text("{id: one, project: promo-x, sensitivity: public, priority: urgent, frames: 50}\n")
    table = CliRunner().invoke(app, ["explain", str(task), "--world", str(WORLD)])
    assert table.exit_code == 0 and "DISPATCH" in table.output and "burst_when" in table.output
    obj = json.loads(CliRunner().invoke(app, ["explain", str(task), "--world", str(WORLD), "--json"]).output)
    assert obj["task"] == "one" and obj["rule"] == "promo-urgent-burst"


def test_explain_bad_task_gives_actionable_error(tmp_path: Path) -> None:
    task = tmp_path / "t.yaml"
    task.write_text("{id: x, project: p, sensitivity: secret, priority: urgent}\n")
    result = CliRunner().invoke(app, ["explain", str(task), "--world", str(WORLD)])
    assert result.exit_code == 1 and "sensitivity" in result.output and "secret" in result.output


def test_simulate_sweep_json_and_plot(tmp_path: Path) -> None:
    plot = tmp_path / "curve.png"
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--policy",
            str(POLICY),
            "--world",
            str(WORLD),
            "--workload",
            str(POLICY / "workload.yaml"),
            "--sweep",
            "max_spot_price_per_hour=0.5:1.5:0.5",
            "--plot",
            str(plot),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [p["value"] for p in data["points"]] == [0.5, 1.0, 1.5]
    assert all(p["residency_violations"] == 0 for p in data["points"])
    assert plot.stat().st_size > 1000
