"""The one place a production agent is assembled from settings (`facefleet agent run`).

mTLS server credentials (plaintext only with `tls.insecure`), the role gate, heartbeat channels to
every scheduler replica, the C2PA signing material checked at start, and on cloud instances the
spot interruption watcher. The CLI parses flags into an `AgentConfig` and calls `start_agent`.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from facefleet.agent.interruption import (
    METADATA_BASE_URL,
    AwsInterruptionWatcher,
    AzureScheduledEventsWatcher,
    InterruptionWatcher,
)
from facefleet.agent.pipeline.provenance import C2paSigningKey, ProvenanceSigningFailed
from facefleet.agent.server import AgentHandle, serve_agent
from facefleet.config import AgentConfig, TLSConfig
from facefleet.security.roles import RoleGate
from facefleet.security.tls import TLSMaterialError, secure_channel, server_credentials_unless_insecure


class AgentStartError(Exception):
    """The agent cannot start as configured: `message` says what, `hint` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def interruption_watcher(provider: str, metadata_url: str, instance_id: str) -> InterruptionWatcher | None:
    """The spot notice watcher for a cloud agent; None on-prem."""
    base = metadata_url or METADATA_BASE_URL
    if provider == "aws":
        return AwsInterruptionWatcher(base)
    if provider == "azure":
        return AzureScheduledEventsWatcher(base, vm_name=instance_id or None)
    return None


def start_agent(config: AgentConfig, tls: TLSConfig, metadata_url: str = "") -> AgentHandle:
    """Check the material, then serve and heartbeat to every scheduler in `config.scheduler`
    (comma-separated replicas). Raises AgentStartError for anything a person must fix."""
    schedulers = [address.strip() for address in config.scheduler.split(",") if address.strip()]
    if not schedulers:
        raise AgentStartError(
            "no scheduler address", "pass --scheduler host:port (comma-separate replicas) or set agent.scheduler"
        )
    try:  # fail at start, not on the first task, when the signing material is unusable
        C2paSigningKey.from_config(config.c2pa_cert, config.c2pa_key)
    except ProvenanceSigningFailed as error:
        raise AgentStartError(
            error.message, "`facefleet certs init` writes c2pa-signer.pem and c2pa-signer-key.pem"
        ) from None
    try:
        credentials = server_credentials_unless_insecure(tls, "agent")

        def channel_to(address: str) -> Callable[[], grpc.Channel]:
            return lambda: secure_channel(address, tls, "agent")

        factories = [channel_to(address) for address in schedulers]
        factories[0]().close()  # fail now, not in the heartbeat thread, when material is missing
    except TLSMaterialError as error:
        raise AgentStartError(str(error), "or pass --insecure for local development") from None
    try:
        return serve_agent(
            config,
            credentials,
            [RoleGate(None, insecure=tls.insecure)],
            scheduler_channel_factories=factories,
            interruption_watcher=interruption_watcher(config.provider, metadata_url, config.instance_id),
        )
    except OSError as error:
        raise AgentStartError(f"cannot start the agent: {error}", "pick a free --listen / --metrics-port") from None
