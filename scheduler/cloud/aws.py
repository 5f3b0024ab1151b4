"""AWS EC2 spot instances via boto3: one-time spot requests that terminate on interruption."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from facefleet.config import AwsCloudConfig
from facefleet.scheduler.cloud.backend import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    TAG_POOL,
    CloudInstance,
    CloudLaunchError,
    LaunchRequest,
)

LIVE_STATES = ["pending", "running", "stopping", "stopped"]


def _tag_map(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags or []}


class AwsSpotBackend:
    provider = "aws"

    def __init__(self, ec2_client: Any, settings: AwsCloudConfig) -> None:
        if not settings.launch_template and not settings.ami_id:
            raise ValueError("AWS cloud pools need cloud.aws.launch_template or cloud.aws.ami_id in facefleet.toml")
        self._ec2 = ec2_client
        self._settings = settings

    def _launch_arguments(self, request: LaunchRequest) -> dict[str, Any]:
        spot_options: dict[str, Any] = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        if request.max_price_usd_per_hour is not None:
            spot_options["MaxPrice"] = f"{request.max_price_usd_per_hour:.4f}"
        s = self._settings
        args: dict[str, Any] = {
            "MinCount": 1,
            "MaxCount": 1,
            "InstanceType": request.instance_type,
            "ClientToken": request.instance_id,  # idempotent: a retried launch cannot double-launch
            "UserData": request.boot_script,  # boto3 base64-encodes it
            "InstanceMarketOptions": {"MarketType": "spot", "SpotOptions": spot_options},
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {"ResourceType": rt, "Tags": [{"Key": k, "Value": v} for k, v in request.tags.items()]}
                for rt in ("instance", "volume")
            ],
        }
        if s.launch_template:
            key = "LaunchTemplateId" if s.launch_template.startswith("lt-") else "LaunchTemplateName"
            args["LaunchTemplate"] = {key: s.launch_template, "Version": "$Latest"}
        if s.ami_id:
            args["ImageId"] = s.ami_id
        if s.instance_profile:
            key = "Arn" if s.instance_profile.startswith("arn:") else "Name"
            args["IamInstanceProfile"] = {key: s.instance_profile}
        if s.subnet_id:
            args["SubnetId"] = s.subnet_id
        if s.security_group_ids:
            args["SecurityGroupIds"] = list(s.security_group_ids)
        if s.key_name:
            args["KeyName"] = s.key_name
        return args

    def launch(self, request: LaunchRequest) -> CloudInstance:
        try:
            response = self._ec2.run_instances(**self._launch_arguments(request))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise CloudLaunchError(
                "aws", request.pool, str(error.get("Code", "ClientError")), str(error.get("Message", exc))
            ) from exc
        except BotoCoreError as exc:
            raise CloudLaunchError("aws", request.pool, type(exc).__name__, str(exc)) from exc
        instance = response["Instances"][0]
        return CloudInstance(
            instance_id=request.instance_id,
            provider_id=instance["InstanceId"],
            pool=request.pool,
            state=instance.get("State", {}).get("Name", "pending"),
            launched_at=instance.get("LaunchTime"),
        )

    def describe(self, cluster: str) -> list[CloudInstance]:
        found: list[CloudInstance] = []
        paginator = self._ec2.get_paginator("describe_instances")
        filters = [
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
            {"Name": "instance-state-name", "Values": LIVE_STATES},
        ]
        for page in paginator.paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    tags = _tag_map(instance.get("Tags"))
                    if TAG_INSTANCE not in tags or TAG_POOL not in tags:
                        continue
                    found.append(
                        CloudInstance(
                            instance_id=tags[TAG_INSTANCE],
                            provider_id=instance["InstanceId"],
                            pool=tags[TAG_POOL],
                            state=instance.get("State", {}).get("Name", "unknown"),
                            launched_at=instance.get("LaunchTime"),
                        )
                    )
        return found

    def terminate(self, instance: CloudInstance) -> None:
        try:
            self._ec2.terminate_instances(InstanceIds=[instance.provider_id])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                return  # already gone
            raise
