"""Seed Consul KV from a policy directory (layout of policies/default), keeping to each key's owner.

  rules.yaml                              -> <prefix>rules            (the file's bytes; written)
  budgets.yaml  budgets: [{name, ...}]    -> <prefix>budgets/<name>   {monthly_cap_usd, alert_pct}; created only
  locks.yaml    locks: [{project, ...}]   -> <prefix>locks/<project>  {reason, by}; created only

Budgets and locks belong to `facefleet budget set` and `facefleet lock`/`unlock` once they exist:
this script creates the ones that are missing (Consul `?cas=0`) and never overwrites or deletes
one, so running it again keeps every cap and lock set since. The rules key is written unless
`--no-rules` says Terraform owns it (terraform/modules/consul-rules).

Usage (compose runs it in the scheduler image):
  python seed_kv.py POLICY_DIR [CONSUL_HTTP_ADDR] [PREFIX] [--no-rules] [--dc DC]
Address, token and TLS follow the consul CLI: CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_SSL,
CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY. Exits non-zero with the failing key on any error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import requests
import yaml
from consul import ConsulException

from facefleet.scheduler.rules_source.consul_endpoint import resolve_endpoint

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


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="seed_kv.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("policy_dir", type=Path)
    parser.add_argument("addr", nargs="?", default=None, help="Consul address (default: CONSUL_HTTP_ADDR)")
    parser.add_argument("prefix", nargs="?", default="facefleet/")
    parser.add_argument("--no-rules", action="store_true", help="leave <prefix>rules to Terraform")
    parser.add_argument("--dc", default=None, help="Consul datacenter (default: the agent's)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    args = _arguments(argv)
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    rules_key = f"{prefix}rules"
    written: list[str] = []
    kept: list[str] = []
    key = ""
    try:
        documents = kv_documents(args.policy_dir, prefix)
        client = resolve_endpoint(args.addr, dc=args.dc).client(timeout_s=10)
        for key, value in documents.items():
            if key == rules_key and args.no_rules:
                continue
            created = client.kv.put(key, value, cas=None if key == rules_key else 0)
            if created is not True and key == rules_key:
                raise RuntimeError("Consul refused the write")
            (written if created is True else kept).append(key)
    except (OSError, ValueError, RuntimeError, yaml.YAMLError, ConsulException, requests.RequestException) as error:
        where = f"{key}: " if key else ""
        print(f"seed_kv: {where}{error.__class__.__name__}: {error}", file=sys.stderr)
        return 1
    print(f"seed_kv: wrote {len(written)} keys under {prefix} from {args.policy_dir}")
    if kept:
        print(f"seed_kv: kept {len(kept)} existing keys (owned by facefleet budget/lock): {', '.join(kept)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
