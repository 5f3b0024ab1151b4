"""Azure Spot VMs via azure-mgmt-compute: priority Spot, eviction policy, max price, cloud-init boot script.

The VM carries its NIC as a VM-level network interface configuration (networkApiVersion
2020-11-01), so no azure-mgmt-network dependency is needed and the NIC and OS disk are deleted
with the VM.
"""

from __future__ import annotations

import base64
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute import models

from facefleet.config import AzureCloudConfig
from facefleet.scheduler.cloud.backend import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    TAG_POOL,
    CloudInstance,
    CloudLaunchError,
    LaunchRequest,
)


def _image_reference(image: str) -> models.ImageReference:
    parts = image.split(":")
    if len(parts) != 4:
        raise ValueError(f"cloud.azure.image {image!r} must be publisher:offer:sku:version")
    publisher, offer, sku, version = parts
    return models.ImageReference(publisher=publisher, offer=offer, sku=sku, version=version)


class AzureSpotBackend:
    provider = "azure"

    def __init__(self, compute_client: Any, settings: AzureCloudConfig) -> None:
        missing = [name for name in ("resource_group", "subnet_id", "ssh_public_key") if not getattr(settings, name)]
        if missing:
            raise ValueError(f"Azure cloud pools need cloud.azure.{', cloud.azure.'.join(missing)} in facefleet.toml")
        self._compute = compute_client
        self._settings = settings
        self._image = _image_reference(settings.image)

    def vm_parameters(self, request: LaunchRequest) -> models.VirtualMachine:
        s = self._settings
        nic = models.VirtualMachineNetworkInterfaceConfiguration(
            name=f"{request.instance_id}-nic",
            properties=models.VirtualMachineNetworkInterfaceConfigurationProperties(
                primary=True,
                delete_option="Delete",
                ip_configurations=[
                    models.VirtualMachineNetworkInterfaceIPConfiguration(
                        name="primary",
                        properties=models.VirtualMachineNetworkInterfaceIPConfigurationProperties(
                            subnet=models.SubResource(id=s.subnet_id)
                        ),
                    )
                ],
            ),
        )
        ssh_key = models.SshPublicKey(path=f"/home/{s.admin_username}/.ssh/authorized_keys", key_data=s.ssh_public_key)
        properties = models.VirtualMachineProperties(
            priority="Spot",
            eviction_policy=s.eviction_policy,
            # -1 = pay up to the on-demand price; evicted only for capacity.
            billing_profile=models.BillingProfile(
                max_price=request.max_price_usd_per_hour if request.max_price_usd_per_hour is not None else -1
            ),
            hardware_profile=models.HardwareProfile(vm_size=request.instance_type),
            storage_profile=models.StorageProfile(
                image_reference=self._image,
                os_disk=models.OSDisk(create_option="FromImage", delete_option="Delete"),
            ),
            os_profile=models.OSProfile(
                computer_name=request.instance_id,
                admin_username=s.admin_username,
                custom_data=base64.b64encode(request.boot_script.encode()).decode(),
                linux_configuration=models.LinuxConfiguration(
                    disable_password_authentication=True, ssh=models.SshConfiguration(public_keys=[ssh_key])
                ),
            ),
            network_profile=models.NetworkProfile(
                network_api_version="2020-11-01", network_interface_configurations=[nic]
            ),
        )
        return models.VirtualMachine(location=request.region, tags=dict(request.tags), properties=properties)

    def launch(self, request: LaunchRequest) -> CloudInstance:
        try:
            poller = self._compute.virtual_machines.begin_create_or_update(
                self._settings.resource_group, request.instance_id, self.vm_parameters(request)
            )
            vm = poller.result()  # follows Azure-AsyncOperation until Succeeded, then GETs the VM
        except HttpResponseError as exc:
            code = getattr(exc.error, "code", None) if exc.error else None
            raise CloudLaunchError("azure", request.pool, str(code or exc.status_code), exc.message) from exc
        return CloudInstance(
            instance_id=request.instance_id,
            provider_id=vm.name or request.instance_id,
            pool=request.pool,
            state=str(vm.provisioning_state or "unknown").lower(),
            launched_at=getattr(vm, "time_created", None),
        )

    def describe(self, cluster: str) -> list[CloudInstance]:
        found: list[CloudInstance] = []
        for vm in self._compute.virtual_machines.list(self._settings.resource_group):
            tags = vm.tags or {}
            if tags.get(TAG_CLUSTER) != cluster or TAG_INSTANCE not in tags or TAG_POOL not in tags:
                continue
            found.append(
                CloudInstance(
                    instance_id=tags[TAG_INSTANCE],
                    provider_id=vm.name,
                    pool=tags[TAG_POOL],
                    state=str(vm.provisioning_state or "unknown").lower(),
                    launched_at=getattr(vm, "time_created", None),
                )
            )
        return found

    def terminate(self, instance: CloudInstance) -> None:
        try:
            self._compute.virtual_machines.begin_delete(self._settings.resource_group, instance.provider_id).result()
        except ResourceNotFoundError:
            return  # already gone
