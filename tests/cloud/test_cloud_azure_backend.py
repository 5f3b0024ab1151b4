"""AzureSpotBackend through the real azure-mgmt-compute client against a local ARM endpoint.

The server answers the SDK's real request sequence with recorded ARM JSON: PUT VM -> 201 +
Azure-AsyncOperation, operation status InProgress -> Succeeded, final GET of the VM; DELETE ->
202 + Location, polled until 200; LIST by resource group.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.core.credentials import AccessToken
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy

from facefleet.config import AzureCloudConfig, CloudPoolConfig
from facefleet.scheduler.cloud.azure import AzureSpotBackend
from facefleet.scheduler.cloud.backend import TAG_INSTANCE, TAG_POOL
from facefleet.scheduler.cloud.provisioner import Provisioner

SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"
RESOURCE_GROUP = "facefleet-rg"
LOCATION_OPS = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/eastus"
SUBNET = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network"
    "/virtualNetworks/facefleet-vnet/subnets/agents"
)
VM_PREFIX = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachines"
RECORDED_VM = json.loads((Path(__file__).with_name("recordings") / "azure_vm_succeeded.json").read_text())


@dataclass
class ArmState:
    base: str = ""
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    operation_polls: dict[str, int] = field(default_factory=dict)


def recorded_vm(name: str, tags: dict[str, str], state: str) -> dict[str, Any]:
    vm = json.loads(json.dumps(RECORDED_VM).replace("__VM_NAME__", name))
    vm["tags"] = tags
    vm["properties"]["provisioningState"] = state
    return vm


class ArmHandler(BaseHTTPRequestHandler):
    state: ArmState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any | None, headers: dict[str, str] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-ms-request-id", "3a8f2c1e-6d4b-4c7a-9e5f-0b1a2c3d4e5f")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _record(self) -> tuple[str, dict[str, list[str]], Any]:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.state.requests.append((self.command, url.path, dict(self.headers.items()), body))
        return url.path, parse_qs(url.query), body

    def do_PUT(self) -> None:
        path, query, body = self._record()
        name = path.rsplit("/", 1)[-1]
        if not path.startswith(VM_PREFIX) or "api-version" not in query:
            return self._send(404, {"error": {"code": "NotFound", "message": path}})
        self.state.vms[name] = recorded_vm(name, body.get("tags", {}), "Creating")
        api_version = query["api-version"][0]
        operation = f"{self.state.base}{LOCATION_OPS}/operations/op-{name}?p=x&api-version={api_version}"
        self._send(201, self.state.vms[name], {"Azure-AsyncOperation": operation, "Retry-After": "0"})

    def do_GET(self) -> None:
        path, _, _ = self._record()
        if "/operations/op-" in path:
            name = path.rsplit("op-", 1)[-1]
            polls = self.state.operation_polls[name] = self.state.operation_polls.get(name, 0) + 1
            if polls < 2:
                return self._send(
                    200,
                    {"name": f"op-{name}", "status": "InProgress", "startTime": "2026-11-21T12:00:01Z"},
                    {"Retry-After": "0"},
                )
            self.state.vms[name]["properties"]["provisioningState"] = "Succeeded"
            return self._send(
                200,
                {
                    "name": f"op-{name}",
                    "status": "Succeeded",
                    "startTime": "2026-11-21T12:00:01Z",
                    "endTime": "2026-11-21T12:00:41Z",
                },
            )
        if "/operationResults/del-" in path:
            name = path.rsplit("del-", 1)[-1]
            polls = self.state.operation_polls[f"del-{name}"] = self.state.operation_polls.get(f"del-{name}", 0) + 1
            if polls < 2:
                return self._send(
                    202, None, {"Location": f"{self.state.base}{path}?api-version=2024-11-01", "Retry-After": "0"}
                )
            self.state.vms.pop(name, None)
            return self._send(200, None)
        if path == VM_PREFIX:
            return self._send(200, {"value": list(self.state.vms.values())})
        name = path.rsplit("/", 1)[-1]
        if path.startswith(VM_PREFIX) and name in self.state.vms:
            return self._send(200, self.state.vms[name])
        self._send(404, {"error": {"code": "ResourceNotFound", "message": f"{path} not found"}})

    def do_DELETE(self) -> None:
        path, _, _ = self._record()
        name = path.rsplit("/", 1)[-1]
        if name not in self.state.vms:
            return self._send(204, None)
        self.state.vms[name]["properties"]["provisioningState"] = "Deleting"
        location = f"{self.state.base}{LOCATION_OPS}/operationResults/del-{name}?api-version=2024-11-01"
        self._send(202, None, {"Location": location, "Retry-After": "0"})


class StaticCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("test-token", 4_102_444_800)


class HttpAllowedBearerPolicy(ARMChallengeAuthenticationPolicy):
    """The real ARM bearer policy, allowed to send its token over http to 127.0.0.1."""

    def on_request(self, request: Any) -> None:
        request.context["enforce_https"] = False
        super().on_request(request)


@pytest.fixture
def arm() -> Iterator[tuple[ArmState, ComputeManagementClient]]:
    state = ArmState()
    handler = type("Handler", (ArmHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    credential = StaticCredential()
    client = ComputeManagementClient(
        credential=credential,
        subscription_id=SUBSCRIPTION,
        base_url=state.base,
        authentication_policy=HttpAllowedBearerPolicy(credential, "https://management.azure.com/.default"),
        polling_interval=0,
        retry_total=0,
    )
    yield state, client
    server.shutdown()
    server.server_close()


def settings() -> AzureCloudConfig:
    return AzureCloudConfig(
        subscription_id=SUBSCRIPTION,
        resource_group=RESOURCE_GROUP,
        subnet_id=SUBNET,
        ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests facefleet",
        eviction_policy="Deallocate",
    )


def test_provisioner_creates_and_deletes_a_spot_vm(arm: tuple[ArmState, ComputeManagementClient]) -> None:
    state, client = arm
    pool = CloudPoolConfig(
        name="azure-t4",
        provider="azure",
        region="eastus",
        instance_type="Standard_NC4as_T4_v3",
        max_instances=1,
        max_price_usd_per_hour=0.25,
        register_timeout_s=60,
    )
    now = [1_800_000_000.0]
    provisioner = Provisioner(
        {"azure": AzureSpotBackend(client, settings())},
        [pool],
        lambda: now[0],
        cluster="test-cluster",
        scheduler_address="sched.example:50051",
    )

    [instance_id] = provisioner.ensure_capacity("azure-t4", wanted_slots=3)  # max_instances=1 holds

    assert [method for method, _, _, _ in state.requests] == ["PUT", "GET", "GET", "GET"]
    _, put_path, put_headers, body = state.requests[0]
    assert put_path == f"{VM_PREFIX}/{instance_id}"
    assert put_headers["Authorization"] == "Bearer test-token"
    assert "/operations/op-" in state.requests[1][1] and "/operations/op-" in state.requests[2][1]
    assert state.requests[3][1] == f"{VM_PREFIX}/{instance_id}"  # final GET after Succeeded
    props = body["properties"]
    assert props["priority"] == "Spot"
    assert props["evictionPolicy"] == "Deallocate"
    assert props["billingProfile"] == {"maxPrice": 0.25}
    assert props["hardwareProfile"] == {"vmSize": "Standard_NC4as_T4_v3"}
    assert body["location"] == "eastus"
    assert body["tags"][TAG_POOL] == "azure-t4" and body["tags"][TAG_INSTANCE] == instance_id
    nic = props["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
    assert nic["ipConfigurations"][0]["properties"]["subnet"]["id"] == SUBNET
    script = base64.b64decode(props["osProfile"]["customData"]).decode()
    assert (
        "--pool azure-t4 --trust-zone cloud --scheduler sched.example:50051 --provider azure --region eastus" in script
    )
    assert provisioner.instances()[0].provider_id == instance_id

    # Describe by tag through LIST.
    described = AzureSpotBackend(client, settings()).describe("test-cluster")
    assert [(d.instance_id, d.pool, d.state) for d in described] == [(instance_id, "azure-t4", "succeeded")]

    # Never registers -> torn down with DELETE and Location polling until 200.
    state.requests.clear()
    now[0] += 61
    assert [t.reason for t in provisioner.reap()] == ["never_registered"]
    assert [(m, "del-" in p or p.endswith(instance_id)) for m, p, _, _ in state.requests] == [
        ("DELETE", True),
        ("GET", True),
        ("GET", True),
    ]
    assert state.vms == {}
    assert provisioner.instances() == []


def test_arm_error_becomes_a_launch_error_with_its_code(arm: tuple[ArmState, ComputeManagementClient]) -> None:
    _, client = arm
    bad = copy.deepcopy(settings())
    bad.resource_group = "missing-rg"
    pool = CloudPoolConfig(name="azure-t4", provider="azure", region="eastus", instance_type="Standard_NC4as_T4_v3")
    provisioner = Provisioner({"azure": AzureSpotBackend(client, bad)}, [pool], cluster="c", scheduler_address="s:1")
    assert provisioner.ensure_capacity("azure-t4", 1) == []
    assert provisioner.can_provision("azure-t4") == 0  # backing off after the refusal
