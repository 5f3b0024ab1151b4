"""One config file (`facefleet.toml`) plus `FACEFLEET_*` environment variables, validated.

The defaults run everything embedded on one machine: SQLite store, policies from files under
`policies/`, capacity from heartbeats only, clouds off. Precedence: init arguments > environment
(`FACEFLEET_SCHEDULER__LISTEN=...`, `__` separates sections) > the TOML file > defaults.
Each section belongs to one concern; add fields to your own section only.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from facefleet.domain import CLOUD_ZONE, PRIVATE_ZONE, TrustZone
from facefleet.money import RunMargin, Seconds, UsdPerHour

CONFIG_ENV = "FACEFLEET_CONFIG"
DEFAULT_CONFIG_FILE = Path("facefleet.toml")
_CONFIG_PATH: ContextVar[Path | None] = ContextVar("facefleet_config_path", default=None)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(Section):
    """mTLS material. `insecure = true` is for local development only (loud warning)."""

    dir: Path = Path("var/certs")
    ca: Path | None = None  # default: <dir>/ca.pem
    cert: Path | None = None  # default: <dir>/<component>.pem
    key: Path | None = None  # default: <dir>/<component>-key.pem
    insecure: bool = False


class PolicyConfig(Section):
    """Where rules, budgets and locks live. Consul settings left unset fall back to the consul CLI's
    environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN[_FILE], CONSUL_HTTP_SSL, CONSUL_HTTP_SSL_VERIFY,
    CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY), then to 127.0.0.1:8500 over
    HTTP (scheduler/rules_source/consul_endpoint.py)."""

    source: Literal["file", "consul"] = "file"
    dir: Path = Path("policies/default")
    consul_addr: str | None = None  # host:port, http://host:port or https://host:port
    consul_prefix: str = "facefleet/"
    consul_token: str | None = None  # ACL token: read on the prefix, write on budgets/ and locks/
    consul_dc: str | None = None  # datacenter to read and write; None: the agent's own
    consul_ssl: bool | None = None  # HTTPS even when the address has no https://
    consul_ca: Path | None = None  # CA bundle (or c_rehash directory) for the agent's certificate
    consul_client_cert: Path | None = None  # for agents with verify_incoming; with consul_client_key
    consul_client_key: Path | None = None
    consul_verify: bool | None = None  # false: do not verify the agent's certificate (development only)


class PoolConfig(Section):
    """A pool known from config before any agent heartbeats (cloud pools that scale from zero)."""

    name: str
    provider: str = "onprem"
    trust_zone: TrustZone = CLOUD_ZONE
    region: str = ""
    instance_type: str = ""
    max_instances: int = Field(default=0, ge=0)
    provision_s: Seconds = 0.0
    sec_per_frame: Seconds = Field(default=0.05, gt=0)
    price_per_hour: UsdPerHour = 0.0
    spot: bool = False
    # Assignments a session agent of this pool may hold beyond its slots, waiting in its own queue
    # (docs/operations.md): outstanding work per agent never exceeds slots + prefetch.
    prefetch: int = Field(default=0, ge=0)
    # The run bound on a paid pool (docs/finance.md): the agent stops a run at run_margin x its
    # estimate (capped by the task's SLA); the reservation adds run_slack_s for dispatch and stop.
    run_margin: RunMargin = 1.5
    run_slack_s: Seconds = 2.0


class SchedulerConfig(Section):
    listen: str = "127.0.0.1:50051"
    store_url: str = "sqlite:///var/facefleet.db"
    metrics_port: int = 9464
    heartbeat_timeout_s: float = 10.0
    lost_grace_s: float = 20.0
    prometheus_url: str | None = None  # None: capacity from heartbeats only
    # Capacity (scheduler/capacity.py): PromQL per signal, results keyed by the `pool` label;
    # a signal missing here keeps its default from scheduler.capacity.DEFAULT_PROMETHEUS_QUERIES.
    prometheus_queries: dict[str, str] = Field(default_factory=dict)
    prometheus_max_age_s: float = Field(default=30.0, gt=0)  # older data counts as stale
    prometheus_timeout_s: float = Field(default=1.0, gt=0, le=1)  # short: a slow Prometheus is a stale one
    pools: list[PoolConfig] = Field(default_factory=list)  # static pools merged with heartbeats
    project_limits: dict[str, int] = Field(default_factory=dict)  # max concurrent tasks per project
    # A submit that arrives while the dispatcher idles is stored with its launch in one commit
    # (docs/operations.md, "Launch with intake"); false: every submit has its own intake commit.
    launch_with_intake: bool = True


class AgentConfig(Section):
    listen: str = "127.0.0.1:50061"
    scheduler: str = "127.0.0.1:50051"
    pool: str = "onprem-local"
    trust_zone: TrustZone = PRIVATE_ZONE
    provider: str = "onprem"
    region: str = "local"
    slots: int = 1
    # Runs accepted beyond the free slots (the scheduler's pool `prefetch`) wait in a FIFO, at most
    # this many; further assignments are refused with retry. 0: none wait.
    max_waiting: int = Field(default=4, ge=0)
    models_dir: Path = Path("models")
    work_dir: Path = Path("var/agent")
    allowed_roots: list[Path] = Field(default_factory=lambda: [Path("var/data")])
    max_input_bytes: int = 2 * 1024**3
    execution_providers: list[str] = Field(default_factory=list)  # empty = best available
    metrics_port: int = 9465
    heartbeat_interval_s: float = 2.0
    agent_id: str = ""  # empty: <pool>-<hostname>-<port>
    advertise_address: str = ""  # address sent in heartbeats; empty: the bound listen address
    instance_id: str = ""  # cloud instance id, matched against the provisioner's records
    # Shared by every agent that may resume a task: checkpoints live at file://<root>/<task_id>/.
    checkpoint_root: Path = Path("var/checkpoints")
    # C2PA provenance signing (cert chain PEM + EC P-256 key); both unset: labelled but unsigned outputs.
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None


class ResidencyConfig(Section):
    """Storage a private task's input and output URIs may use (prefix match)."""

    private_storage_prefixes: list[str] = Field(default_factory=lambda: ["file://"])


