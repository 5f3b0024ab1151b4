"""Load a policy directory (layout of policies/default) into Consul KV, as terraform/modules/consul-rules does.

  rules.yaml                              -> <prefix>rules            (the file's bytes)
  budgets.yaml  budgets: [{name, ...}]    -> <prefix>budgets/<name>   {monthly_cap_usd, alert_pct}
  locks.yaml    locks: [{project, ...}]   -> <prefix>locks/<project>  {reason, by}

Usage (compose runs it in the scheduler image): python seed_kv.py POLICY_DIR [CONSUL_HTTP_ADDR] [PREFIX]
CONSUL_HTTP_TOKEN is sent when set. Exits non-zero with the failing key on any error.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

BUDGET_FIELDS = ("monthly_cap_usd", "alert_pct")
LOCK_FIELDS = ("reason", "by")


def _entries(path: Path, section: str, key_field: str) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    document = yaml.safe_load(path.read_text()) or {}
    entries = document.get(section, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and key_field in e for e in entries):
        raise ValueError(f"{path}: `{section}` must be a list of mappings, each with `{key_field}`")
    return entries


def kv_documents(policy_dir: Path, prefix: str = "facefleet/") -> dict[str, str]:
    """Every Consul key and its value for one policy directory."""
    rules = policy_dir / "rules.yaml"
    if not rules.is_file():
        raise FileNotFoundError(f"{rules} not found; point at a directory laid out like policies/default")
    documents = {f"{prefix}rules": rules.read_text()}
    for entry in _entries(policy_dir / "budgets.yaml", "budgets", "name"):
        value = {field: entry[field] for field in BUDGET_FIELDS if field in entry}
        documents[f"{prefix}budgets/{entry['name']}"] = yaml.safe_dump(value, sort_keys=False)
    for entry in _entries(policy_dir / "locks.yaml", "locks", "project"):
        value = {field: entry[field] for field in LOCK_FIELDS if field in entry}
        documents[f"{prefix}locks/{entry['project']}"] = yaml.safe_dump(value, sort_keys=False)
    return documents


def put(addr: str, key: str, value: str, token: str | None) -> None:
    request = urllib.request.Request(f"{addr.rstrip('/')}/v1/kv/{key}", data=value.encode(), method="PUT")
    if token:
        request.add_header("X-Consul-Token", token)
    with urllib.request.urlopen(request, timeout=10) as reply:
        if reply.read().strip() != b"true":
            raise RuntimeError(f"Consul refused to write {key}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    policy_dir = Path(argv[0])
    addr = argv[1] if len(argv) > 1 else os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500")
    prefix = argv[2] if len(argv) > 2 else "facefleet/"
    try:
        documents = kv_documents(policy_dir, prefix)
        for key, value in documents.items():
            put(addr, key, value, os.environ.get("CONSUL_HTTP_TOKEN"))
    except (OSError, ValueError, RuntimeError, yaml.YAMLError) as error:
        print(f"seed_kv: {error}", file=sys.stderr)
        return 1
    print(f"seed_kv: wrote {len(documents)} keys under {prefix} from {policy_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
