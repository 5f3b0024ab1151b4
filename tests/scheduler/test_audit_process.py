"""The scheduler's audit writer process: the same chain, signatures and durability as appending here."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from facefleet.scheduler.audit_batch import AuditBatchWriter
from facefleet.scheduler.audit_process import AuditProcess, AuditWriteFailed
from facefleet.security.audit import AuditKind, AuditLog, Signer, verify
from tests.scheduler.conftest import write_policy
from tests.scheduler.fake_agents import wait_for
from tests.scheduler.scheduler_process import SchedulerProcess

SIGNERS = {
    "hmac": lambda: Signer(secret=b"0123456789abcdef-secret"),
    "ed25519": lambda: Signer(private_key=Ed25519PrivateKey.generate()),
}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


@pytest.mark.parametrize("scheme", sorted(SIGNERS))
def test_signer_pickles_with_its_keys(scheme: str) -> None:
    signer = SIGNERS[scheme]()
    copy = pickle.loads(pickle.dumps(signer))
    assert copy.scheme == signer.scheme
    signature = copy.sign("ab" * 32)
    assert signer.check("ab" * 32, signature) and copy.check("ab" * 32, signer.sign("ab" * 32))
    public_only = pickle.loads(pickle.dumps(Signer(public_key=copy.public_key))) if copy.public_key else None
    assert public_only is None or public_only.check("ab" * 32, signature)


@pytest.mark.parametrize("scheme", sorted(SIGNERS))
def test_child_and_parent_records_form_one_signed_chain(tmp_path: Path, scheme: str) -> None:
    signer = SIGNERS[scheme]()
    counted: Counter[str] = Counter()
    log = AuditLog(tmp_path / "audit.jsonl", signer, on_record=lambda kind, count: counted.update({kind: count}))
    writer = AuditBatchWriter(log, appender=AuditProcess(log))
    try:
        for i in range(30):
            writer.enqueue(AuditKind.PLACEMENT, "scheduler", {"task": f"t{i}", "note": "ünï\u2028<b>\x00"})
            if i % 10 == 9:
                writer.flush()  # durable on return: readable here, written by the child
                assert lines(log.path)[-1]["task"] == f"t{i}"
                log.append(AuditKind.ADMIN, "alice", act="between", args={"i": i}, outcome="ok")
    finally:
        writer.close()
    records = lines(log.path)
    assert [r["seq"] for r in records] == list(range(1, 34))
    assert [r.get("task") or r["args"]["i"] for r in records][:11] == [*(f"t{i}" for i in range(10)), 9]
    assert records[0]["note"] == "ünï\u2028<b>\x00"
    report = verify(log.path, signer)
    assert report.ok and report.records == 33, report.problem
    assert counted == {"placement": 30, "admin": 3}
    assert writer.failed == 0


def test_a_dead_child_fails_its_batch_and_the_next_batch_starts_a_new_one(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    appender = AuditProcess(log)
    try:
        appender.append_many([(AuditKind.PLACEMENT, "scheduler", {"task": "before"})])
        first = appender.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with pytest.raises(AuditWriteFailed, match="ended"):
            appender.append_many([(AuditKind.PLACEMENT, "scheduler", {"task": "lost"})])
        appender.append_many([(AuditKind.PLACEMENT, "scheduler", {"task": "after"})])
        assert appender.pid not in (None, first)
    finally:
        appender.close()
    assert [r["task"] for r in lines(log.path)] == ["before", "after"]
    assert verify(log.path).ok


def test_a_write_the_child_cannot_make_is_counted_as_failed_and_dispatch_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"seq": 1, "torn')  # a torn last record: nothing may be chained onto it
    log = AuditLog(path)
    writer = AuditBatchWriter(log, appender=AuditProcess(log))
    try:
        writer.write(AuditKind.PLACEMENT, "scheduler", {"task": "t1"}, timeout=30)  # returns: no hang
        assert writer.failed == 1
    finally:
        writer.close()
    assert path.read_text() == '{"seq": 1, "torn'


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.slow
def test_a_killed_scheduler_leaves_no_audit_writer_behind(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy")
    scheduler = SchedulerProcess(f"sqlite:///{tmp_path}/s.db", policy, tmp_path / "scheduler.log").start()
    assert scheduler.process is not None
    wait_for(lambda: children_of(scheduler.process.pid), 20, what="the audit writer process")  # type: ignore[union-attr]
    children = children_of(scheduler.process.pid)
    scheduler.kill9()
    deadline = time.monotonic() + 20
    while any(alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [child for child in children if alive(child)]


def test_the_child_starts_whatever_the_parent_runs_as_main(tmp_path: Path) -> None:
    """The child is its own `python -m`: it never re-runs the parent's __main__ (here a script on stdin)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from facefleet.scheduler.audit_process import AuditProcess\n"
        "from facefleet.security.audit import AuditKind, AuditLog\n"
        "writer = AuditProcess(AuditLog(Path(sys.argv[1])))\n"
        "writer.append_many([(AuditKind.PLACEMENT, 'scheduler', {'task': 'from-c'})])\n"
        "writer.close()\n"
    )
    path = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [sys.executable, "-", str(path)], input=script, capture_output=True, text=True, timeout=60
    )  # a script on stdin: multiprocessing's spawn would re-run "<stdin>" in the child and fail
    assert done.returncode == 0, done.stderr
    assert [r["task"] for r in lines(path)] == ["from-c"]