class AuditConfig(Section):
    path: Path = Path("var/audit.jsonl")
    signing_key: Path | None = None
    # The scheduler seals (hashes, signs) and writes its dispatch records in a child process, off
    # the GIL of the dispatch path; false: on a thread of the scheduler process (docs/security.md).
    separate_writer: bool = True


class CloudPoolConfig(Section):
    """One burstable cloud pool: where instances launch and how many may exist (issue #6)."""

    name: str
    provider: Literal["aws", "azure"]
    region: str
    instance_type: str  # EC2 instance type or Azure VM size
    max_instances: int = Field(default=2, ge=0)
    slots_per_instance: int = Field(default=1, ge=1)
    max_price_usd_per_hour: UsdPerHour | None = None  # spot bid cap; None = up to on-demand price
    idle_teardown_s: float = Field(default=600.0, gt=0)
    register_timeout_s: float = Field(default=900.0, gt=0)
    launch_backoff_s: float = Field(default=120.0, ge=0)  # pause launches after a provider refusal


class AwsCloudConfig(Section):
    launch_template: str | None = None  # name or lt- id; when set, the fields below are optional
    ami_id: str | None = None
    instance_profile: str | None = None  # IAM instance profile name or ARN
    subnet_id: str | None = None
    security_group_ids: list[str] = Field(default_factory=list)
    key_name: str | None = None


class AzureCloudConfig(Section):
    subscription_id: str | None = None
    resource_group: str | None = None
    subnet_id: str | None = None  # full ARM id of the subnet the VMs join
    image: str = "Canonical:ubuntu-24_04-lts:server:latest"  # publisher:offer:sku:version
    admin_username: str = "facefleet"
    ssh_public_key: str | None = None
    eviction_policy: Literal["Delete", "Deallocate"] = "Delete"


class CloudConfig(Section):
    """Spot bursting. Off by default: no cloud pool exists until one is listed here."""

    enabled: bool = False
    cluster: str = "facefleet"  # tag value that scopes every instance to this deployment
    scheduler_address: str = ""  # how cloud agents reach the scheduler (host:port)
    agent_tls_dir: str = "/etc/facefleet/certs"
    price_refresh_s: float = Field(default=300.0, gt=0)
    price_stale_after_s: float = Field(default=900.0, gt=0)
    # Spend enforcement (docs/finance.md): how often running cloud attempts accrue and extend.
    spend_accrual_s: Seconds = Field(default=0.5, gt=0)
    # Off: reservations are never extended, and the agents' run limits alone bound spend (a run
    # longer than its bound is stopped and re-queued; docs/finance.md states the bound either way).
    spend_enforcement: bool = True
    azure_price_api: str = "https://prices.azure.com/api/retail/prices"
    aws: AwsCloudConfig = Field(default_factory=AwsCloudConfig)
    azure: AzureCloudConfig = Field(default_factory=AzureCloudConfig)
    pools: list[CloudPoolConfig] = Field(default_factory=list)


class ConsoleConfig(Section):
    """The web console (`facefleet console serve`): where it listens, how long a session token lives.

    `secret_file` signs session tokens (default `<tls dir>/console-secret`, created 0600 on first use);
    `world`/`workload` feed the finance what-if sweep (default: the packaged ones beside the policy).
    """

    listen: str = "127.0.0.1:8470"
    token_ttl_s: int = Field(default=12 * 3600, gt=0)
    secret_file: Path | None = None
    world: Path | None = None
    workload: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEFLEET_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("var")
    log_level: str = "info"
    log_format: Literal["json", "console"] = "json"
    tls: TLSConfig = Field(default_factory=TLSConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    residency: ResidencyConfig = Field(default_factory=ResidencyConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_PATH.get() or Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Load settings from `path` (or $FACEFLEET_CONFIG, or ./facefleet.toml when present)."""
    if path is not None and not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist; create it or drop --config")
    token = _CONFIG_PATH.set(path)
    where = path or Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"config file {where}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {where}: not valid TOML: {exc}") from None
    finally:
        _CONFIG_PATH.reset(token)
