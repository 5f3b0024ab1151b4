"""Rules, budgets and locks from Consul KV (py-consul), watched with blocking queries.

Keys under the prefix (default `facefleet/`):
  `<prefix>rules`              the rules document (YAML or JSON, same as rules.yaml)
  `<prefix>budgets/<name>`     `{monthly_cap_usd: 1000, alert_pct: 80}`
  `<prefix>locks/<project>`    `{reason: "...", by: "..."}`
The watcher issues `GET /v1/kv/<prefix>?recurse&index=<last X-Consul-Index>&wait=<wait>`; Consul
answers as soon as anything under the prefix changes, so valid changes apply well within a second.

Whatever Consul (or something in front of it) answers, the last known good config stays active and
the reason is recorded (`SourceError`: log event `rules_rejected`, `ActiveConfig.error_reason`,
facefleet_rules_source_errors_total{reason}); the watcher backs off (tenacity, exponential with
jitter) and keeps trying. A reply that Consul filtered by ACLs (`X-Consul-Results-Filtered-By-ACLs`)
is never applied, not even in part: a token that cannot read `budgets/` must not make caps vanish.
Where Consul is and how to reach it (TLS, token, datacenter): consul_endpoint.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import requests
import structlog
import yaml
from consul.base import Response
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential_jitter

from facefleet.scheduler.placement.model import Budget
from facefleet.scheduler.placement.policy import PolicyError, PolicyIssue, budget_from_mapping, load_ruleset
from facefleet.scheduler.rules_source.base import (
    ActiveConfig,
    LastKnownGood,
    SourceError,
    WatchedSource,
    count_source_error,
)
from facefleet.scheduler.rules_source.consul_endpoint import ConsulEndpoint, resolve_endpoint

log = structlog.get_logger()

ACL_FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"
INDEX_HEADER = "X-Consul-Index"
RETRY_AFTER_CAP_S = 60.0


class ConsulError(RuntimeError):
    """A Consul read or write that did not succeed, with the SourceError that says why."""

    def __init__(self, reason: SourceError, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


def _snippet(body: object) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    text = " ".join(text.split())
    return text[:200] + ("…" if len(text) > 200 else "")


def _retry_after(response: Response) -> float | None:
    try:
        return min(float(response.headers.get("Retry-After", "")), RETRY_AFTER_CAP_S)
    except ValueError:
        return None


def status_error(response: Response, label: str) -> ConsulError | None:
    """The ConsulError an HTTP status stands for (None for 200), as Consul documents its answers."""
    code, body = response.code, _snippet(response.body)
    if code == 200:
        return None
    if code == 403:
        hint = "is the ACL token known to Consul, and may it read/write here?"
        return ConsulError(SourceError.FORBIDDEN, f"{label}: HTTP 403 {body} ({hint})")
    if code == 429:
        return ConsulError(SourceError.RATE_LIMITED, f"{label}: HTTP 429 {body}", _retry_after(response))
    if code >= 500:
        return ConsulError(SourceError.SERVER_ERROR, f"{label}: HTTP {code} {body}", _retry_after(response))
    if 400 <= code < 500:
        return ConsulError(SourceError.BAD_REQUEST, f"{label}: HTTP {code} {body}")
    return ConsulError(SourceError.BAD_REPLY, f"{label}: unexpected HTTP {code} {body}")


def transport_error(error: Exception, label: str) -> ConsulError:
    """A ConsulError for what requests (under py-consul) raised before any answer arrived."""
    detail = f"{error.__class__.__name__}: {error}"
    if isinstance(error, requests.exceptions.SSLError):
        return ConsulError(SourceError.TLS, f"{label}: TLS failed ({detail}); check the CA, client cert and scheme")
    if isinstance(error, requests.Timeout):
        return ConsulError(SourceError.TIMEOUT, f"{label}: no answer in time ({detail})")
    if isinstance(error, requests.RequestException):
        return ConsulError(SourceError.UNREACHABLE, f"{label}: unreachable ({detail})")
    if isinstance(error, OSError):  # requests raises it for a CA/cert path that does not exist
        return ConsulError(SourceError.TLS, f"{label}: TLS files unusable ({detail})")
    return ConsulError(SourceError.BAD_REPLY, f"{label}: {detail}")


class ConsulRuleSource(WatchedSource):
    watch_thread_name = "rules-consul-watch"
    stop_join_timeout_s = 1.0  # a blocking query in flight ends by itself within `wait`

    def __init__(
        self,
        endpoint: ConsulEndpoint | str | None = None,
        prefix: str = "facefleet/",
        token: str | None = None,
        wait: str = "5s",
        request_timeout_s: float = 3.0,
        backoff_max_s: float = 5.0,
    ) -> None:
        """`endpoint`: a resolved ConsulEndpoint, or an address resolved with the CONSUL_* environment."""
        super().__init__()
        self.endpoint = endpoint if isinstance(endpoint, ConsulEndpoint) else resolve_endpoint(endpoint, token=token)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.wait = wait
        self.request_timeout_s = request_timeout_s
        self.backoff_max_s = backoff_max_s
        self._client = self.endpoint.client(request_timeout_s)
        dc = f" dc={self.endpoint.dc}" if self.endpoint.dc else ""
        self._label = f"consul {self.endpoint.address}/{self.prefix}{dc}"
        self._state = LastKnownGood(self._label)
        self._index = 0
        self._outage = False  # last read failed: re-apply on the next answer even if unchanged
        self._exponential = wait_exponential_jitter(multiplier=0.2, max=backoff_max_s, jitter=0.2)

    # -- reads --------------------------------------------------------------------------------

    def _params(self, index: int = 0) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = [("recurse", "1")]
        if index > 0:
            params += [("index", index), ("wait", self.wait)]
        if self.endpoint.dc:
            params.append(("dc", self.endpoint.dc))
        return params

    def _snapshot(self, response: Response) -> tuple[int, list[dict[str, Any]]]:
        """(X-Consul-Index, entries) from a KV list reply; ConsulError for anything else."""
        label = self._label
        if response.code == 404 and response.headers.get(ACL_FILTERED_HEADER) != "true":
            entries: Any = []  # nothing under the prefix (the rules key is then reported missing)
        elif response.code in (200, 404) and response.headers.get(ACL_FILTERED_HEADER) == "true":
            raise ConsulError(
                SourceError.ACL_FILTERED,
                f"{label}: the ACL token may not read every key under {self.prefix} (Consul filtered "
                f'the answer); give it `key_prefix "{self.prefix}" {{ policy = "read" }}` or more',
            )
        elif (error := status_error(response, label)) is not None:
            raise error
        else:
            try:
                entries = json.loads(response.body)
            except ValueError:
                raise ConsulError(
                    SourceError.BAD_REPLY, f"{label}: HTTP 200 but not JSON: {_snippet(response.body)!r} (a proxy?)"
                ) from None
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("Key"), str) for e in entries
        ):
            raise ConsulError(SourceError.BAD_REPLY, f"{label}: not a KV list: {_snippet(response.body)!r}")
        try:
            index = int(response.headers.get(INDEX_HEADER, ""))
        except ValueError:
            message = f"{label}: no {INDEX_HEADER} header (not a Consul agent?)"
            raise ConsulError(SourceError.BAD_REPLY, message) from None
        if index < 0:
            raise ConsulError(SourceError.BAD_REPLY, f"{label}: {INDEX_HEADER} {index} is negative")
        return index, entries

    def _read(self, index: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Everything under the prefix; a blocking query when `index` > 0."""
        try:
            result: tuple[int, list[dict[str, Any]]] = self._client.http.get(
                self._snapshot,
                f"/v1/kv/{self.prefix}",
                params=self._params(index),
                headers=self._client.prepare_headers(),
            )
        except ConsulError:
            raise
        except (requests.RequestException, OSError) as error:
            raise transport_error(error, self._label) from None
        return result

    def _parse(self, entries: list[dict[str, Any]]) -> tuple[Any, dict[str, Budget], dict[str, str]]:
        issues: list[PolicyIssue] = []
        rules_text: str | None = None
        budgets: dict[str, Budget] = {}
        locks: dict[str, str] = {}
        for entry in entries:
            key = str(entry.get("Key", ""))
            rel = key[len(self.prefix) :]
            try:
                raw = entry.get("Value")
                text = base64.b64decode(raw, validate=True).decode("utf-8", "replace") if raw else ""
            except (binascii.Error, TypeError, ValueError):
                issues.append(PolicyIssue(key, None, "value", "not base64 as Consul sends values"))
                continue
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
            missing = not any(e.get("Key") == self.prefix + "rules" for e in entries)
            reason = SourceError.MISSING if missing else SourceError.INVALID
            return self._state.reject([str(e) for e in exc.errors], self._label, reason)
        return self._state.accept(ruleset, budgets, locks, self._label)

    def _reject(self, error: ConsulError) -> ActiveConfig:
        self._outage = True
        return self._state.reject([f"{error}; keeping the last known good rule set"], self._label, error.reason)

    # -- RuleSource ---------------------------------------------------------------------------

    def reload(self) -> ActiveConfig:
        """Read and apply once. Never raises: failures keep the last known good config (invariant 1)."""
        self._loaded = True
        try:
            index, entries = self._read()
            self._outage = False
            self._index = index
            return self._apply(entries)
        except ConsulError as error:
            return self._reject(error)
        except Exception as error:  # a bug must not stop scheduler start-up; the fallback stays
            log.exception("rules_consul_reload_failed", source=self._label)
            return self._reject(ConsulError(SourceError.INTERNAL, f"{self._label}: {error!r}"))

    def stop(self) -> None:
        super().stop()
        self._client.http.session.close()

    def _poll(self) -> None:
        """One blocking query and what follows from its answer; ConsulError when it failed."""
        previous = self._index
        try:
            # After a failure read at once (index 0) so recovery shows without waiting out `wait`;
            # otherwise block, on an index of at least 1 (Consul docs: 0 does not block).
            index, entries = self._read(0 if self._outage else max(previous, 1))
        except ConsulError as error:
            if not self._stop.is_set():
                self._reject(error)
            raise
        if self._stop.is_set():
            return
        if index < previous:  # Consul docs: an index going backwards means reset to 0 and read again
            count_source_error(SourceError.INDEX_RESET)
            log.warning("rules_consul_index_reset", source=self._label, previous=previous, index=index)
            self._index = 0
            self.reload()
            return
        if index == previous and not self._outage:
            return  # the wait ran out, or an idempotent write: nothing new
        self._outage = False
        self._index = index
        self._apply(entries)

    def _backoff(self, state: RetryCallState) -> float:
        """Exponential with jitter, capped; at least what a 429/5xx Retry-After asked for."""
        delay = self._exponential(state)
        error = state.outcome.exception() if state.outcome is not None else None
        hinted = getattr(error, "retry_after_s", None) or 0.0
        return max(delay, hinted)

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop() ends the pause at once

    def _watch(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(ConsulError),
            wait=self._backoff,
            stop=stop_when_event_set(self._stop),
            sleep=self._pause,
            reraise=True,
        )
        while not self._stop.is_set():
            try:
                retrying(self._poll)  # returns after each answer; retries failures with backoff
            except ConsulError:
                return  # stopped while backing off
            except Exception as error:  # a bug: record it, keep the last good config, keep watching
                log.exception("rules_consul_watch_failed", source=self._label)
                self._reject(ConsulError(SourceError.INTERNAL, f"{self._label}: {error!r}"))
                self._stop.wait(self.backoff_max_s)

    # -- writes -------------------------------------------------------------------------------

    def _write(self, method: str, key: str, value: dict[str, Any] | None = None) -> None:
        label = f"{self._label}: {method} {key}"

        def confirmed(response: Response) -> None:
            error = status_error(response, label)
            if error is not None:
                raise error
            try:
                ok = json.loads(response.body) is True  # `true` (`true\n` from a dev agent)
            except ValueError:
                ok = False
            if not ok:
                message = f"{label}: Consul did not confirm ({_snippet(response.body)!r})"
                raise ConsulError(SourceError.BAD_REPLY, message)

        path, http = f"/v1/kv/{key}", self._client.http
        params = [("dc", self.endpoint.dc)] if self.endpoint.dc else []
        headers = self._client.prepare_headers()
        try:
            if method == "PUT":
                http.put(confirmed, path, params=params, data=json.dumps(value), headers=headers)
            else:
                http.delete(confirmed, path, params=params, headers=headers)
        except ConsulError as error:
            count_source_error(error.reason)
            raise
        except (requests.RequestException, OSError) as error:
            failure = transport_error(error, label)
            count_source_error(failure.reason)
            raise failure from None

    def set_budget(self, name: str, monthly_cap_usd: float, alert_pct: float) -> None:
        value = {"monthly_cap_usd": float(monthly_cap_usd), "alert_pct": float(alert_pct)}
        issues: list[PolicyIssue] = []
        budget_from_mapping(name, {"name": name, **value}, f"set_budget({name})", name, issues)
        if issues:
            raise PolicyError(issues)
        self._write("PUT", f"{self.prefix}budgets/{name}", value)

    def set_lock(self, project: str, reason: str, by: str) -> None:
        if not project or "/" in project:
            raise PolicyError([PolicyIssue(f"set_lock({project})", project, "project", "required, without '/'")])
        self._write("PUT", f"{self.prefix}locks/{project}", {"reason": reason, "by": by})

    def remove_lock(self, project: str) -> None:
        self._write("DELETE", f"{self.prefix}locks/{project}")
