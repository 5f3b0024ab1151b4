"""A burst bigger than the remaining budget, through the real placement engine and the ledger.

Placement sees each budget's committed spend (spent + reserved) and the dispatcher's reservation
is the atomic gate; tasks that do not fit stay queued for on-prem.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from facefleet.config import CloudPoolConfig
from facefleet.scheduler.cloud.pool_view import cloud_pool_state
from facefleet.scheduler.cloud.prices import PriceBook, SpotPrice
from facefleet.scheduler.cloud.provisioner import Provisioner
from facefleet.scheduler.ledger import BudgetAccount, SpendLedger, Usage, month_of
from facefleet.scheduler.placement.engine import place
from facefleet.scheduler.placement.model import Budget, PoolState, TaskSpec, World
from facefleet.scheduler.placement.policy import load_budgets, load_ruleset

POLICIES = Path(__file__).resolve().parents[2] / "policies" / "default"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


class FixedFeed:
    provider = "aws"

    def __init__(self, price: float) -> None:
        self.price = price

    def refresh(self, now: datetime) -> list[SpotPrice]:
        return [SpotPrice("aws", "us-east-1", "g5.xlarge", self.price, now)]


class NoBackend:
    provider = "aws"


def test_burst_sends_exactly_the_affordable_tasks_to_cloud(tmp_path: Path) -> None:
    rules = load_ruleset((POLICIES / "rules.yaml").read_text(), "rules.yaml")
    caps = load_budgets((POLICIES / "budgets.yaml").read_text(), "budgets.yaml")
    marketing = caps["marketing"]
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    account = BudgetAccount(marketing.name, marketing.monthly_cap_usd, marketing.alert_pct)
    # Earlier this month: spend that leaves $1.00 of the cap.
    earlier_usd = marketing.monthly_cap_usd - 1.0
    ledger.record(Usage("old", "promo-x", "promo-urgent-burst", "aws-use1-g5", "marketing", "aws", "i-0",
                        3600.0, earlier_usd, NOW), account)  # fmt: skip

    pool_config = CloudPoolConfig(name="aws-use1-g5", provider="aws", region="us-east-1",
                                  instance_type="g5.xlarge", max_instances=50)  # fmt: skip
    provisioner = Provisioner({"aws": NoBackend()}, [pool_config], lambda: NOW.timestamp())  # type: ignore[dict-item]
    prices = PriceBook([FixedFeed(0.42)])
    prices.refresh(NOW)
    onprem = PoolState(name="onprem-a", provider="onprem", trust_zone="private", free_slots=0, queue_wait_s=900,
                       sec_per_frame=0.04)  # fmt: skip
    cloud_base = PoolState(name="aws-use1-g5", provider="aws", trust_zone="cloud", region="us-east-1",
                           sec_per_frame=0.06)  # fmt: skip

    to_cloud: list[str] = []
    queued_onprem: list[str] = []
    estimates: list[float] = []
    for i in range(40):
        month = month_of(NOW)
        committed = ledger.spent("marketing", month) + ledger.reserved("marketing", month)
        world = World(
            pools=(onprem, cloud_pool_state(pool_config, provisioner, prices, NOW, base=cloud_base)),
            budgets={"marketing": Budget("marketing", marketing.monthly_cap_usd, committed, marketing.alert_pct)},
            locks={},
        )
        task = TaskSpec(id=f"burst-{i}", project="promo-x", sensitivity="public", priority="urgent", frames=3000)
        decision = place(task, rules, world)
        if decision.pool == "aws-use1-g5" and decision.estimate is not None:
            reservation = ledger.reserve(account, task.id, decision.estimate.cost_usd, NOW)
            assert reservation is not None, "placement and the ledger disagree on what fits"
            to_cloud.append(task.id)
            estimates.append(decision.estimate.cost_usd)
        else:
            queued_onprem.append(task.id)

    per_task = estimates[0]
    assert all(abs(e - per_task) < 1e-9 for e in estimates)
    affordable = int(1.0 // per_task)
    assert 0 < affordable < 40  # the burst really is larger than the remaining budget
    assert len(to_cloud) == affordable, (affordable, per_task)
    assert len(queued_onprem) == 40 - affordable
    assert ledger.spent("marketing", month_of(NOW)) + ledger.reserved("marketing", month_of(NOW)) <= 1000.0


def test_unknown_price_is_never_free() -> None:
    pool_config = CloudPoolConfig(name="aws-use1-g5", provider="aws", region="us-east-1", instance_type="g5.xlarge")
    provisioner = Provisioner({"aws": NoBackend()}, [pool_config], lambda: NOW.timestamp())  # type: ignore[dict-item]
    state = cloud_pool_state(pool_config, provisioner, PriceBook([FixedFeed(0.42)]), NOW)
    assert state.price_stale and state.price_per_hour == float("inf")
    capped = pool_config.model_copy(update={"max_price_usd_per_hour": 0.8})
    assert cloud_pool_state(capped, provisioner, PriceBook([]), NOW).price_per_hour == 0.8
