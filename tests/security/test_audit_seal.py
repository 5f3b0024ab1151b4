"""`seal` (one encoding per new record) writes exactly what hashing and encoding separately would:
the same hash, the same signature, the same canonical line, for any record content."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.security import audit
from facefleet.security.audit import Signer, canonical_json, record_hash, seal, verify

TEXT = st.text(max_size=12) | st.sampled_from(['"hash":"', ',"sig":"', "\\", "hash", "sig", "é\u2028\x00"])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
SIGNERS = st.sampled_from([None, Signer(secret=b"k" * 32)])


def base(fields: dict[str, Any], signer: Signer | None) -> dict[str, Any]:
    record: dict[str, Any] = {"seq": 7, "at": "2026-12-04T17:00:00.000+00:00", "kind": "placement", "actor": "a"}
    record.update({key: value for key, value in fields.items() if key not in record})
    if signer is not None:
        record["signed"] = signer.scheme
    record["prev"] = "0" * 64
    return record


def separately(record: dict[str, Any], signer: Signer | None) -> tuple[dict[str, Any], bytes]:
    expected = dict(record)
    expected["hash"] = record_hash(expected)
    if signer is not None:
        expected["sig"] = signer.sign(expected["hash"])
    return expected, canonical_json(expected)


@settings(max_examples=400, deadline=None)
@given(fields=st.dictionaries(TEXT, VALUES, max_size=6), signer=SIGNERS)
def test_seal_matches_hashing_and_encoding_separately(fields: dict[str, Any], signer: Signer | None) -> None:
    record = base(fields, signer)
    expected, line = separately(record, signer)
    assert seal(record, signer) == line
    assert record == expected


@pytest.mark.parametrize("signer", [None, Signer(secret=b"k" * 32)], ids=["unsigned", "signed"])
@pytest.mark.parametrize("where", ["value", "key", "nested key"])
def test_a_record_that_holds_a_stand_in_is_sealed_the_plain_way(where: str, signer: Signer | None) -> None:
    slot = audit._HASH_SLOT
    fields = {"value": {"x": slot}, "key": {slot: 1}, "nested key": {"d": {"hash": slot}}}[where]
    record = base({"task_id": "t1", "detail": fields}, signer)
    expected, line = separately(record, signer)
    assert seal(record, signer) == line and record == expected


def test_sealed_records_verify(tmp_path: Any) -> None:
    log = audit.AuditLog(tmp_path / "audit.jsonl", signing_key=Signer(secret=b"k" * 32))
    log.append_many([("admin", "ops", {"detail": {"hash": "x", "quote": '"hash":"'}}), ("admin", "ops", {"n": 1})])
    report = verify(tmp_path / "audit.jsonl", Signer(secret=b"k" * 32))
    assert report.ok and report.records == 2
    first = json.loads((tmp_path / "audit.jsonl").read_bytes().splitlines()[0])
    assert first["hash"] == record_hash(first)
