"""Regression tests for the defects of issue #17 that need no running server (those are in
test_grpc_hostile.py): each one failed before the fix, the way a user met it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from facefleet.agent.pipeline.errors import ToolMissing
from facefleet.agent.pipeline.media import probe_video
from facefleet.agent.server import reason_from_error
from facefleet.domain import DEFAULT_SENSITIVITY, PRIVATE, sensitivity_from_proto
from facefleet.scheduler.capacity import AgentRegistry, HeartbeatRejected
from facefleet.scheduler.intake import validate_task
from facefleet.scheduler.placement.model import TaskSpec
from facefleet.scheduler.rules_source.files import FileRuleSource
from facefleet.security import certs
from facefleet.security.audit import AuditLog, Signer, record_hash, verify
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.hostile.cli_checks import assert_clean, run_cli

MARKUP_REASON = "GDPR-142, see [/legal/gdpr] folder"
RULES = "rules:\n  - id: default\n    match: {}\n    allow: ['onprem-*']\n"


def audit_log_with(tmp_path: Path, signing_key: Path | None = None) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", signing_key)
    log.lock("compliance", "legal-review", MARKUP_REASON, locked=True)
    log.lock("compliance", "legal-review", "[bold]shouting[/bold] :warning: \x1b[2J", locked=True)
    log.placement("t1", "legal-review", "default", "onprem-a", "private", "dispatch")
    log.dispatch("t1", "legal-review", "onprem-a", "private", "agent-1")
    log.completion("t1", "legal-review", "onprem-a", "private", "succeeded")
    return log


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- markup and terminal injection ------------------------------------------------------------------


def test_audit_query_and_proof_print_record_text_verbatim(tmp_path: Path) -> None:
    log = audit_log_with(tmp_path)
    for args in (
        ["audit", "query", "--project", "legal-review", "--path", str(log.path)],
        ["audit", "proof", "--project", "legal-review", "--path", str(log.path)],
    ):
        result = run_cli(args)
        assert_clean(result, args)
        assert result.exit_code == 0, result.output
        # the records are on stdout; stderr may carry other tests' background logs (the session stack's)
        shown = one_line(result.stdout)
        assert "[/legal/gdpr]" in shown
        assert "[bold]shouting[/bold] :warning:" in shown  # not styled, not shortened, no emoji
        assert "\x1b" not in result.stdout and "\\x1b[2J" in shown  # the escape is shown, not sent
        assert "\x1b[2J" not in result.output  # on neither stream


def test_audit_verify_names_a_markup_seq_as_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text(json.dumps({"seq": "[/x]", "prev": "0" * 64, "hash": "h"}) + "\n")
    result = run_cli(["audit", "verify", str(path)])
    assert_clean(result)
    assert result.exit_code == 1 and "line 1: seq '[/x]'" in one_line(result.output)


def test_usage_errors_are_an_error_and_a_hint_with_exit_2() -> None:
    for args in (["--bogus"], ["nosuch"], ["audit", "verify", "--bogus"], ["tasks", "--limit", "lots"]):
        result = run_cli(args)
        assert_clean(result, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: see `facefleet")


def test_an_unexpected_exception_is_one_line_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    from facefleet.security import audit

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(audit, "verify", broken)
    quiet = run_cli(["audit", "verify", "x.jsonl"])
    assert quiet.exit_code == 1 and "internal error (KeyError: 'boom')" in quiet.output and "--debug" in quiet.output
    assert "Traceback" not in quiet.output and isinstance(quiet.exception, SystemExit)
    loud = run_cli(["--debug", "audit", "verify", "x.jsonl"])
    assert isinstance(loud.exception, KeyError)


def test_help_texts_with_brackets_render() -> None:
    for command in ("verify", "proof", "query"):
        result = run_cli(["audit", command, "--help"])
        assert result.exit_code == 0 and "[audit] path" in one_line(result.output), result.output


# ---- tracebacks that are now errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"seq": 1, "prev": "x", "hash": "\\ud800"}', "not valid Unicode"),
    ],
    ids=["deep-nesting", "lone-surrogate"],
)
def test_audit_verify_reports_unreadable_lines(tmp_path: Path, line: bytes, problem: str) -> None:
    log = audit_log_with(tmp_path)
    with open(log.path, "ab") as handle:
        handle.write(line + b"\n")
    result = run_cli(["audit", "verify", str(log.path)])
    assert_clean(result)
    assert result.exit_code == 1 and "line 6:" in result.output and problem in one_line(result.output)
    queried = run_cli(["audit", "query", "--path", str(log.path)])  # the readable records still list
    assert_clean(queried)
    assert queried.exit_code == 0 and "5 audit record(s)" in queried.output


def test_since_compares_records_without_a_utc_offset(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=lambda: 1_800_000_000.0)
    log.placement("t1", "p", "default", "onprem-a", "private", "dispatch")
    record = json.loads(path.read_text())
    record["at"] = "2027-01-15T08:00:00"  # no offset: read as UTC
    path.write_text(json.dumps(record) + "\n")
    for since, count in (("2027-01-15T07:00:00", 1), ("2027-01-15T09:00:00+00:00", 0)):
        result = run_cli(["audit", "query", "--since", since, "--path", str(path), "--json"])
        assert_clean(result)
        assert len(json.loads(result.stdout)) == count
    proof = run_cli(["audit", "proof", "--project", "p", "--since", "2027-01-01", "--path", str(path)])
    assert_clean(proof)
    huge = run_cli(["audit", "query", "--since", "99999999999d", "--path", str(path)])
    assert_clean(huge)
    assert huge.exit_code == 2 and "before the year 1" in huge.output


def test_audit_proof_of_a_missing_log_is_an_error(tmp_path: Path) -> None:
    result = run_cli(["audit", "proof", "--project", "p", "--path", str(tmp_path / "missing.jsonl")])
    assert_clean(result)
    assert result.exit_code == 1 and "does not exist" in result.output and "hint:" in result.output


def test_submit_of_a_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_bytes(b"project: film-x\nsource_uri: \xff\xfe\xfa\n")
    result = run_cli(["submit", str(task), "--insecure", "--scheduler", "127.0.0.1:1"])
    assert_clean(result)
    assert result.exit_code == 1 and f"task file {task}: not UTF-8 text" in one_line(result.output)


def test_policy_validate_and_the_watcher_reject_rules_that_are_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    source = FileRuleSource(tmp_path)
    assert not source.reload().errors
    (tmp_path / "rules.yaml").write_bytes(b"rules:\n  - id: caf\xe9\n")
    result = run_cli(["policy", "validate", str(tmp_path)])
    assert_clean(result)
    assert result.exit_code == 1 and "INVALID" in result.output and "not UTF-8 text: byte 18" in result.output
    outcome = source.reload()  # what the watcher and Admin.ReloadRules call
    assert outcome.errors and "rules.yaml" in outcome.errors[0]
    assert source.current().ruleset.rules[0].id == "default"  # last known good stays active


def test_a_config_file_that_is_not_utf8_or_toml_is_named(tmp_path: Path) -> None:
    for content, words in (
        (b"[audit]\npath = 'caf\xe9'\n", "not UTF-8 text (byte 19 is 0xe9)"),
        (b"[[[", "not valid TOML"),
    ):
        config = tmp_path / "facefleet.toml"
        config.write_bytes(content)
        result = run_cli(["audit", "verify", "--config", str(config)])
        assert_clean(result)
        assert result.exit_code == 1 and f"config file {config}: {words}" in one_line(result.output)


def test_scheduler_run_with_an_unusable_store_is_an_error(tmp_path: Path) -> None:
    for store, words in (
        ("nosuch://x", "is not usable"),
        ("postgresql+psycopg://facefleet:secret@127.0.0.1:1/facefleet", "cannot reach the store"),
    ):
        args = ["scheduler", "run", "--insecure", "--store", store, "--listen", "127.0.0.1:0"]
        result = run_cli(args)
        assert_clean(result, args)
        assert result.exit_code == 1 and words in result.output and "secret" not in result.output


def test_missing_ffprobe_is_an_agent_capability_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    video = tmp_path / "target.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ffprobe" else real_which(name))
    with pytest.raises(ToolMissing, match="ffprobe is not installed on this agent") as caught:
        probe_video(video)
    assert reason_from_error(caught.value) == types_pb2.PROVIDER_UNAVAILABLE  # not INTERNAL: no traceback


# ---- escapes and destruction ----------------------------------------------------------------------------


def test_certs_issue_refuses_path_escapes_and_control_characters(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert run_cli(["certs", "init", "--dir", str(directory)]).exit_code == 0
    before = set(tmp_path.rglob("*"))
    for name in ("../escaped", "/tmp/abs", "a/b", "..", ".hidden", "bell\x07", "new\nline", "esc\x1b[2J", ""):
        args = ["certs", "issue", name, "--role", "finance", "--dir", str(directory)]
        result = run_cli(args)
        assert_clean(result, args)
        assert result.exit_code == 1 and "not allowed" in result.output, result.output
    for host in ("bad host", "evil\x00.com", "x\n"):
        args = ["certs", "issue", "alice", "--host", host, "--dir", str(directory)]
        result = run_cli(args)
        assert_clean(result, args)
        assert result.exit_code == 1 and "neither an IP address nor a DNS name" in result.output
    assert set(tmp_path.rglob("*")) == before
    with pytest.raises(certs.CertificateError):
        certs.issue(certs.create_ca(), "cn\x00with-nul")


def test_up_refuses_to_replace_a_directory_it_did_not_make(tmp_path: Path) -> None:
    directory = tmp_path / "work"
    directory.mkdir()
    (directory / "thesis.tex").write_text("years of work")
    result = run_cli(["up", "--dir", str(directory)])
    assert_clean(result)
    assert result.exit_code == 1 and "not a facefleet demo directory" in one_line(result.output)
    assert (directory / "thesis.tex").read_text() == "years of work"


# ---- disagreements and silent no-ops ---------------------------------------------------------------------


def test_offline_explain_and_the_live_intake_share_the_default_sensitivity() -> None:
    offline = TaskSpec.from_dict({"id": "t", "project": "p"})
    live = validate_task(types_pb2.Task(project="p", source_uri="file:///in/a.png", target_uri="file:///in/b.png"))
    assert offline.sensitivity == sensitivity_from_proto(live.sensitivity) == DEFAULT_SENSITIVITY == PRIVATE


def heartbeat(**fields: object) -> scheduler_pb2.HeartbeatRequest:
    base: dict[str, object] = {
        "agent_id": "a1", "pool": "onprem-a", "trust_zone": "private", "address": "127.0.0.1:1",
        "total_slots": 2, "free_slots": 1,
    }  # fmt: skip
    base.update(fields)
    return scheduler_pb2.HeartbeatRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"free_slots": 3}, "free_slots"), ({"sec_per_frame": float("nan")}, "sec_per_frame"),
     ({"sec_per_frame": float("inf")}, "sec_per_frame"), ({"sec_per_frame": -1.0}, "sec_per_frame")],
)  # fmt: skip
def test_impossible_heartbeats_are_refused(fields: dict[str, object], field: str) -> None:
    registry = AgentRegistry()
    with pytest.raises(HeartbeatRejected) as refused:
        registry.record_heartbeat(heartbeat(**fields), 0.0)
    assert refused.value.field == field and registry.get("a1") is None
    registry.record_heartbeat(heartbeat(), 0.0)
    assert registry.get("a1") is not None


def strip_signatures(path: Path) -> None:
    lines = [json.loads(raw) for raw in path.read_text().splitlines()]
    for record in lines:
        record.pop("sig", None)
    path.write_text("".join(json.dumps(record) + "\n" for record in lines))


def test_audit_verify_of_a_signed_log_uses_the_configured_key_or_fails(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    key.write_bytes(os.urandom(32).hex().encode())
    log = audit_log_with(tmp_path, signing_key=key)
    config = tmp_path / "facefleet.toml"
    config.write_text(f'[audit]\npath = "{log.path}"\nsigning_key = "{key}"\n')
    assert verify(log.path, Signer.from_file(key)).ok
    assert run_cli(["audit", "verify", "--config", str(config)]).exit_code == 0
    keyless = run_cli(["audit", "verify", str(log.path)])
    assert_clean(keyless)
    assert keyless.exit_code == 1 and "no key was given" in one_line(keyless.output)
    strip_signatures(log.path)
    for args in (["audit", "verify", str(log.path)], ["audit", "verify", "--config", str(config)]):
        result = run_cli(args)
        assert_clean(result, args)
        assert result.exit_code == 1 and "line 1:" in result.output, result.output


def test_audit_proof_fails_for_a_project_that_never_appears(tmp_path: Path) -> None:
    log = audit_log_with(tmp_path)
    result = run_cli(["audit", "proof", "--project", "legal-reveiw", "--path", str(log.path)])
    assert_clean(result)
    assert result.exit_code == 1 and "never appears" in result.output and "FAIL" in result.output


def test_audit_proof_trusts_the_configured_zone_over_the_record(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.dispatch("t1", "film-x", "cloud-aws", "private", "agent-9")  # a record that lies about its zone
    log.completion("t1", "film-x", "cloud-aws", "private", "succeeded")
    assert run_cli(["audit", "proof", "--project", "film-x", "--path", str(log.path)]).exit_code == 0
    world = tmp_path / "world.yaml"
    world.write_text("pools:\n  - {name: cloud-aws, provider: aws, trust_zone: cloud}\n")
    config = tmp_path / "facefleet.toml"
    config.write_text('[[scheduler.pools]]\nname = "cloud-aws"\ntrust_zone = "cloud"\n')
    for extra in (["--world", str(world)], ["--config", str(config)]):
        args = ["audit", "proof", "--project", "film-x", "--path", str(log.path), *extra]
        result = run_cli(args)
        assert_clean(result, args)
        shown = one_line(result.output)
        assert result.exit_code == 1 and "FAIL" in shown and "LEFT PRIVATE ZONE" in shown, result.output
        assert "pool cloud-aws is configured cloud, record says private" in shown


def test_a_lock_on_file_under_a_name_no_task_can_carry_is_a_policy_error(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    (tmp_path / "locks.yaml").write_text("locks:\n  - {project: Film-X, reason: talent contract, by: alice}\n")
    result = run_cli(["policy", "validate", str(tmp_path)])
    assert_clean(result)
    assert result.exit_code == 1 and "'Film-X'" in result.output and "not a project name" in result.output


def test_record_hash_covers_the_signed_marker(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", Signer(secret=b"0123456789abcdef-secret"))
    record = log.admin("alice", "whoami", {})
    assert record["signed"] == "hmac-sha256" and record_hash(record) == record["hash"]
    unsigned = {key: value for key, value in record.items() if key != "signed"}
    assert record_hash(unsigned) != record["hash"]
