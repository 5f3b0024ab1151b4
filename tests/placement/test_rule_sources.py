"""The watched-files rule source keeps last-known-good (Consul: test_consul_source.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from facefleet.scheduler.rules_source import FileRuleSource, default_policy_dir
from tests.placement.watching import errors_metric, wait_for

RULES_V1 = "rules:\n- {id: default, match: {}, allow: ['onprem-*']}\n"
RULES_BAD = "rules:\n- {id: default, match: {}, allow: ['onprem-*'], prefer: cheapest}\n"


def test_file_source_watch_reload_and_writes(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(default_policy_dir(), policy)
    source = FileRuleSource(policy, poll_interval_s=0.05)
    source.start()
    try:
        good = source.current()
        assert not good.errors and good.budgets["marketing"].monthly_cap_usd == 1000
        before = errors_metric()
        (policy / "rules.yaml").write_text(RULES_BAD)
        wait_for(lambda: bool(source.current().errors))
        assert source.current().version == good.version and errors_metric() == before + 1
        (policy / "rules.yaml").write_text(RULES_V1)
        wait_for(lambda: [r.id for r in source.current().ruleset.rules] == ["default"])
        assert not source.current().errors
        source.set_budget("marketing", 250, 90)
        assert source.current().budgets["marketing"].monthly_cap_usd == 250
        source.set_lock("promo-z", "legal hold", "compliance")
        assert source.current().locks["promo-z"] == "legal hold"
        source.remove_lock("promo-z")
        assert "promo-z" not in source.current().locks and "film-x" in source.current().locks
    finally:
        source.stop()
