"""The provisioner against a real moto_server EC2 endpoint: launch, tag, describe, teardown, limits."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from facefleet.config import AwsCloudConfig, CloudPoolConfig
from facefleet.scheduler.cloud.aws import AwsSpotBackend
from facefleet.scheduler.cloud.backend import TAG_CLUSTER, TAG_INSTANCE, TAG_POOL
from facefleet.scheduler.cloud.provisioner import Provisioner
from facefleet.scheduler.metrics import CLOUD_INSTANCES

AMI = "ami-03cf127a"  # one of moto's built-in AMIs


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def running_instances(ec2: Any) -> list[dict[str, Any]]:
    pages = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def make_provisioner(ec2: Any, clock: FakeClock, **pool_overrides: Any) -> Provisioner:
    settings: dict[str, Any] = {
        "name": "aws-gpu",
        "provider": "aws",
        "region": "us-east-1",
        "instance_type": "g4dn.xlarge",
        "max_instances": 2,
        "max_price_usd_per_hour": 0.42,
        "idle_teardown_s": 300,
        "register_timeout_s": 600,
    }
    pool = CloudPoolConfig(**{**settings, **pool_overrides})
    backend = AwsSpotBackend(ec2, AwsCloudConfig(ami_id=AMI, key_name=None))
    return Provisioner({"aws": backend}, [pool], clock, cluster="test-cluster", scheduler_address="sched.example:50051")


def test_launch_tags_describe_and_register(ec2: Any) -> None:
    clock = FakeClock()
    provisioner = make_provisioner(ec2, clock)

    launched = provisioner.ensure_capacity("aws-gpu", wanted_slots=1)

    assert len(launched) == 1
    [instance] = running_instances(ec2)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags == {TAG_CLUSTER: "test-cluster", TAG_POOL: "aws-gpu", TAG_INSTANCE: launched[0]}
    assert instance["InstanceType"] == "g4dn.xlarge"
    assert instance.get("InstanceLifecycle") == "spot"
    user_data = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
    script = base64.b64decode(user_data["UserData"]["Value"]).decode()
    assert "facefleet agent run --pool aws-gpu --trust-zone cloud --scheduler sched.example:50051" in script
    assert f"INSTANCE_ID={launched[0]}" in script
    assert "--provider aws --region us-east-1" in script

    described = AwsSpotBackend(ec2, AwsCloudConfig(ami_id=AMI)).describe("test-cluster")
    assert [(d.instance_id, d.pool) for d in described] == [(launched[0], "aws-gpu")]
    assert AwsSpotBackend(ec2, AwsCloudConfig(ami_id=AMI)).describe("other-cluster") == []

    # The agent registers with the EC2 id it reads from IMDS: the provisioner matches it too.
    assert provisioner.on_agent_registered(instance["InstanceId"])
    assert provisioner.instances("aws-gpu")[0].state == "ready"
    assert CLOUD_INSTANCES.labels(pool="aws-gpu", state="ready")._value.get() == 1
    assert not provisioner.on_agent_registered("i-unknown")


def test_spot_market_options_sent(ec2: Any) -> None:
    backend = AwsSpotBackend(ec2, AwsCloudConfig(ami_id=AMI, subnet_id="subnet-1", security_group_ids=["sg-1"]))
    from facefleet.scheduler.cloud.backend import LaunchRequest

    args = backend._launch_arguments(
        LaunchRequest("aws-gpu", "ff-1", "us-east-1", "g5.xlarge", 0.5, "#!/bin/bash\n", {"k": "v"})
    )
    assert args["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
            "MaxPrice": "0.5000",
        },
    }
    assert args["ClientToken"] == "ff-1"
    assert args["SubnetId"] == "subnet-1" and args["SecurityGroupIds"] == ["sg-1"]


def test_max_instances_hold_counting_pending(ec2: Any) -> None:
    clock = FakeClock()
    provisioner = make_provisioner(ec2, clock)

    assert len(provisioner.ensure_capacity("aws-gpu", wanted_slots=5)) == 2
    assert provisioner.can_provision("aws-gpu") == 0
    # Both are still booting (pending): asking again launches nothing.
    assert provisioner.ensure_capacity("aws-gpu", wanted_slots=5) == []
    assert len(running_instances(ec2)) == 2
    assert provisioner.pending_slots("aws-gpu") == 2
    assert CLOUD_INSTANCES.labels(pool="aws-gpu", state="pending")._value.get() == 2


def test_booting_capacity_is_counted_before_launching_more(ec2: Any) -> None:
    provisioner = make_provisioner(ec2, FakeClock(), max_instances=5)
    assert len(provisioner.ensure_capacity("aws-gpu", wanted_slots=1)) == 1
    assert provisioner.ensure_capacity("aws-gpu", wanted_slots=1) == []  # one already on its way
    assert len(provisioner.ensure_capacity("aws-gpu", wanted_slots=3)) == 2
    assert len(running_instances(ec2)) == 3


def test_idle_teardown_only_after_idle_time(ec2: Any) -> None:
    clock = FakeClock()
    provisioner = make_provisioner(ec2, clock)
    [busy_id, idle_id] = provisioner.ensure_capacity("aws-gpu", wanted_slots=2)
    provisioner.on_agent_registered(busy_id)
    provisioner.on_agent_registered(idle_id)

    clock.now += 200
    provisioner.report_load(busy_id, busy_slots=1)
    assert provisioner.reap() == []

    clock.now += 150  # idle one: 350 s idle > 300; busy one: still busy
    torn = provisioner.reap()
    assert [(t.instance_id, t.reason) for t in torn] == [(idle_id, "idle")]
    assert [i.instance_id for i in provisioner.instances()] == [busy_id]
    remaining = running_instances(ec2)
    assert len(remaining) == 1
    assert {t["Value"] for t in remaining[0]["Tags"] if t["Key"] == TAG_INSTANCE} == {busy_id}

    provisioner.report_load(busy_id, busy_slots=0)  # finished its task now
    clock.now += 299
    assert provisioner.reap() == []
    clock.now += 2
    assert [t.reason for t in provisioner.reap()] == ["idle"]
    assert running_instances(ec2) == []
    # A freed pool may launch again.
    assert provisioner.can_provision("aws-gpu") == 2


def test_never_registered_instances_are_cleaned_up(ec2: Any) -> None:
    clock = FakeClock()
    provisioner = make_provisioner(ec2, clock)
    [stuck] = provisioner.ensure_capacity("aws-gpu", wanted_slots=1)
    clock.now += 599
    assert provisioner.reap() == []
    clock.now += 2
    assert [(t.instance_id, t.reason) for t in provisioner.reap()] == [(stuck, "never_registered")]
    assert running_instances(ec2) == []
    assert not provisioner.on_agent_registered(stuck)  # too late: it is gone


def test_sync_adopts_instances_after_restart_and_drops_vanished(ec2: Any) -> None:
    clock = FakeClock()
    first = make_provisioner(ec2, clock)
    [kept, killed] = first.ensure_capacity("aws-gpu", wanted_slots=2)
    gone = next(i for i in first.instances() if i.instance_id == killed)
    ec2.terminate_instances(InstanceIds=[gone.provider_id])  # e.g. a spot interruption

    restarted = make_provisioner(ec2, clock)
    restarted.sync()
    assert [i.instance_id for i in restarted.instances()] == [kept]
    assert restarted.can_provision("aws-gpu") == 1

    first.sync()
    assert [i.instance_id for i in first.instances()] == [kept]


def test_launch_refusal_backs_off_and_frees_the_slot(ec2: Any) -> None:
    clock = FakeClock()
    pool = CloudPoolConfig(
        name="aws-gpu", provider="aws", region="us-east-1", instance_type="g4dn.xlarge", launch_backoff_s=60
    )
    backend = AwsSpotBackend(ec2, AwsCloudConfig(ami_id=AMI, subnet_id="subnet-0doesnotexist"))
    provisioner = Provisioner({"aws": backend}, [pool], clock, cluster="c", scheduler_address="s:1")
    assert provisioner.ensure_capacity("aws-gpu", wanted_slots=1) == []
    assert provisioner.instances() == []
    assert provisioner.can_provision("aws-gpu") == 0
    clock.now += 61
    assert provisioner.can_provision("aws-gpu") == 2


def test_unknown_pool_error_names_the_configured_pools(ec2: Any) -> None:
    provisioner = make_provisioner(ec2, FakeClock())
    with pytest.raises(KeyError, match="aws-gpu"):
        provisioner.can_provision("nope")
