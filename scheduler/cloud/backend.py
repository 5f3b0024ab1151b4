"""What the provisioner needs from a cloud: launch, list (by our tags), terminate. Plus the boot script."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from string import Template
from typing import Protocol

BOOT_SCRIPT_TEMPLATE = Path(__file__).with_name("boot_script.sh.tmpl")

TAG_POOL = "facefleet:pool"
TAG_INSTANCE = "facefleet:instance"
TAG_CLUSTER = "facefleet:cluster"


class CloudLaunchError(RuntimeError):
    """The provider refused or failed a launch (capacity, quota, price, auth). Carries its reason."""

    def __init__(self, provider: str, pool: str, reason: str, message: str) -> None:
        super().__init__(f"{provider} launch for pool {pool!r} failed ({reason}): {message}")
        self.provider = provider
        self.pool = pool
        self.reason = reason


@dataclass(frozen=True)
class LaunchRequest:
    pool: str
    instance_id: str  # facefleet's own id: tag, boot script and agent heartbeats all carry it
    region: str
    instance_type: str
    max_price_usd_per_hour: float | None
    boot_script: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CloudInstance:
    instance_id: str  # facefleet id (from the tag)
    provider_id: str  # EC2 instance id or Azure VM name
    pool: str
    state: str  # provider state, lower case: pending, running, succeeded, terminated, ...
    launched_at: datetime | None = None


class CloudBackend(Protocol):
    provider: str

    def launch(self, request: LaunchRequest) -> CloudInstance: ...

    def describe(self, cluster: str) -> list[CloudInstance]: ...

    def terminate(self, instance: CloudInstance) -> None: ...


@dataclass(frozen=True)
class BootSpec:
    pool: str
    instance_id: str
    scheduler: str
    provider: str
    region: str
    tls_dir: str
    slots: int = 1
    package_spec: str = "facefleet[gpu]"


def render_boot_script(spec: BootSpec, template_path: Path = BOOT_SCRIPT_TEMPLATE) -> str:
    """Fill the boot script template; every value is shell-quoted, so odd names cannot inject."""
    if not spec.scheduler:
        raise ValueError("cloud.scheduler_address is empty: cloud agents need host:port of the scheduler")
    values = {
        "pool": spec.pool,
        "instance_id": spec.instance_id,
        "scheduler": spec.scheduler,
        "provider": spec.provider,
        "region": spec.region,
        "tls_dir": spec.tls_dir,
        "slots": str(spec.slots),
        "package_spec": spec.package_spec,
    }
    return Template(template_path.read_text()).substitute({k: shlex.quote(v) for k, v in values.items()})


def facefleet_tags(cluster: str, pool: str, instance_id: str) -> dict[str, str]:
    return {TAG_CLUSTER: cluster, TAG_POOL: pool, TAG_INSTANCE: instance_id}
