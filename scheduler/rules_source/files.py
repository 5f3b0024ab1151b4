"""Rules, budgets and locks from a policy directory, watched by mtime polling (the embedded default).

Layout: `rules.yaml` (required), `budgets.yaml`, `locks.yaml` (optional). Writes (`set_budget`,
`set_lock`) rewrite the YAML file atomically (temp file + rename) and reload.
"""

from __future__ import annotations

import os
import tempfile
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any

import structlog
import yaml

from facefleet.scheduler.placement.model import Budget, RuleSet
from facefleet.scheduler.placement.policy import PolicyError, PolicyIssue, load_budgets, load_locks, load_ruleset
from facefleet.scheduler.rules_source.base import ActiveConfig, LastKnownGood, SourceError, WatchedSource

log = structlog.get_logger()

RULES_FILE = "rules.yaml"
BUDGETS_FILE = "budgets.yaml"
LOCKS_FILE = "locks.yaml"


def default_policy_dir() -> Path:
    """The embedded default rule set: `policies/default`, shipped in the wheel as package data."""
    return Path(str(files("facefleet") / "policies" / "default"))


def read_policy_dir(directory: Path) -> tuple[RuleSet, dict[str, Budget], dict[str, str]]:
    """Load and validate all three documents; PolicyError lists every problem in every file."""
    issues: list[PolicyIssue] = []
    rules_path = directory / RULES_FILE
    ruleset: RuleSet | None = None
    budgets: dict[str, Budget] = {}
    locks: dict[str, str] = {}
    if not rules_path.is_file():
        raise PolicyError(
            [PolicyIssue(str(rules_path), None, "rules", f"missing: a policy directory needs {RULES_FILE}")]
        )
    try:
        ruleset = load_ruleset(rules_path.read_bytes(), str(rules_path))
    except PolicyError as exc:
        issues.extend(exc.errors)
    budgets_path, locks_path = directory / BUDGETS_FILE, directory / LOCKS_FILE
    try:
        if budgets_path.is_file():
            budgets = load_budgets(budgets_path.read_bytes(), str(budgets_path))
    except PolicyError as exc:
        issues.extend(exc.errors)
    try:
        if locks_path.is_file():
            locks = load_locks(locks_path.read_bytes(), str(locks_path))
    except PolicyError as exc:
        issues.extend(exc.errors)
    if issues or ruleset is None:
        raise PolicyError(issues)
    return ruleset, budgets, locks


def _write_yaml_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(data, handle, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileRuleSource(WatchedSource):
    watch_thread_name = "rules-file-watch"

    def __init__(self, directory: Path | str | None = None, poll_interval_s: float = 0.25) -> None:
        super().__init__()
        self.directory = Path(directory) if directory is not None else default_policy_dir()
        self.poll_interval_s = poll_interval_s
        self._state = LastKnownGood(str(self.directory))
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._write_lock = threading.Lock()
        self._reload_lock = threading.RLock()

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        stamp = []
        for name in (RULES_FILE, BUDGETS_FILE, LOCKS_FILE):
            try:
                st = (self.directory / name).stat()
                stamp.append((name, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append((name, -1, -1))
        return tuple(stamp)

    def reload(self) -> ActiveConfig:
        # Serialised: a watcher reload that read the old files must not be accepted after a write's
        # reload accepted the new ones (that would briefly undo a lock the Admin RPC already confirmed).
        with self._reload_lock:
            self._loaded = True
            self._stamp = self._fingerprint()
            try:
                ruleset, budgets, locks = read_policy_dir(self.directory)
            except PolicyError as exc:
                return self._state.reject([str(e) for e in exc.errors], str(self.directory))
            except OSError as exc:
                return self._state.reject(
                    [f"{self.directory}: cannot read policy files: {exc}"], str(self.directory), SourceError.UNREADABLE
                )
            return self._state.accept(ruleset, budgets, locks, str(self.directory))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                if self._fingerprint() != self._stamp:
                    self.reload()
            except Exception:  # keep watching whatever happens
                log.exception("rules_file_watch_failed", directory=str(self.directory))

    # -- writes -------------------------------------------------------------------------------

    def _read_list(self, name: str, key: str) -> list[dict[str, Any]]:
        path = self.directory / name
        if not path.is_file():
            return []
        data = yaml.safe_load(path.read_bytes()) or {}
        items = data.get(key, []) if isinstance(data, dict) else []
        return [dict(i) for i in items if isinstance(i, dict)]

    def set_budget(self, name: str, monthly_cap_usd: float, alert_pct: float) -> None:
        entry = {"name": name, "monthly_cap_usd": float(monthly_cap_usd), "alert_pct": float(alert_pct)}
        load_budgets({"budgets": [entry]}, f"set_budget({name})")  # validate before writing
        with self._write_lock:
            items = [b for b in self._read_list(BUDGETS_FILE, "budgets") if b.get("name") != name]
            _write_yaml_atomically(self.directory / BUDGETS_FILE, {"budgets": [*items, entry]})
        self.reload()

    def set_lock(self, project: str, reason: str, by: str) -> None:
        entry = {"project": project, "reason": reason, "by": by}
        load_locks({"locks": [entry]}, f"set_lock({project})")
        with self._write_lock:
            items = [lk for lk in self._read_list(LOCKS_FILE, "locks") if lk.get("project") != project]
            _write_yaml_atomically(self.directory / LOCKS_FILE, {"locks": [*items, entry]})
        self.reload()

    def remove_lock(self, project: str) -> None:
        with self._write_lock:
            items = self._read_list(LOCKS_FILE, "locks")
            kept = [lk for lk in items if lk.get("project") != project]
            if len(kept) != len(items):
                _write_yaml_atomically(self.directory / LOCKS_FILE, {"locks": kept})
        self.reload()
