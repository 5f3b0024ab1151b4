"""Every cloud dollar attributed: an instance's boot and idle time, charged to the account whose rule
caused its launch (Kubecost-style idle allocation).

Task attempts are billed per attempt (scheduler.cloud.budget_gate: from reservation to end, on the
instance the agent reports). What the provider bills beyond them — booting before the agent
registered, idling between tasks and before the teardown — is booked when the provisioner
terminates the instance: one ledger row `instance:<id>`, outcome `idle`, for the instance's lifetime
minus the task-seconds already billed on it, at the pool's price, to the budget, rule and project
of the task that found no slot and made the provisioner launch it (`ProvisionCause`). The ledger
total for an instance then equals its instance-seconds x price.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from facefleet.scheduler.cloud.provisioner import Teardown
from facefleet.scheduler.ledger import SpendLedger, Usage

log = structlog.get_logger()

UNATTRIBUTED = "(unattributed)"  # an adopted instance (launched before a restart): no known cause


def book_instance_end(ledger: SpendLedger, teardown: Teardown, usd_per_hour: float) -> float:
    """Book the boot and idle remainder of a terminated instance; returns the usd booked."""
    instance = teardown.instance
    if instance is None:
        return 0.0
    lifetime_s = max(0.0, teardown.ended_at - instance.launched_at)
    names = {instance.instance_id, *([instance.provider_id] if instance.provider_id else [])}
    busy_s = ledger.instance_seconds(names)
    idle_s = max(0.0, lifetime_s - busy_s)
    if idle_s <= 0:
        return 0.0
    cause = instance.cause
    usage = Usage(
        task_id=f"instance:{instance.instance_id}",
        project=cause.project if cause else "",
        rule=cause.rule if cause else "",
        pool=instance.pool,
        budget=cause.budget if cause else UNATTRIBUTED,
        provider=instance.provider,
        instance_id=instance.provider_id or instance.instance_id,
        instance_seconds=idle_s,
        usd_per_hour=usd_per_hour,
        ended_at=datetime.fromtimestamp(teardown.ended_at, UTC),
        outcome="idle",
    )
    usd = ledger.record(usage)
    log.info(
        "instance idle cost booked",
        instance_id=instance.instance_id,
        budget=usage.budget,
        lifetime_s=round(lifetime_s, 3),
        task_seconds=round(busy_s, 3),
        idle_s=round(idle_s, 3),
        usd=round(usd, 6),
    )
    return usd
