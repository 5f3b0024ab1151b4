"""One config file (`facefleet.toml`) plus `FACEFLEET_*` environment variables, validated.

The defaults run everything embedded on one machine: SQLite store, policies from files under
`policies/`, capacity from heartbeats only, clouds off. Precedence: init arguments > environment
(`FACEFLEET_SCHEDULER__LISTEN=...`, `__` separates sections) > the TOML file > defaults.
Each section belongs to one concern; add fields to your own section only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

CONFIG_ENV = "FACEFLEET_CONFIG"
DEFAULT_CONFIG_FILE = Path("facefleet.toml")


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
    source: Literal["file", "consul"] = "file"
    dir: Path = Path("policies/default")
    consul_addr: str = "http://127.0.0.1:8500"
    consul_prefix: str = "facefleet/"
    consul_token: str | None = None


class SchedulerConfig(Section):
    listen: str = "127.0.0.1:50051"
    store_url: str = "sqlite:///var/facefleet.db"
    metrics_port: int = 9464
    heartbeat_timeout_s: float = 10.0
    lost_grace_s: float = 20.0
    prometheus_url: str | None = None  # None: capacity from heartbeats only
    project_limits: dict[str, int] = Field(default_factory=dict)  # max concurrent tasks per project


class AgentConfig(Section):
    listen: str = "127.0.0.1:50061"
    scheduler: str = "127.0.0.1:50051"
    pool: str = "onprem-local"
    trust_zone: Literal["private", "cloud"] = "private"
    provider: str = "onprem"
    region: str = "local"
    slots: int = 1
    models_dir: Path = Path("models")
    work_dir: Path = Path("var/agent")
    allowed_roots: list[Path] = Field(default_factory=lambda: [Path("var/data")])
    max_input_bytes: int = 2 * 1024**3
    execution_providers: list[str] = Field(default_factory=list)  # empty = best available
    metrics_port: int = 9465
    heartbeat_interval_s: float = 2.0
    agent_id: str = ""                  # empty: <pool>-<hostname>-<port>
    advertise_address: str = ""         # address sent in heartbeats; empty: the bound listen address
    instance_id: str = ""               # cloud instance id, matched against the provisioner's records
    # Shared by every agent that may resume a task: checkpoints live at file://<root>/<task_id>/.
    checkpoint_root: Path = Path("var/checkpoints")


class ResidencyConfig(Section):
    """Storage a private task's input and output URIs may use (prefix match)."""

    private_storage_prefixes: list[str] = Field(default_factory=lambda: ["file://"])


class AuditConfig(Section):
    path: Path = Path("var/audit.jsonl")
    signing_key: Path | None = None


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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Load settings from `path` (or $FACEFLEET_CONFIG, or ./facefleet.toml when present)."""
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist; create it or drop --config")
        os.environ[CONFIG_ENV] = str(path)
    return Settings(**overrides)  # type: ignore[arg-type]
