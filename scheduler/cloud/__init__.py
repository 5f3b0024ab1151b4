"""Cloud spot bursting: price feeds, provisioner, AWS/Azure backends, interruption watchers (issue #6)."""

from scheduler.cloud.backend import CloudBackend, CloudInstance, CloudLaunchError, LaunchRequest
from scheduler.cloud.prices import AwsSpotPriceFeed, AzureRetailPriceFeed, PriceBook, PriceFeed, SpotPrice
from scheduler.cloud.provisioner import Provisioner, TrackedInstance

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
