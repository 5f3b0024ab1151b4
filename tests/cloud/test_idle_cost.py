"""Every cloud dollar attributed: boot and idle time of an instance go to the budget whose rule made
the provisioner launch it, and the ledger reconciles with instance-seconds x price.

Against a real moto_server EC2 endpoint and the recorded Azure Resource Manager endpoint, through
CloudBurst (demand -> launch -> register -> reap) and the BudgetGate (task attempts)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from facefleet.config import AwsCloudConfig, CloudPoolConfig
from facefleet.scheduler.cloud.aws import AwsSpotBackend
from facefleet.scheduler.cloud.azure import AzureSpotBackend
from facefleet.scheduler.cloud.budget_gate import BudgetGate
from facefleet.scheduler.cloud.burst import CloudBurst
from facefleet.scheduler.cloud.idle_cost import book_instance_end
from facefleet.scheduler.cloud.prices import PriceBook, SpotPrice
from facefleet.scheduler.cloud.provisioner import Provisioner
from facefleet.scheduler.ledger import SpendLedger
from facefleet.scheduler.placement.model import Budget, PoolState
from facefleet.scheduler.task_states import SUCCEEDED
from facefleet.v1 import scheduler_pb2
from tests.cloud.test_cloud_azure_backend import arm, settings  # noqa: F401  (fixture)
from tests.cloud.test_cloud_budget_gate import record, result

PRICE = 0.36  # USD per hour: $0.0001 per second
START = 1_800_000_000.0


class FixedFeed:
    def __init__(self, provider: str, region: str, instance_type: str) -> None:
        self.provider, self._key = provider, (region, instance_type)

    def refresh(self, now: datetime) -> list[SpotPrice]:
        return [SpotPrice(self.provider, *self._key, PRICE, now)]


def burst_parts(tmp_path: Path, pool: CloudPoolConfig, backend: Any, clock: list[float]) -> tuple[Any, ...]:
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    provisioner = Provisioner(
        {pool.provider: backend}, [pool], lambda: clock[0], cluster="test-cluster", scheduler_address="sched:50051"
    )
    prices = PriceBook([FixedFeed(pool.provider, pool.region, pool.instance_type)])  # type: ignore[list-item]

    def book(teardown: Any, price: float) -> float:
        return book_instance_end(ledger, teardown, price)

    burst = CloudBurst(provisioner, prices, [pool], lambda: clock[0], on_instance_ended=book)
    gate = BudgetGate(
        ledger, clock=lambda: clock[0], instance_of=lambda agent_id: provisioner.instances()[0].instance_id
    )
    gate.observe_budgets("v1", {"burst": Budget("burst", 100.0)})
    return ledger, provisioner, burst, gate


def heartbeat(instance_id: str, pool: str, busy: int) -> scheduler_pb2.HeartbeatRequest:
    return scheduler_pb2.HeartbeatRequest(agent_id="spot-1", pool=pool, instance_id=instance_id, total_slots=1,
                                          free_slots=1 - busy)  # fmt: skip


def rows(ledger: SpendLedger) -> list[dict[str, Any]]:
    return ledger.records(datetime.fromtimestamp(START - 3600, UTC))


def test_boot_and_idle_time_go_to_the_budget_that_caused_the_launch_aws(tmp_path: Path, ec2: Any) -> None:
    pool = CloudPoolConfig(name="aws-gpu", provider="aws", region="us-east-1", instance_type="g4dn.xlarge",
                           max_instances=1, idle_teardown_s=300, register_timeout_s=600)  # fmt: skip
    clock = [START]
    ledger, provisioner, burst, gate = burst_parts(
        tmp_path, pool, AwsSpotBackend(ec2, AwsCloudConfig(ami_id="ami-03cf127a")), clock
    )
    paid = PoolState(name="aws-gpu", provider="aws", trust_zone="cloud", price_per_hour=PRICE)

    # A promo task of the `burst` rule finds no slot: the provisioner launches an instance for it.
    burst.no_agent(record("t1"), result(0.01, pool=paid), clock[0])
    burst.tick(clock[0])
    [instance] = provisioner.instances()
    assert instance.cause is not None and instance.cause.budget == "burst"
    launched_at = instance.launched_at
    # It boots for 90 s, then its agent registers; the task runs 50 s (billed by the BudgetGate).
    clock[0] += 90
    burst.on_heartbeat(heartbeat(instance.instance_id, "aws-gpu", busy=0), clock[0])
    assert gate.admit(record("t1"), result(0.01, pool=paid), clock[0]) == ""
    gate.on_dispatched(record("t1", agent_id="spot-1"), result(0.01, pool=paid))
    burst.on_heartbeat(heartbeat(instance.instance_id, "aws-gpu", busy=1), clock[0])
    clock[0] += 50
    gate.on_finished(record("t1", SUCCEEDED, "spot-1"))
    burst.on_heartbeat(heartbeat(instance.instance_id, "aws-gpu", busy=0), clock[0])
    # Idle past idle_teardown_s: the reaper terminates it (in moto) and books the rest.
    clock[0] += 301
    burst.tick(clock[0])
    assert provisioner.instances() == []
    states = ec2.describe_instances(InstanceIds=[instance.provider_id])["Reservations"][0]["Instances"][0]["State"]
    assert states["Name"] in ("shutting-down", "terminated")

    booked = rows(ledger)
    [task_row] = [r for r in booked if r["task_id"] == "t1"]
    [idle_row] = [r for r in booked if r["outcome"] == "idle"]
    assert task_row["instance_seconds"] == pytest.approx(50)
    assert idle_row["instance_seconds"] == pytest.approx(90 + 301)
    assert (idle_row["budget"], idle_row["rule"], idle_row["project"]) == ("burst", "burst", "promo")
    lifetime_s = clock[0] - launched_at
    assert sum(r["usd"] for r in booked) == pytest.approx(lifetime_s * PRICE / 3600)  # reconciles
    assert sum(r["instance_seconds"] for r in booked) == pytest.approx(lifetime_s)


def test_an_instance_that_never_registers_is_booked_whole_azure(tmp_path: Path, arm: Any) -> None:  # noqa: F811
    state, client = arm
    pool = CloudPoolConfig(name="azure-t4", provider="azure", region="eastus", instance_type="Standard_NC4as_T4_v3",
                           max_instances=1, max_price_usd_per_hour=0.5, register_timeout_s=60)  # fmt: skip
    clock = [START]
    ledger, provisioner, burst, _gate = burst_parts(tmp_path, pool, AzureSpotBackend(client, settings()), clock)
    paid = PoolState(name="azure-t4", provider="azure", trust_zone="cloud", price_per_hour=PRICE)
    burst.no_agent(record("t2"), result(0.01, pool=paid), clock[0])
    burst.tick(clock[0])
    [instance] = provisioner.instances()
    clock[0] += 61
    burst.tick(clock[0])  # never registered: DELETE through ARM, and its boot time is booked
    assert provisioner.instances() == [] and state.vms == {}
    [idle_row] = rows(ledger)
    assert (idle_row["budget"], idle_row["outcome"], idle_row["pool"]) == ("burst", "idle", "azure-t4")
    assert idle_row["usd"] == pytest.approx((clock[0] - instance.launched_at) * PRICE / 3600)
