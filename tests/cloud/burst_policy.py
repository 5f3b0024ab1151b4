"""The cloud-burst policy the budget tests and bench/replay_accuracy.py share: public work may burst
to `cloud-*` pools charged to the `burst` budget; everything else stays on `onprem-*`."""

from __future__ import annotations

from pathlib import Path

BURST_RULES = """
rules:
  - id: burst
    match: {sensitivity: [public]}
    allow: ["onprem-*", "cloud-*"]
    prefer: cost
    budget: burst
  - id: default
    match: {}
    allow: ["onprem-*"]
"""


def write_burst_policy(directory: Path, cap: float, locks: str = "locks: []\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(BURST_RULES)
    (directory / "budgets.yaml").write_text(f"budgets:\n  - {{name: burst, monthly_cap_usd: {cap}, alert_pct: 80}}\n")
    (directory / "locks.yaml").write_text(locks)
    return directory


def cloud_pool_toml(name: str, price_per_hour: float, sec_per_frame: float) -> str:
    """A `facefleet.toml` declaring one spot cloud pool for `facefleet scheduler run`."""
    return (
        f'[[scheduler.pools]]\nname = "{name}"\nprovider = "aws"\ntrust_zone = "cloud"\n'
        f"price_per_hour = {price_per_hour}\nspot = true\nsec_per_frame = {sec_per_frame}\n"
    )
