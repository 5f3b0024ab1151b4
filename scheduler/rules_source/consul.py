"""Rules, budgets and locks from Consul KV, watched with blocking queries.

Keys under the prefix (default `facefleet/`):
  `<prefix>rules`              the rules document (YAML or JSON, same as rules.yaml)
  `<prefix>budgets/<name>`     `{monthly_cap_usd: 1000, alert_pct: 80}`
  `<prefix>locks/<project>`    `{reason: "...", by: "..."}`
The watcher issues `GET /v1/kv/<prefix>?recurse&index=<last X-Consul-Index>&wait=<wait>`; Consul
answers as soon as anything under the prefix changes, so valid changes apply well within a second.
Invalid documents and outages keep the last known good config and count in the error metric.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import requests
import structlog
import yaml

from facefleet.scheduler.placement.model import Budget
from facefleet.scheduler.placement.policy import PolicyError, PolicyIssue, budget_from_mapping, load_ruleset
from facefleet.scheduler.rules_source.base import ActiveConfig, LastKnownGood, WatchedSource

log = structlog.get_logger()


class ConsulUnavailable(RuntimeError):
    """Consul could not be reached or answered with an error."""


class ConsulRuleSource(WatchedSource):
    watch_thread_name = "rules-consul-watch"
    stop_join_timeout_s = 1.0  # a blocking query in flight ends by itself within `wait`

    def __init__(
        self,
        addr: str = "http://127.0.0.1:8500",
        prefix: str = "facefleet/",
        token: str | None = None,
        wait: str = "5s",
        request_timeout_s: float = 3.0,
    ) -> None:
        super().__init__()
        self.addr = addr.rstrip("/")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.wait = wait
        self.request_timeout_s = request_timeout_s
        self._session = requests.Session()
        if token:
            self._session.headers["X-Consul-Token"] = token
        self._label = f"consul {self.addr}/{self.prefix}"
        self._state = LastKnownGood(self._label)
        self._index = 0
        self._outage = False  # last fetch failed: re-apply on the next answer even if unchanged

    # -- HTTP ---------------------------------------------------------------------------------

    def _url(self, key: str) -> str:
        return f"{self.addr}/v1/kv/{key}"

    def _wait_seconds(self) -> float:
        text = self.wait.strip()
        if text.endswith("ms"):
            return float(text[:-2]) / 1000
        if text.endswith("m"):
            return float(text[:-1]) * 60
        return float(text.rstrip("s"))

    def _fetch(self, index: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(X-Consul-Index, entries) for everything under the prefix; blocks when index > 0."""
        params: dict[str, str | int] = {"recurse": "true"}
        timeout = self.request_timeout_s
        if index > 0:
            params.update(index=index, wait=self.wait)
            timeout += self._wait_seconds() * 1.1 + 1  # Consul adds up to wait/16 jitter
        try:
            response = self._session.get(self._url(self.prefix), params=params, timeout=timeout)
        except requests.RequestException as exc:
            raise ConsulUnavailable(f"{self._label}: unreachable ({exc.__class__.__name__}: {exc})") from None
        if response.status_code not in (200, 404):
            raise ConsulUnavailable(f"{self._label}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            new_index = int(response.headers.get("X-Consul-Index", "0"))
        except ValueError:
            new_index = 0
        entries = response.json() if response.status_code == 200 else []
        return new_index, entries

    def _parse(self, entries: list[dict[str, Any]]) -> tuple[Any, dict[str, Budget], dict[str, str]]:
        issues: list[PolicyIssue] = []
        rules_text: str | None = None
        budgets: dict[str, Budget] = {}
        locks: dict[str, str] = {}
        for entry in entries:
            key = str(entry.get("Key", ""))
            rel = key[len(self.prefix) :]
            raw = entry.get("Value")
            text = base64.b64decode(raw).decode("utf-8", "replace") if raw else ""
            if rel == "rules":
                rules_text = text
            elif rel.startswith("budgets/") and rel != "budgets/":
                name = rel[len("budgets/") :]
                value = self._mapping(text, key, issues)
                if value is not None:
                    budget = budget_from_mapping(name, {"name": name, **value}, key, name, issues)
                    if budget is not None:
                        budgets[name] = budget
            elif rel.startswith("locks/") and rel != "locks/":
                project = rel[len("locks/") :]
                value = self._mapping(text, key, issues)
                if value is not None:
                    locks[project] = str(value.get("reason") or "locked")
        ruleset = None
        if rules_text is None:
            issues.append(
                PolicyIssue(self.prefix + "rules", None, "rules", "key missing: put the rules document there")
            )
        else:
            try:
                ruleset = load_ruleset(rules_text, self.prefix + "rules")
            except PolicyError as exc:
                issues.extend(exc.errors)
        if issues:
            raise PolicyError(issues)
        return ruleset, budgets, locks

    @staticmethod
    def _mapping(text: str, key: str, issues: list[PolicyIssue]) -> dict[str, Any] | None:
        try:
            value = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as exc:
            issues.append(PolicyIssue(key, None, "value", f"not valid YAML/JSON: {exc}"))
            return None
        if not isinstance(value, dict):
            issues.append(PolicyIssue(key, None, "value", f"expected a mapping, got {value!r}"))
            return None
        return value

    def _apply(self, entries: list[dict[str, Any]]) -> ActiveConfig:
        try:
            ruleset, budgets, locks = self._parse(entries)
        except PolicyError as exc:
            return self._state.reject([str(e) for e in exc.errors], self._label)
        return self._state.accept(ruleset, budgets, locks, self._label)

    # -- RuleSource ---------------------------------------------------------------------------

    def reload(self) -> ActiveConfig:
        self._loaded = True
        try:
            index, entries = self._fetch()
        except ConsulUnavailable as exc:
            self._outage = True
            return self._state.reject([f"{exc}; keeping the last known good rule set"], self._label)
        self._outage = False
        self._index = index
        return self._apply(entries)

    def stop(self) -> None:
        super().stop()
        self._session.close()

    def _watch(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                index, entries = self._fetch(max(self._index, 1))
            except ConsulUnavailable as exc:
                if self._stop.is_set():
                    return
                self._outage = True
                self._state.reject([f"{exc}; keeping the last known good rule set"], self._label)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:
                log.exception("rules_consul_watch_failed", source=self._label)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            if self._stop.is_set():
                return
            if index < self._index:  # Consul docs: an index going backwards means reset
                self._index = 0
                continue
            if index == self._index and not self._outage:
                continue  # wait timed out with no change
            self._outage = False
            self._index = index
            self._apply(entries)

    # -- writes -------------------------------------------------------------------------------

    def _put(self, key: str, value: dict[str, Any]) -> None:
        try:
            response = self._session.put(self._url(key), data=json.dumps(value), timeout=self.request_timeout_s)
        except requests.RequestException as exc:
            raise ConsulUnavailable(f"{self._label}: cannot write {key}: {exc}") from None
        if response.status_code != 200 or response.text.strip() != "true":
            raise ConsulUnavailable(
                f"{self._label}: write {key} failed: HTTP {response.status_code} {response.text[:200]}"
            )

    def set_budget(self, name: str, monthly_cap_usd: float, alert_pct: float) -> None:
        value = {"monthly_cap_usd": float(monthly_cap_usd), "alert_pct": float(alert_pct)}
        issues: list[PolicyIssue] = []
        budget_from_mapping(name, {"name": name, **value}, f"set_budget({name})", name, issues)
        if issues:
            raise PolicyError(issues)
        self._put(f"{self.prefix}budgets/{name}", value)

    def set_lock(self, project: str, reason: str, by: str) -> None:
        if not project or "/" in project:
            raise PolicyError([PolicyIssue(f"set_lock({project})", project, "project", "required, without '/'")])
        self._put(f"{self.prefix}locks/{project}", {"reason": reason, "by": by})

    def remove_lock(self, project: str) -> None:
        try:
            response = self._session.delete(self._url(f"{self.prefix}locks/{project}"), timeout=self.request_timeout_s)
        except requests.RequestException as exc:
            raise ConsulUnavailable(f"{self._label}: cannot delete lock {project}: {exc}") from None
        if response.status_code != 200:
            raise ConsulUnavailable(f"{self._label}: delete lock {project}: HTTP {response.status_code}")
