"""Cloud spot bursting: price feeds, provisioner, AWS/Azure backends, interruption watchers (issue #6)."""

from facefleet.scheduler.cloud.backend import CloudBackend, CloudInstance, CloudLaunchError, LaunchRequest
from facefleet.scheduler.cloud.prices import AwsSpotPriceFeed, AzureRetailPriceFeed, PriceBook, PriceFeed, SpotPrice
from facefleet.scheduler.cloud.provisioner import Provisioner, TrackedInstance

__all__ = [
    "AwsSpotPriceFeed",
    "AzureRetailPriceFeed",
    "CloudBackend",
    "CloudInstance",
    "CloudLaunchError",
    "LaunchRequest",
    "PriceBook",
    "PriceFeed",
    "Provisioner",
    "SpotPrice",
    "TrackedInstance",
]
