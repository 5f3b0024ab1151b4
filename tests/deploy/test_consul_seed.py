"""deploy/consul/seed_kv.py: the keys it writes are the ones the scheduler's Consul source reads."""

from __future__ import annotations

import base64
import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from facefleet.scheduler.rules_source.consul import ConsulRuleSource

REPO_ROOT = Path(__file__).resolve().parents[2]
POLICIES = REPO_ROOT / "policies" / "default"


def _load_seed_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("seed_kv", REPO_ROOT / "deploy" / "consul" / "seed_kv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed_kv = _load_seed_module()


def test_documents_for_default_policies_parse_in_the_scheduler() -> None:
    documents = seed_kv.kv_documents(POLICIES)
    assert documents["facefleet/rules"] == (POLICIES / "rules.yaml").read_text()
    entries = [{"Key": key, "Value": base64.b64encode(value.encode()).decode()} for key, value in documents.items()]
    ruleset, budgets, locks = ConsulRuleSource()._parse(entries)
    assert ruleset is not None
    assert set(budgets) == {key.removeprefix("facefleet/budgets/") for key in documents if "/budgets/" in key}
    assert budgets, "policies/default has budgets; none were written"
    assert set(locks) == {key.removeprefix("facefleet/locks/") for key in documents if "/locks/" in key}
    assert locks, "policies/default has locks; none were written"


def test_missing_rules_is_actionable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"rules\.yaml not found"):
        seed_kv.kv_documents(tmp_path)


def test_malformed_budgets_is_actionable(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("rules: []\n")
    (tmp_path / "budgets.yaml").write_text("budgets: {marketing: 10}\n")
    with pytest.raises(ValueError, match="budgets"):
        seed_kv.kv_documents(tmp_path)


class _RecordingKV(BaseHTTPRequestHandler):
    writes: dict[str, bytes] = {}

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.writes[self.path.removeprefix("/v1/kv/")] = body
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def kv_server() -> Iterator[str]:
    _RecordingKV.writes = {}
    server = HTTPServer(("127.0.0.1", 0), _RecordingKV)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=5)


def test_main_puts_every_document(kv_server: str) -> None:
    assert seed_kv.main([str(POLICIES), kv_server, "facefleet/"]) == 0
    expected = seed_kv.kv_documents(POLICIES)
    assert {key: value.decode() for key, value in _RecordingKV.writes.items()} == expected


def test_main_reports_unreachable_consul(capsys: pytest.CaptureFixture[str]) -> None:
    assert seed_kv.main([str(POLICIES), "http://127.0.0.1:1", "facefleet/"]) == 1
    assert "seed_kv:" in capsys.readouterr().err
