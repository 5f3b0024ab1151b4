"""The console in real headless Chromium (Debian's package, driven by Playwright) against the real
scheduler and agents: what finance, compliance and operators see and do, checked the way they would
check it (the CLI, the agents' own run records, the audit log). Screenshots land in the printed
directory (FACEFLEET_CONSOLE_ARTIFACTS to choose it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from facefleet.cli import app as cli_app
from facefleet.security.audit import query, verify
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.console.conftest import ConsoleStack
from tests.integration.test_security_e2e import PRIVATE, PUBLIC
from tests.scheduler.fake_agents import wait_for

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def not_pwned(page: Any) -> None:
    """The hostile text was shown, not run (it sets window.__pwned when it runs)."""
    assert page.evaluate("window.__pwned === undefined")


def unlabelled(page: Any) -> list[str]:
    """Form controls a screen reader could not name."""
    return page.evaluate(
        "[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
        ".filter(e => !e.labels || !e.labels.length).map(e => e.outerHTML)"
    )


# WCAG 2 contrast ratio of an element's text colour against the first opaque background behind it.
CONTRAST_JS = """(selectors) => selectors.map((selector) => {
  const element = document.querySelector(selector);
  const rgb = (text) => text.match(/[0-9.]+/g).slice(0, 3).map(Number);
  const luminance = (colour) => {
    const [r, g, b] = colour.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  let background = "rgb(255, 255, 255)";
  for (let node = element; node; node = node.parentElement) {
    const colour = getComputedStyle(node).backgroundColor;
    if (colour !== "rgba(0, 0, 0, 0)" && colour !== "transparent") { background = colour; break; }
  }
  const [a, b] = [luminance(rgb(getComputedStyle(element).color)), luminance(rgb(background))];
  return [selector, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
})"""
CONTRAST_CHECKED = (
    "main h1", "header .brand", "header nav a", "header nav a[aria-current=page]", "button", "caption", "td",
    ".flash.ok", "label", ".legend .cost", ".legend .miss",
)  # fmt: skip


def budget_show(stack: ConsoleStack) -> dict[str, Any]:
    result = CliRunner().invoke(cli_app, ["budget", "show", "--store", stack.settings.scheduler.store_url, "--json"])
    assert result.exit_code == 0, result.output
    return {a["budget"]: a for a in json.loads(result.stdout)["accounts"]}


def test_finance_sets_a_cap_that_budget_show_reports_and_runs_a_what_if_sweep(stack: ConsoleStack, page: Any) -> None:
    page.goto(stack.sign_in_url("finance", subject="fiona", path="/finance"))
    assert page.url == f"{stack.url}/finance"  # the token left the address bar
    assert unlabelled(page) == []
    page.get_by_label("Account", exact=True).fill("cloud-burst")
    page.get_by_label("Monthly cap (USD)").fill("1234.5")
    page.get_by_label("Alert at (% of cap)").fill("75")
    page.get_by_label("Reason (goes into the audit log)").fill("FIN-42 quarterly plan")
    page.get_by_role("button", name="Set cap").click()
    refused = page.get_by_role("status").inner_text()  # a typo must not add an account
    assert "no budget account 'cloud-burst'" in refused and "INVALID_ARGUMENT" in refused
    page.get_by_label("Account", exact=True).fill("cloud-burst")
    page.get_by_label("Monthly cap (USD)").fill("1234.5")
    page.get_by_label("Alert at (% of cap)").fill("75")
    page.get_by_label("Reason (goes into the audit log)").fill("FIN-42 quarterly plan")
    page.get_by_label("New account").check()
    page.get_by_role("button", name="Set cap").click()
    page.get_by_role("status").filter(has_text="cloud-burst: cap").wait_for()
    row = page.locator('tr[data-account="cloud-burst"]')
    assert "$1,234.50" in row.inner_text()

    wait_for(
        lambda: budget_show(stack).get("cloud-burst", {}).get("monthly_cap_usd") == 1234.5,
        10,
        what="`facefleet budget show` to report the new cap",
    )
    assert budget_show(stack)["cloud-burst"]["alert_pct"] == 75
    record = [r for r in query(stack.settings.audit.path, kind="admin") if r["act"] == "set_budget"][-1]
    assert (record["actor"], record["outcome"], record["args"]["reason"]) == (
        "console:fiona",
        "ok",
        "FIN-42 quarterly plan",
    )

    page.get_by_label("Parameter", exact=True).select_option("max_spot_price_per_hour")
    page.get_by_label("From", exact=True).fill("0.5")
    page.get_by_label("To", exact=True).fill("1.5")
    page.get_by_label("Step", exact=True).fill("0.5")
    page.get_by_role("button", name="Run simulation").click()
    page.locator("#sweep svg.chart").wait_for()
    assert page.locator("#sweep tbody tr").count() == 3
    assert page.locator("#sweep polyline.cost").get_attribute("points").count(",") == 3
    low = [(sel, round(ratio, 2)) for sel, ratio in page.evaluate(CONTRAST_JS, list(CONTRAST_CHECKED)) if ratio < 4.5]
    assert low == [], "text below WCAG AA contrast (4.5:1)"
    stack.shot(page, "finance")


def test_a_submitter_is_refused_the_finance_page(stack: ConsoleStack, page: Any) -> None:
    response = page.goto(stack.sign_in_url("submitter", subject="sam", path="/finance"))
    assert response.status == 403
    assert "ListBudgets" in page.get_by_role("alert").inner_text()
    assert page.get_by_role("navigation").get_by_role("link").all_inner_texts() == ["Tasks"]
    assert page.goto(f"{stack.url}/tasks").status == 200
    stack.shot(page, "refused")


def test_compliance_lock_keeps_queued_cloud_work_on_prem_audited_and_live(stack: ConsoleStack, page: Any) -> None:
    cluster, onprem, cloud = stack.cluster, stack.onprem, stack.cloud
    onprem.gate.clear()
    cloud.gate.clear()
    blocker = cluster.submit(cluster.task("clinic", PRIVATE, "blocker"))
    busy = cluster.submit(cluster.task("other-p", PUBLIC, "busy"))
    wait_for(lambda: {cluster.state(blocker), cluster.state(busy)} == {"running"}, 10, what="both pools busy")
    queued = [
        cluster.submit(
            cluster.task("promo-p", PUBLIC, f"p{i}", labels={"note": HOSTILE}, priority=types_pb2.PRIORITY_HIGH)
        )
        for i in range(3)
    ]
    time.sleep(0.5)
    assert all(cluster.state(t) == "queued" for t in queued)  # waiting for the cloud pool their rule prefers

    # An operator watches the task list; it updates without a reload.
    watcher = page.context.browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    watcher.goto(stack.sign_in_url("operator", subject="olga", path="/tasks?project=promo-p"))
    assert watcher.locator("#task-rows tbody tr").count() == 3

    page.goto(stack.sign_in_url("compliance", subject="carol", path="/compliance"))
    page.locator("#l-project").fill("promo-p")
    assert unlabelled(page) == []
    page.locator("#l-reason").fill(f"talent contract {HOSTILE}")
    page.locator("#l-reason").press("Enter")  # keyboard only
    page.get_by_role("status").filter(has_text="promo-p locked on-prem by console:carol").wait_for()
    reason = page.locator('tr[data-project="promo-p"] td.reason')
    assert reason.inner_text() == f"talent contract {HOSTILE}"  # shown as text, not run
    not_pwned(page)

    cloud.gate.set()  # the cloud slot frees up: locked work must not take it
    wait_for(lambda: cluster.state(busy) == "succeeded", 10, what="the other project's cloud task")
    time.sleep(1.0)
    assert all(cluster.state(t) == "queued" for t in queued)
    onprem.gate.set()
    wait_for(lambda: all(cluster.state(t) == "succeeded" for t in queued), 30, what="promo-p to finish on-prem")
    # From the agents' own records: promo-p ran on-prem only.
    assert not {run.task_id for run in cloud.runs} & set(queued)
    assert set(queued) <= {run.task_id for run in onprem.runs if run.outcome == "succeeded"}
    lock_record = query(stack.settings.audit.path, project="promo-p", kind="lock")[-1]
    assert lock_record["actor"] == "console:carol" and lock_record["reason"] == f"talent contract {HOSTILE}"
    assert verify(stack.settings.audit.path).ok

    # Live: the watcher's list reached "succeeded" on its own, within the 1 s polling.
    watcher.locator("#task-rows .state.succeeded").nth(2).wait_for(timeout=5000)
    assert watcher.locator("#task-rows tbody tr").first.locator("td").nth(7).inner_text() == "0.80"  # ID similarity
    stack.shot(watcher, "tasks")

    page.goto(f"{stack.url}/compliance?proof=promo-p")
    verdict = page.locator(".verdict").inner_text()
    assert verdict.startswith("PASS") and "3 task(s)" in verdict
    stack.shot(page, "compliance")

    watcher.goto(f"{stack.url}/tasks/{queued[0]}")
    chosen = watcher.locator("tr.chosen").inner_text()
    assert chosen.startswith("onprem-a")
    cloud_row = watcher.locator("tbody tr", has_text="cloud-a").first.inner_text()
    assert "no" in cloud_row  # the candidate the lock dropped, with its filter and values
    assert watcher.get_by_text(HOSTILE, exact=True).count() == 1  # the hostile label, as text
    not_pwned(watcher)
    stack.shot(watcher, "task")
    watcher.context.close()


def test_fleet_shows_pools_agents_and_a_spot_interruption_live(stack: ConsoleStack, page: Any) -> None:
    page.goto(stack.sign_in_url("operator", subject="olga", path="/fleet"))
    for agent in ("onprem-1", "cloud-1"):
        page.locator(f'tr[data-agent="{agent}"]').wait_for()
    for pool in ("onprem-a", "cloud-a"):
        assert page.locator(f'tr[data-pool="{pool}"]').count() == 1
    # A spot agent reports an interruption notice in its heartbeat; the open page shows it by itself.
    stack.cluster.scheduler("agent").Heartbeat(
        scheduler_pb2.HeartbeatRequest(
            agent_id="spot-9", address="127.0.0.1:9", pool="cloud-a", trust_zone="cloud", provider="aws",
            region="eu-west-1", total_slots=1, free_slots=1, healthy=True, preempting=True,
        ),
        timeout=10,
    )  # fmt: skip
    page.locator('tr[data-agent="spot-9"]', has_text="spot interruption notice").wait_for(timeout=5000)
    stack.shot(page, "fleet")
    # Polling a live view does not write an audit record a second.
    assert not [r for r in query(stack.settings.audit.path, kind="admin") if r["act"] == "list_fleet"]
