"""Price feeds: AWS through botocore's Stubber, Azure on a recorded Retail Prices response; PriceBook."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

from facefleet.scheduler.cloud.prices import (
    AwsSpotPriceFeed,
    AzureRetailPriceFeed,
    PriceBook,
    PriceFeedError,
    SpotPrice,
    region_of_zone,
)
from facefleet.scheduler.metrics import PRICE_FEED_STALE, SPOT_PRICE

RECORDINGS = Path(__file__).with_name("recordings")
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def history_row(zone: str, instance_type: str, price: str, minutes_ago: int, product: str = "Linux/UNIX") -> dict:
    return {
        "AvailabilityZone": zone,
        "InstanceType": instance_type,
        "ProductDescription": product,
        "SpotPrice": price,
        "Timestamp": NOW - timedelta(minutes=minutes_ago),
    }


def test_region_of_zone() -> None:
    assert region_of_zone("us-east-1a") == "us-east-1"
    assert region_of_zone("eu-central-1c") == "eu-central-1"
    assert region_of_zone("us-west-2-lax-1a") == "us-west-2"


def test_aws_feed_paginates_and_keeps_latest_per_zone_then_highest_zone() -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    expected = {
        "InstanceTypes": ["g4dn.xlarge", "g5.xlarge"],
        "ProductDescriptions": ["Linux/UNIX"],
        "StartTime": ANY,
        "EndTime": ANY,
    }
    with Stubber(ec2) as stub:
        stub.add_response(
            "describe_spot_price_history",
            {
                "SpotPriceHistory": [
                    history_row("us-east-1a", "g4dn.xlarge", "0.215800", 5),
                    history_row("us-east-1a", "g4dn.xlarge", "0.300000", 180),  # older: superseded
                    history_row("us-east-1b", "g4dn.xlarge", "0.198300", 40),
                ],
                "NextToken": "page-2",
            },
            expected,
        )
        stub.add_response(
            "describe_spot_price_history",
            {
                "SpotPriceHistory": [
                    history_row("us-east-1b", "g5.xlarge", "0.451200", 12),
                    history_row("us-east-1c", "g5.xlarge", "0.442000", 3),
                ],
                "NextToken": "",
            },
            {**expected, "NextToken": "page-2"},
        )
        prices = AwsSpotPriceFeed(ec2, ["g4dn.xlarge", "g5.xlarge"]).refresh(NOW)
        stub.assert_no_pending_responses()

    by_type = {p.instance_type: p for p in prices}
    assert set(by_type) == {"g4dn.xlarge", "g5.xlarge"}
    assert by_type["g4dn.xlarge"].usd_per_hour == pytest.approx(0.2158)  # highest of the zones' latest
    assert by_type["g4dn.xlarge"].at == NOW - timedelta(minutes=5)
    assert by_type["g5.xlarge"].usd_per_hour == pytest.approx(0.4512)
    assert all(p.region == "us-east-1" and p.provider == "aws" for p in prices)


def recorded_azure_get(url: str, params: Mapping[str, str] | None) -> dict[str, Any]:
    """Serves tests/cloud/recordings/azure_retail_prices_page{1,2}.json like the real API does."""
    if params is not None:
        assert params["$filter"] == (
            "serviceName eq 'Virtual Machines' and armRegionName eq 'eastus' and priceType eq 'Consumption'"
        )
        assert url == "https://prices.azure.com/api/retail/prices"
        return json.loads((RECORDINGS / "azure_retail_prices_page1.json").read_text())
    assert "$skip=1000" in url or "%24skip=1000" in url
    return json.loads((RECORDINGS / "azure_retail_prices_page2.json").read_text())


def test_azure_feed_parses_recorded_spot_meters_across_pages() -> None:
    feed = AzureRetailPriceFeed(
        ["eastus"], ["Standard_NC4as_T4_v3", "Standard_NC8as_T4_v3"], http_get=recorded_azure_get
    )
    prices = {p.instance_type: p for p in feed.refresh(NOW)}
    # Linux spot only: the Windows spot, the pay-as-you-go and the Low Priority rows are skipped.
    assert prices["Standard_NC4as_T4_v3"].usd_per_hour == pytest.approx(0.1578)
    assert prices["Standard_NC8as_T4_v3"].usd_per_hour == pytest.approx(0.2256)  # from page 2
    assert prices["Standard_NC4as_T4_v3"].region == "eastus"
    assert prices["Standard_NC4as_T4_v3"].at == datetime(2024, 9, 1, tzinfo=UTC)
    assert len(prices) == 2


def test_azure_feed_rejects_a_response_without_items() -> None:
    feed = AzureRetailPriceFeed(["eastus"], http_get=lambda url, params: {"error": "throttled"})
    with pytest.raises(PriceFeedError, match="no 'Items'"):
        feed.refresh(NOW)


class ScriptedFeed:
    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.result: list[SpotPrice] | Exception = []
        self.calls = 0

    def refresh(self, now: datetime) -> list[SpotPrice]:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_pricebook_never_reads_a_failing_or_stale_feed_as_a_price() -> None:
    aws = ScriptedFeed("aws")
    book = PriceBook([aws], refresh_interval_s=60, stale_after_s=300)

    assert book.price("aws", "us-east-1", "g4dn.xlarge", NOW) == (None, True)  # nothing yet

    aws.result = [SpotPrice("aws", "us-east-1", "g4dn.xlarge", 0.2158, NOW)]
    book.refresh(NOW)
    assert book.price("aws", "us-east-1", "g4dn.xlarge", NOW) == (0.2158, False)
    assert SPOT_PRICE.labels("aws", "us-east-1", "g4dn.xlarge")._value.get() == pytest.approx(0.2158)
    assert PRICE_FEED_STALE.labels(provider="aws")._value.get() == 0
    assert book.price("aws", "us-east-1", "g5.xlarge", NOW) == (None, True)  # unknown type

    book.refresh(NOW + timedelta(seconds=30))
    assert aws.calls == 1  # not due yet

    aws.result = ConnectionError("endpoint unreachable")
    book.refresh(NOW + timedelta(seconds=61))
    assert aws.calls == 2
    price, stale = book.price("aws", "us-east-1", "g4dn.xlarge", NOW + timedelta(seconds=61))
    assert (price, stale) == (0.2158, True)  # last known value for display, flagged stale
    assert PRICE_FEED_STALE.labels(provider="aws")._value.get() == 1
    assert "endpoint unreachable" in (book.feed_errors()["aws"] or "")

    aws.result = [SpotPrice("aws", "us-east-1", "g4dn.xlarge", 0.25, NOW)]
    book.refresh(NOW + timedelta(seconds=130))
    assert book.price("aws", "us-east-1", "g4dn.xlarge", NOW + timedelta(seconds=130)) == (0.25, False)
    # No refresh for longer than stale_after_s: stale again even without an error.
    assert book.price("aws", "us-east-1", "g4dn.xlarge", NOW + timedelta(seconds=431))[1] is True
