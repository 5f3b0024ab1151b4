"""The rule language: malformed documents are rejected whole, naming file, rule and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.scheduler.placement import PolicyError, TaskSpec, World, load_budgets, load_ruleset, place
from facefleet.scheduler.rules_source.files import default_policy_dir, read_policy_dir

BAD_RULES = """
rules:
  - id: burst
    match: {sensitivity: [secret], priority: [urgent]}
    allow: ["aws-*"]
    prefer: cheapest
    max_spot_price_per_hour: -1
    burst_when: {onprem_queue_wait_s_gt: 60, onprem_busy: true}
  - id: burst
    match: {}
    alow: ["onprem-*"]
  - match: {}
    allow: "onprem-*"
"""


def test_every_error_names_file_rule_and_field() -> None:
    with pytest.raises(PolicyError) as caught:
        load_ruleset(BAD_RULES, "policies/x/rules.yaml")
    found = {(e.file, e.rule_id, e.field) for e in caught.value.errors}
    assert ("policies/x/rules.yaml", "burst", "match.sensitivity") in found
    assert ("policies/x/rules.yaml", "burst", "prefer") in found
    assert ("policies/x/rules.yaml", "burst", "max_spot_price_per_hour") in found
    assert ("policies/x/rules.yaml", "burst", "burst_when.onprem_busy") in found
    assert ("policies/x/rules.yaml", "burst", "alow") in found  # typo of allow
    assert ("policies/x/rules.yaml", "burst", "allow") in found  # missing allow
    assert ("policies/x/rules.yaml", "rules[2]", "id") in found
    assert "policies/x/rules.yaml: rule 'burst' field 'prefer'" in str(caught.value)


def test_duplicate_ids_and_unreachable_rules_are_errors() -> None:
    text = "rules:\n- {id: a, match: {}, allow: ['*']}\n- {id: a, match: {priority: [low]}, allow: ['*']}\n"
    with pytest.raises(PolicyError) as caught:
        load_ruleset(text, "r.yaml")
    messages = [(e.rule_id, e.field) for e in caught.value.errors]
    assert ("a", "id") in messages and ("a", "match") in messages


def test_yaml_syntax_and_top_level_errors() -> None:
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_ruleset("rules: [", "broken.yaml")
    with pytest.raises(PolicyError, match="top-level `rules:` list"):
        load_ruleset("policies: []", "wrong.yaml")


def test_budget_errors_name_field() -> None:
    with pytest.raises(PolicyError) as caught:
        load_budgets("budgets:\n- {name: mkt, monthly_cap_usd: lots, alert_pct: 150}\n", "budgets.yaml")
    assert {(e.rule_id, e.field) for e in caught.value.errors} == {("mkt", "monthly_cap_usd"), ("mkt", "alert_pct")}


def test_version_is_a_content_hash() -> None:
    a = load_ruleset("rules:\n- {id: d, match: {}, allow: ['onprem-*']}\n", "a")
    b = load_ruleset({"rules": [{"id": "d", "match": {}, "allow": ["onprem-*"]}]}, "b")
    c = load_ruleset("rules:\n- {id: d, match: {}, allow: ['onprem-a']}\n", "c")
    assert a.version == b.version != c.version


def test_project_globs_and_order_preference() -> None:
    rules = load_ruleset(
        {
            "rules": [
                {"id": "promo", "match": {"project": ["promo-*", "ad-?"]}, "allow": ["b-*", "a-*"], "prefer": "order"},
                {"id": "default", "match": {}, "allow": ["a-*"]},
            ]
        },
        "t",
    )
    world = World.from_dict(
        {
            "pools": [
                {"name": "a-1", "provider": "onprem", "trust_zone": "private", "free_slots": 1},
                {"name": "b-1", "provider": "onprem", "trust_zone": "private", "free_slots": 1, "sec_per_frame": 9},
            ]
        }
    )
    slow_but_first = place(TaskSpec("1", "ad-x", "public", "low"), rules, world)
    assert (slow_but_first.rule, slow_but_first.pool) == ("promo", "b-1")
    assert place(TaskSpec("2", "ad-xy", "public", "low"), rules, world).rule == "default"


def test_shipped_default_policy_is_valid() -> None:
    ruleset, budgets, locks = read_policy_dir(default_policy_dir())
    assert ruleset.rules[-1].id == "default" and "marketing" in budgets and "film-x" in locks


def test_policy_test_command_passes_on_shipped_policies() -> None:
    result = CliRunner().invoke(app, ["policy", "test", str(default_policy_dir().parent)])
    assert result.exit_code == 0, result.output
    assert "PASS:" in result.output and "FAIL" not in result.output


def test_policy_test_command_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    policy = tmp_path / "p"
    (policy / "tests").mkdir(parents=True)
    (policy / "rules.yaml").write_text("rules:\n- {id: default, match: {}, allow: ['onprem-*']}\n")
    (policy / "tests" / "cases.yaml").write_text(
        "world: {pools: [{name: aws-1, provider: aws, trust_zone: cloud, free_slots: 4}]}\n"
        "cases:\n"
        "- {name: wrong, task: {project: p, sensitivity: public, priority: urgent}, expect: {outcome: dispatch}}\n"
        "- {name: right, task: {project: p, sensitivity: public, priority: urgent}, expect: {outcome: reject}}\n"
    )
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAIL: wrong" in result.output and "PASS: right" in result.output
    assert "outcome: expected 'dispatch', got 'reject'" in result.output


def test_policy_validate_lists_file_rule_field(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(BAD_RULES)
    result = CliRunner().invoke(app, ["policy", "validate", str(tmp_path), "--json"])
    assert result.exit_code == 1
    assert '"field": "max_spot_price_per_hour"' in result.output and str(tmp_path / "rules.yaml") in result.output
