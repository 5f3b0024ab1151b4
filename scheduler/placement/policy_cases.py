"""Policy test cases (`facefleet policy test`): YAML task + world + expected decision, like `opa test`.

A case file lives in `<policy dir>/tests/*.yaml` and is checked against that policy directory:

    world: ../world.yaml            # path relative to this file, or an inline snapshot mapping
    cases:
      - name: private-waits-when-onprem-full
        task: {project: med, sensitivity: private, priority: urgent, frames: 100}
        pools: {onprem-local: {free_slots: 0}}      # optional per-case pool field changes
        budget_spent: {marketing: 999}               # optional per-case spend
        locks: {film-y: audit}                       # optional extra locks
        expect: {outcome: queue, rule: private-onprem, pool: null,
                 failed_filter: {cloud-local: residency}}
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from facefleet.scheduler.placement.engine import place
from facefleet.scheduler.placement.model import Budget, Decision, RuleSet, TaskSpec, World
from facefleet.scheduler.placement.world import WorldFileError, compose_world, load_world
from facefleet.yaml_input import read_yaml_file

EXPECT_KEYS = {"outcome", "pool", "rule", "failed_filter", "reason_contains", "budget"}


@dataclass(frozen=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    failures: tuple[str, ...]
    decision: Decision | None
    elapsed_s: float


def find_case_files(root: Path) -> list[Path]:
    """Every `tests/*.yaml` under `root` (root itself may be a policy dir or a dir of them)."""
    return sorted(p for p in root.rglob("*.yaml") if p.parent.name == "tests")


def _apply_case_changes(world: World, case: Mapping[str, Any], where: str) -> World:
    pools = list(world.pools)
    for name, changes in (case.get("pools") or {}).items():
        positions = [i for i, p in enumerate(pools) if p.name == name]
        if not positions:
            raise ValueError(f"{where}.pools: no pool named {name!r} in the world")
        try:
            pools[positions[0]] = replace(pools[positions[0]], **changes)
        except TypeError as exc:
            raise ValueError(f"{where}.pools.{name}: {exc}") from None
    budgets: dict[str, Budget] = dict(world.budgets)
    for name, spent in (case.get("budget_spent") or {}).items():
        if name not in budgets:
            raise ValueError(f"{where}.budget_spent: no budget named {name!r}")
        budgets[name] = replace(budgets[name], spent_usd=float(spent))
    locks = dict(world.locks)
    locks.update({str(k): str(v) for k, v in (case.get("locks") or {}).items()})
    return World(pools=tuple(pools), budgets=budgets, locks=locks, notes=world.notes)


def check_expectation(decision: Decision, expect: Mapping[str, Any]) -> list[str]:
    failures: list[str] = []
    for key in ("outcome", "pool", "rule", "budget"):
        if key in expect and getattr(decision, key) != expect[key]:
            failures.append(f"{key}: expected {expect[key]!r}, got {getattr(decision, key)!r}")
    if "reason_contains" in expect and str(expect["reason_contains"]) not in decision.reason:
        failures.append(f"reason: expected to contain {expect['reason_contains']!r}, got {decision.reason!r}")
    by_pool = {c.pool: c for c in decision.candidates}
    for pool, wanted in (expect.get("failed_filter") or {}).items():
        got = by_pool.get(pool)
        if got is None:
            failures.append(f"failed_filter[{pool}]: pool is not a candidate")
        elif got.failed_filter != wanted:
            failures.append(f"failed_filter[{pool}]: expected {wanted!r}, got {got.failed_filter!r} ({got.detail})")
    return failures


def run_case_file(
    path: Path, ruleset: RuleSet, budgets: Mapping[str, Budget], locks: Mapping[str, str]
) -> list[CaseResult]:
    """Run every case in one file; structural problems become failed cases, never exceptions."""
    try:
        doc = read_yaml_file(path, "test case file") or {}
        if not isinstance(doc, Mapping) or not isinstance(doc.get("cases"), list):
            raise ValueError("expected a mapping with `world:` and a `cases:` list")
        world_ref = doc.get("world")
        if isinstance(world_ref, str):
            base_world = load_world((path.parent / world_ref).resolve())
        elif isinstance(world_ref, Mapping):
            base_world = World.from_dict(world_ref, where=f"{path}:world")
        else:
            raise ValueError("`world:` must be a path to a snapshot file or an inline snapshot")
    except (OSError, yaml.YAMLError, ValueError, WorldFileError) as exc:
        return [CaseResult(str(path), "<file>", False, (str(exc),), None, 0.0)]
    base_world = compose_world(base_world, budgets, locks)
    results: list[CaseResult] = []
    for i, case in enumerate(doc["cases"]):
        name = str(case.get("name", f"case-{i}")) if isinstance(case, Mapping) else f"case-{i}"
        where = f"{path}:cases[{i}]"
        started = time.perf_counter()
        try:
            if not isinstance(case, Mapping) or not isinstance(case.get("expect"), Mapping):
                raise ValueError("each case needs task: and expect:")
            unknown = set(case["expect"]) - EXPECT_KEYS
            if unknown:
                raise ValueError(f"expect: unknown key(s) {sorted(unknown)}; known: {sorted(EXPECT_KEYS)}")
            task = TaskSpec.from_dict({"id": name, **(case.get("task") or {})}, where=f"{where}.task")
            world = _apply_case_changes(base_world, case, where)
        except ValueError as exc:
            results.append(CaseResult(str(path), name, False, (str(exc),), None, 0.0))
            continue
        decision = place(task, ruleset, world)
        failures = check_expectation(decision, case["expect"])
        results.append(
            CaseResult(str(path), name, not failures, tuple(failures), decision, time.perf_counter() - started)
        )
    return results
