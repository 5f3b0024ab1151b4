"""CLI commands: `facefleet agent run|describe|verify-models` (the agent service; `swap` lives in swap_cmds)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from facefleet.cli.output import JSON_OPTION, console, fail, print_json, styled
from facefleet.domain import TRUST_ZONES
from facefleet.long_running import freeze_startup_objects


def _settings(config: Path | None) -> Any:
    from facefleet.config import load_settings

    try:
        return load_settings(config)
    except Exception as error:
        fail(f"cannot load the configuration: {error}", hint="fix the file named above or drop --config")


def register(app: typer.Typer) -> None:
    agent = typer.Typer(help="The agent: runs swap tasks pushed by the scheduler on one GPU node.")
    app.add_typer(agent, name="agent")

    @agent.command("run")
    def run_cmd(
        pool: str = typer.Option(..., "--pool", help="Pool this agent belongs to, e.g. onprem-a."),
        trust_zone: str = typer.Option(..., "--trust-zone", help="private (on-prem) or cloud."),
        scheduler: str = typer.Option(
            "",
            "--scheduler",
            help="Scheduler gRPC host:port; comma-separated: heartbeat to every replica. Default: agent.scheduler.",
        ),
        models: Path = typer.Option(..., "--models", help="Models directory with manifest.toml."),
        listen: str = typer.Option("127.0.0.1:50061", "--listen", help="gRPC listen address (port 0 = free)."),
        slots: int = typer.Option(1, "--slots", min=1, help="Tasks run at the same time."),
        allowed_root: list[Path] = typer.Option(
            [], "--allowed-root", help="Directory file:// inputs/outputs may use (repeat). Default: config."
        ),
        provider: str = typer.Option("onprem", "--provider", help="onprem | aws | azure | local."),
        region: str = typer.Option("local", "--region"),
        metrics_port: int = typer.Option(9465, "--metrics-port", help="Prometheus /metrics port (0 = free)."),
        work_dir: Path | None = typer.Option(None, "--work-dir", help="Temp files per task (default: config)."),
        checkpoint_root: Path | None = typer.Option(
            None, "--checkpoint-root", help="Shared checkpoint directory, the same on every agent of the pool."
        ),
        insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC: local development only."),
        tls_dir: Path | None = typer.Option(None, "--tls-dir", help="mTLS material: ca.pem, agent.pem, agent-key.pem."),
        instance_id: str = typer.Option("", "--instance-id", help="Cloud instance id (the boot script sets it)."),
        metadata_url: str = typer.Option(
            "", "--metadata-url", help="Instance metadata base URL for spot notices (default 169.254.169.254)."
        ),
        c2pa_cert: Path | None = typer.Option(
            None, "--c2pa-cert", help="C2PA signer cert chain PEM: outputs get a signed manifest (with --c2pa-key)."
        ),
        c2pa_key: Path | None = typer.Option(None, "--c2pa-key", help="C2PA signer EC P-256 private key PEM."),
        config: Path | None = typer.Option(None, "--config", help="facefleet.toml"),
    ) -> None:
        """Run an agent: serve RunTask/CancelTask/Describe, heartbeat to the scheduler, export /metrics.

        With --provider aws|azure the agent watches the spot interruption notice (IMDSv2
        spot/instance-action, Azure Scheduled Events Preempt) and preempts its runs when one comes."""
        if trust_zone not in TRUST_ZONES:
            fail(f"--trust-zone must be {' or '.join(TRUST_ZONES)}, got {trust_zone!r}")
        if provider not in ("onprem", "aws", "azure", "local"):
            fail(f"--provider must be onprem, aws, azure or local, got {provider!r}")
        if not models.is_dir():
            fail(f"models directory {models} does not exist", hint="create it (it may be empty: landmark engine)")
        from facefleet.agent.assembly import AgentStartError, start_agent
        from facefleet.structured_logs import configure_logging

        settings = _settings(config)
        configure_logging(settings.log_level, settings.log_format)
        updates: dict[str, Any] = {
            "pool": pool,
            "trust_zone": trust_zone,
            "scheduler": scheduler or settings.agent.scheduler,
            "models_dir": models,
            "listen": listen,
            "slots": slots,
            "provider": provider,
            "region": region,
            "metrics_port": metrics_port,
        }
        if instance_id:
            updates["instance_id"] = instance_id
        if allowed_root:
            updates["allowed_roots"] = allowed_root
        if work_dir is not None:
            updates["work_dir"] = work_dir
        if checkpoint_root is not None:
            updates["checkpoint_root"] = checkpoint_root
        if c2pa_cert is not None or c2pa_key is not None:
            updates["c2pa_cert"], updates["c2pa_key"] = c2pa_cert, c2pa_key
        tls = settings.tls.model_copy(
            update={"insecure": insecure or settings.tls.insecure, **({"dir": tls_dir} if tls_dir is not None else {})}
        )
        try:
            handle = start_agent(settings.agent.model_copy(update=updates), tls, metadata_url)
        except AgentStartError as error:
            fail(error.message, hint=error.hint)
        freeze_startup_objects()  # a full collection would stall the session and every run
        description = handle.runtime.describe()
        console.print(
            f"agent {description.agent_id} pool={pool} zone={trust_zone} on port {handle.port}, "
            f"/metrics on {handle.metrics_port}, engine={description.engine}, "
            f"providers={','.join(description.execution_providers) or 'none'}"
        )
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
        console.print("stopping: running tasks are cancelled; their checkpoints stay for a resume elsewhere")
        handle.stop()

    @agent.command("verify-models")
    def verify_models_cmd(
        models: Path = typer.Option(..., "--models", help="Models directory with manifest.toml."),
        json_output: bool = JSON_OPTION,
    ) -> None:
        """Verify every model in the manifest (sha256, ONNX signature, role) as the agent does before
        any session; exit 1 when one fails. Kubernetes runs it as the agent's init container."""
        from dataclasses import asdict

        from rich.text import Text

        from facefleet.agent.models.verify import verify_manifest
        from facefleet.agent.pipeline.errors import ModelVerificationFailed

        if not models.is_dir():
            fail(f"models directory {models} does not exist", hint="mount the models volume there or pass --models")
        try:
            check = verify_manifest(models)
        except ModelVerificationFailed as error:
            fail(error.message, hint="correct the manifest named above (docs/pipeline.md lists its fields)")
        if json_output:
            print_json([asdict(status) for status in check.statuses])
        else:
            table = Table(title=f"models in {models}")
            for column in ("name", "role", "sha256", "verified", "error"):
                table.add_column(column)
            for status in check.statuses:
                verified = Text("yes") if status.verified else Text("no", style="red")
                cells = (status.name, status.role, status.sha256[:16])
                table.add_row(*(Text(cell) for cell in cells), verified, Text(status.error))
            console.print(table)
            if not check.statuses:
                console.print(Text(f"no models listed in {models}/manifest.toml: the agent runs the landmark engine"))
        if check.failures:
            fail(
                f"{len(check.failures)} of {len(check.statuses)} models failed verification: {check.failures[0]}",
                hint="replace the file with the published one, or fix its manifest entry if you trust the file",
            )

    @agent.command("describe")
    def describe_cmd(
        address: str = typer.Argument(..., help="Agent gRPC address host:port."),
        json_output: bool = JSON_OPTION,
        insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC: local development only."),
        tls_dir: Path | None = typer.Option(None, "--tls-dir"),
        identity: str = typer.Option("operator", "--as", help="Client certificate name in the TLS dir."),
        config: Path | None = typer.Option(None, "--config"),
    ) -> None:
        """What an agent reports about itself: pool, zone, engine, execution providers, models, slots."""
        import grpc
        from google.protobuf.json_format import MessageToDict

        from facefleet.security.tls import TLSMaterialError, secure_channel
        from facefleet.structured_logs import configure_logging
        from facefleet.v1 import agent_pb2, agent_pb2_grpc

        settings = _settings(config)
        configure_logging(settings.log_level, settings.log_format)  # logs to stderr: stdout stays JSON
        tls = settings.tls.model_copy(
            update={"insecure": insecure or settings.tls.insecure, **({"dir": tls_dir} if tls_dir is not None else {})}
        )
        try:
            channel = secure_channel(address, tls, identity)
        except TLSMaterialError as error:
            fail(str(error), hint="or pass --insecure against a plaintext development agent")
        try:
            with channel:
                reply = agent_pb2_grpc.AgentStub(channel).Describe(agent_pb2.DescribeRequest(), timeout=10)
        except grpc.RpcError as error:
            fail(
                f"Describe on {address} failed: {error.code().name}: {error.details()}",
                hint="check the address, that the agent runs, and TLS (--insecure / --tls-dir)",
            )
        if json_output:
            print_json(
                MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            )
            return
        table = Table(title=f"agent {reply.agent_id}", show_header=False)
        for label, value in (
            ("pool", reply.pool),
            ("trust zone", reply.trust_zone),
            ("provider / region", f"{reply.provider} / {reply.region}"),
            ("engine", reply.engine),
            ("execution providers", ", ".join(reply.execution_providers) or "none"),
            ("gpu", f"{reply.gpu} ({reply.gpu_memory_mb} MiB)" if reply.gpu_memory_mb else reply.gpu),
            ("slots free / total", f"{reply.free_slots} / {reply.total_slots}"),
            ("version", reply.version),
        ):
            table.add_row(label, str(value))
        console.print(table)
        models = Table(title="models")
        for column in ("name", "role", "sha256", "verified", "error"):
            models.add_column(column)
        for model in reply.models:
            models.add_row(
                model.name, model.role, model.sha256[:16], "yes" if model.verified else styled("no", "red"), model.error
            )
        console.print(models)
