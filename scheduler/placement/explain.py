"""Render a decision and its trace for people (rich) and machines (dict)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from facefleet.scheduler.placement.model import Decision, TaskSpec

OUTCOME_STYLE = {"dispatch": "bold green", "queue": "bold yellow", "reject": "bold red"}


def decision_dict(task: TaskSpec, decision: Decision) -> dict[str, Any]:
    """The JSON object `facefleet explain --json` prints for one task."""
    return {"task": task.id, **decision.to_dict()}


def render_decision(task: TaskSpec, decision: Decision) -> Group:
    head = Text()
    head.append(f"task {task.id} ", style="bold")
    head.append(
        f"(project {task.project}, {task.sensitivity}, {task.priority}, {task.frames} frame(s)"
        + (f", sla {task.sla_seconds:g} s" if task.sla_seconds else "")
        + ")\n"
    )
    head.append(decision.outcome.upper(), style=OUTCOME_STYLE[decision.outcome])
    if decision.pool:
        head.append(f" -> {decision.pool}")
    head.append(f"  rule {decision.rule or '-'}  rules {decision.rules_version or '-'}\n")
    head.append(decision.reason)
    if decision.estimate:
        estimate = decision.estimate
        head.append(f"\nestimate: ${estimate.cost_usd:.6f}, {estimate.completion_s:.1f} s")
        if estimate.reserve_usd > 0:
            head.append(
                f"; reserves ${estimate.reserve_usd:.6f} (run limit {estimate.max_run_s:.1f} s, enforced by the agent)"
            )
        if decision.budget:
            head.append(f", charged to budget {decision.budget}")
    for note in decision.notes:
        head.append(f"\nnote: {note}", style="dim")
    table = Table(show_lines=False, expand=False)
    # Names and numbers stay whole; only the free-text detail wraps on a narrow terminal.
    for column in ("pool", "ok", "filter"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold", min_width=20)
    for column in ("score", "cost $", "time s"):
        table.add_column(column, no_wrap=True, justify="right")
    for c in decision.candidates:
        chosen = c.pool == decision.pool
        table.add_row(
            Text(("* " if chosen else "  ") + c.pool, style="bold green" if chosen else ""),
            Text("yes", style="green") if c.feasible else Text("no", style="red"),
            c.failed_filter or "",
            c.detail,
            "" if c.score is None else f"{c.score:.3f}",
            "" if c.estimate is None else f"{c.estimate.cost_usd:.6f}",
            "" if c.estimate is None else f"{c.estimate.completion_s:.1f}",
        )
    return Group(head, table)
