"""Audit chain: tamper detection (edit, delete, swap, insert, truncate), signatures, queries, proofs, CLI."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.security.audit import AuditLog, Signer, query, record_hash, residency_proof, verify


def fill(log: AuditLog, count: int = 6) -> None:
    for index in range(count):
        log.placement(f"t{index}", "alpha", "default", "onprem-a", "private", "DISPATCH")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_untouched_log_verifies(audit: AuditLog) -> None:
    fill(audit)
    report = verify(audit.path)
    assert (report.ok, report.records, report.first_bad) == (True, 6, None)
    assert report.head == json.loads(lines(audit.path)[-1])["hash"]


@pytest.mark.parametrize("target_line", [1, 3, 6])
def test_editing_one_byte_is_caught_at_that_record(audit: AuditLog, target_line: int) -> None:
    fill(audit)
    data = lines(audit.path)
    record = data[target_line - 1]
    position = record.index(b'"onprem-a"') + 8  # the "a" of onprem-a
    data[target_line - 1] = record[:position] + b"b" + record[position + 1 :]
    audit.path.write_bytes(b"".join(data))
    report = verify(audit.path)
    assert not report.ok and report.first_bad == target_line and report.records == target_line - 1
    assert f"line {target_line}" in report.problem and "edited" in report.problem


def test_deleting_a_line_is_caught_at_the_gap(audit: AuditLog) -> None:
    fill(audit)
    data = lines(audit.path)
    del data[2]
    audit.path.write_bytes(b"".join(data))
    report = verify(audit.path)
    assert (report.ok, report.first_bad) == (False, 3)
    assert "seq 4 where 3 was expected" in report.problem


def test_swapping_two_lines_is_caught_at_the_first(audit: AuditLog) -> None:
    fill(audit)
    data = lines(audit.path)
    data[3], data[4] = data[4], data[3]
    audit.path.write_bytes(b"".join(data))
    assert verify(audit.path).first_bad == 4


def test_inserting_a_forged_record_is_caught(audit: AuditLog) -> None:
    fill(audit)
    data = lines(audit.path)
    forged = json.loads(data[1])
    forged.update(seq=3, task="forged")
    forged["hash"] = record_hash(forged)
    data.insert(2, json.dumps(forged).encode() + b"\n")
    audit.path.write_bytes(b"".join(data))
    assert verify(audit.path).first_bad == 3


def test_tail_truncation_needs_an_anchor(audit: AuditLog) -> None:
    fill(audit)
    head = verify(audit.path).head
    audit.path.write_bytes(b"".join(lines(audit.path)[:-1]))
    assert verify(audit.path).ok  # a shorter chain is self-consistent ...
    report = verify(audit.path, anchor=head)  # ... but the noted head is gone
    assert not report.ok and report.first_bad == 6


def test_torn_last_line_refuses_further_appends(audit: AuditLog) -> None:
    fill(audit, 2)
    audit.path.write_bytes(audit.path.read_bytes()[:-10])
    assert verify(audit.path).first_bad == 2
    with pytest.raises(RuntimeError, match="incomplete"):
        audit.admin("op", "whoami", {})


def test_a_log_moved_away_is_left_alone_and_a_new_one_starts_at_the_path(audit: AuditLog) -> None:
    """The writer keeps its file open between batches: after a rotation (the file renamed away)
    its next record must go to a new log at the configured path, not on the end of the old one."""
    fill(audit, 3)
    rotated = audit.path.with_name("rotated.jsonl")
    audit.path.rename(rotated)
    fill(audit, 2)
    assert verify(rotated).ok and verify(rotated).records == 3
    report = verify(audit.path)
    assert report.ok and report.records == 2
    assert json.loads(lines(audit.path)[0])["seq"] == 1


def rewrite_chain(path: Path) -> None:
    """What an attacker with write access but no key can do: edit, then recompute every hash."""
    prev = "0" * 64
    out = []
    for raw in lines(path):
        record = json.loads(raw)
        record["pool"] = "cloud-x"
        record["prev"] = prev
        record["hash"] = prev = record_hash(record)
        out.append(json.dumps(record).encode() + b"\n")
    path.write_bytes(b"".join(out))


def test_hmac_signature_catches_a_recomputed_chain(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    key.write_bytes(b"0123456789abcdef-secret")
    log = AuditLog(tmp_path / "a.jsonl", signing_key=key)
    fill(log, 3)
    assert verify(log.path, Signer.from_file(key)).ok
    rewrite_chain(log.path)
    keyless = verify(log.path)  # the hash chain alone cannot tell, so a signed log needs its key
    assert not keyless.ok and "no key" in keyless.problem
    report = verify(log.path, Signer.from_file(key))
    assert report.first_bad == 1 and "signature" in report.problem


def test_ed25519_signature_verifies_with_public_key_only(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    key, pub = tmp_path / "audit-key.pem", tmp_path / "audit-pub.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    log = AuditLog(tmp_path / "a.jsonl", signing_key=key)
    fill(log, 3)
    assert verify(log.path, Signer.from_file(pub)).ok
    rewrite_chain(log.path)
    assert verify(log.path, Signer.from_file(pub)).first_bad == 1


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path))
    for index in range(count):
        log.admin(f"worker-{worker}", "whoami", {"i": index})


def test_concurrent_appends_from_processes_and_threads_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_append_many, args=(str(path), worker, 40)) for worker in range(3)]
    threads = [threading.Thread(target=_append_many, args=(str(path), 10 + worker, 40)) for worker in range(3)]
    for runner in [*processes, *threads]:
        runner.start()
    for runner in [*processes, *threads]:
        runner.join(60)
    report = verify(path)
    assert report.ok, report.problem
    assert report.records == 240


def test_query_filters(tmp_path: Path) -> None:
    now = [dt.datetime(2025, 1, 1, tzinfo=dt.UTC).timestamp()]
    log = AuditLog(tmp_path / "q.jsonl", clock=lambda: now[0])
    log.placement("t1", "alpha", "r", "onprem", "private", "DISPATCH")
    now[0] += 10 * 86400
    log.dispatch("t1", "alpha", "onprem", "private", "agent-1")
    log.dispatch("t2", "beta", "cloud", "cloud", "agent-9")
    log.lock("compliance", "alpha", "gdpr", locked=True)
    since = dt.datetime(2025, 1, 5, tzinfo=dt.UTC)
    assert [r["kind"] for r in query(log.path, project="alpha")] == ["placement", "dispatch", "lock"]
    assert [r["kind"] for r in query(log.path, project="alpha", since=since)] == ["dispatch", "lock"]
    assert [r["task"] for r in query(log.path, kind="dispatch")] == ["t1", "t2"]


def test_residency_proof_passes_only_when_every_task_ran_private(audit: AuditLog) -> None:
    audit.lock("compliance", "alpha", "gdpr", locked=True)
    audit.placement("t1", "alpha", "r", "aws-spot", "cloud", "DISPATCH")  # placed, re-placed before running
    audit.placement("t1", "alpha", "r", "onprem", "private", "DISPATCH")
    audit.dispatch("t1", "alpha", "onprem", "private", "agent-1")
    audit.completion("t1", "alpha", "onprem", "private", "SUCCEEDED")
    audit.dispatch("t9", "beta", "aws-spot", "cloud", "agent-9")
    proof = residency_proof(audit.path, "alpha")
    assert proof.passed and [t.task for t in proof.tasks] == ["t1"] and proof.tasks[0].zones == ["private"]
    audit.dispatch("t2", "alpha", "aws-spot", "cloud", "agent-9")
    failed = residency_proof(audit.path, "alpha")
    assert not failed.passed and [t.task for t in failed.tasks if not t.private_only] == ["t2"]


def test_cli_verify_names_first_bad_record(audit: AuditLog) -> None:
    fill(audit)
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "verify", str(audit.path)])
    assert result.exit_code == 0 and "6 records" in " ".join(result.output.split())
    data = lines(audit.path)
    del data[1]
    audit.path.write_bytes(b"".join(data))
    result = runner.invoke(app, ["audit", "verify", str(audit.path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["first_bad"] == 2


def test_cli_query_and_proof(audit: AuditLog) -> None:
    audit.dispatch("t1", "alpha", "onprem", "private", "agent-1")
    audit.completion("t1", "alpha", "onprem", "private", "SUCCEEDED")
    runner = CliRunner()
    result = runner.invoke(
        app, ["audit", "query", "--project", "alpha", "--since", "7d", "--path", str(audit.path), "--json"]
    )
    assert result.exit_code == 0 and [r["kind"] for r in json.loads(result.stdout)] == ["dispatch", "completion"]
    result = runner.invoke(app, ["audit", "proof", "--project", "alpha", "--path", str(audit.path)])
    assert result.exit_code == 0 and "PASS" in result.output
    audit.dispatch("t2", "alpha", "aws", "cloud", "agent-9")
    result = runner.invoke(app, ["audit", "proof", "--project", "alpha", "--path", str(audit.path), "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["passed"] is False
