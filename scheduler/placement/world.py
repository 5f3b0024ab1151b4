"""World snapshots from files, and merging a snapshot with the active budgets and locks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from facefleet.scheduler.placement.model import Budget, World
from facefleet.yaml_input import YamlInputError, read_yaml_file


class WorldFileError(ValueError):
    """A world snapshot file could not be read or parsed; the message names the file and field."""


def load_world(path: str | Path) -> World:
    path = Path(path)
    try:
        data = read_yaml_file(path, "world file")
    except YamlInputError as exc:
        raise WorldFileError(f"{exc}; pass --world with a snapshot YAML") from None
    try:
        return World.from_dict(data or {}, where=str(path))
    except ValueError as exc:
        raise WorldFileError(str(exc)) from None


def compose_world(world: World, budgets: Mapping[str, Budget], locks: Mapping[str, str]) -> World:
    """The world placement should see: caps from the active config, spend from the snapshot.

    Budgets named only in the snapshot keep their snapshot cap; locks are the union (a snapshot
    lock is never dropped).
    """
    merged: dict[str, Budget] = dict(world.budgets)
    for name, cap in budgets.items():
        spent = world.budgets[name].spent_usd if name in world.budgets else 0.0
        merged[name] = replace(cap, spent_usd=spent)
    all_locks = dict(locks)
    all_locks.update(world.locks)
    return World(pools=world.pools, budgets=merged, locks=all_locks, notes=world.notes)
