"""Spot price feeds (AWS, Azure) behind one interface, and the PriceBook placement reads.

A feed that fails or has not refreshed within `stale_after_s` is *stale*: its prices still read
back (for display) but flagged, so price-limited rules treat the pool as infeasible. An unknown
price is `None`, never 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import requests
import structlog

from facefleet.money import USD_PER_HOUR
from facefleet.scheduler.metrics import PRICE_FEED_STALE, SPOT_PRICE

log = structlog.get_logger()

AZURE_RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"


@dataclass(frozen=True)
class SpotPrice:
    provider: str
    region: str
    instance_type: str
    usd_per_hour: float
    at: datetime  # when the provider says this price took effect


class PriceFeedError(RuntimeError):
    """A feed could not produce prices (network, auth, malformed response)."""


class PriceFeed(Protocol):
    provider: str

    def refresh(self, now: datetime) -> list[SpotPrice]: ...


def region_of_zone(availability_zone: str) -> str:
    """'us-east-1a' -> 'us-east-1'; Local Zones ('us-west-2-lax-1a') keep their parent region."""
    zone = availability_zone.strip()
    if zone and zone[-1].isalpha():
        zone = zone[:-1]
    parts = zone.split("-")
    # Local/Wavelength zones: <region>-<city>-<n>; the region is the first three parts.
    return "-".join(parts[:3]) if len(parts) > 3 else zone


class AwsSpotPriceFeed:
    """`ec2.describe_spot_price_history`, latest price per (zone, type), folded to the region.

    The regional price is the *highest* zone price: the provisioner does not pin a zone, so a
    rule's max price holds wherever the instance lands.
    """

    provider = "aws"

    def __init__(
        self,
        ec2_client: Any,
        instance_types: Sequence[str],
        product_description: str = "Linux/UNIX",
        lookback: timedelta = timedelta(hours=6),
    ) -> None:
        if not instance_types:
            raise ValueError("AwsSpotPriceFeed needs at least one instance type to price")
        self._ec2 = ec2_client
        self._instance_types = list(instance_types)
        self._product = product_description
        self._lookback = lookback

    def refresh(self, now: datetime) -> list[SpotPrice]:
        region = self._ec2.meta.region_name
        latest: dict[tuple[str, str], tuple[datetime, float]] = {}
        paginator = self._ec2.get_paginator("describe_spot_price_history")
        pages = paginator.paginate(
            InstanceTypes=self._instance_types,
            ProductDescriptions=[self._product],
            StartTime=now - self._lookback,
            EndTime=now,
        )
        try:
            for page in pages:
                for row in page.get("SpotPriceHistory", []):
                    if row.get("ProductDescription") != self._product:
                        continue
                    key = (row["AvailabilityZone"], row["InstanceType"])
                    at = row["Timestamp"]
                    price = USD_PER_HOUR.check(float(row["SpotPrice"]), f"aws {region} SpotPrice")
                    if key not in latest or at > latest[key][0]:
                        latest[key] = (at, price)
        except (KeyError, ValueError) as exc:
            raise PriceFeedError(f"aws {region}: malformed spot price history row: {exc!r}") from exc
        by_region: dict[tuple[str, str], SpotPrice] = {}
        for (zone, instance_type), (at, price) in latest.items():
            key = (region_of_zone(zone), instance_type)
            current = by_region.get(key)
            if current is None or price > current.usd_per_hour:
                by_region[key] = SpotPrice("aws", key[0], instance_type, price, at)
        return list(by_region.values())


def _requests_get_json(url: str, params: Mapping[str, str] | None) -> dict[str, Any]:
    response = requests.get(url, params=params, timeout=20)
    response.raise_for_status()
    body = response.json()
    if not isinstance(body, dict):
        raise PriceFeedError(f"{url}: expected a JSON object, got {type(body).__name__}")
    return body


class AzureRetailPriceFeed:
    """Azure Retail Prices API (public, no auth): Linux spot meters for the given regions/sizes.

    Spot meters are the rows whose `meterName` contains 'Spot'; Windows rows (productName ends in
    'Windows') and 'Low Priority' meters are skipped. Pagination follows `NextPageLink`.
    """

    provider = "azure"

    def __init__(
        self,
        regions: Sequence[str],
        vm_sizes: Sequence[str] = (),
        base_url: str = AZURE_RETAIL_PRICES_URL,
        http_get: Callable[[str, Mapping[str, str] | None], dict[str, Any]] = _requests_get_json,
        max_pages: int = 50,
    ) -> None:
        if not regions:
            raise ValueError("AzureRetailPriceFeed needs at least one armRegionName")
        self._regions = list(regions)
        self._sizes = set(vm_sizes)
        self._base_url = base_url
        self._get = http_get
        self._max_pages = max_pages

    def _filter(self, region: str) -> str:
        clauses = [
            "serviceName eq 'Virtual Machines'",
            f"armRegionName eq '{region}'",
            "priceType eq 'Consumption'",
        ]
        if len(self._sizes) == 1:
            clauses.append(f"armSkuName eq '{next(iter(self._sizes))}'")
        return " and ".join(clauses)

    def refresh(self, now: datetime) -> list[SpotPrice]:
        prices: dict[tuple[str, str], SpotPrice] = {}
        for region in self._regions:
            for item in self._items(region):
                price = parse_azure_spot_item(item)
                if price is None or (self._sizes and price.instance_type not in self._sizes):
                    continue
                key = (price.region, price.instance_type)
                if key not in prices or price.at > prices[key].at:
                    prices[key] = price
        return list(prices.values())

    def _items(self, region: str) -> Iterable[dict[str, Any]]:
        url: str | None = self._base_url
        params: dict[str, str] | None = {"$filter": self._filter(region)}
        for _ in range(self._max_pages):
            if url is None:
                return
            page = self._get(url, params)
            items = page.get("Items")
            if not isinstance(items, list):
                raise PriceFeedError(f"azure retail prices {url}: response has no 'Items' list")
            yield from items
            url = page.get("NextPageLink") or None
            params = None  # NextPageLink already carries the filter and skip token
        raise PriceFeedError(f"azure retail prices for {region}: more than {self._max_pages} pages; narrow vm_sizes")


def parse_azure_spot_item(item: Mapping[str, Any]) -> SpotPrice | None:
    """One Retail Prices row -> SpotPrice, or None when it is not a Linux spot VM meter in USD."""
    meter = str(item.get("meterName", ""))
    product = str(item.get("productName", ""))
    if "Spot" not in meter or "Low Priority" in meter or product.endswith("Windows"):
        return None
    if item.get("type") != "Consumption" or item.get("currencyCode", "USD") != "USD":
        return None
    if item.get("unitOfMeasure", "1 Hour") != "1 Hour":
        return None
    try:
        at = datetime.fromisoformat(str(item["effectiveStartDate"]).replace("Z", "+00:00"))
        price = USD_PER_HOUR.check(float(item["retailPrice"]), "azure retailPrice")
        return SpotPrice("azure", str(item["armRegionName"]), str(item["armSkuName"]), price, at)
    except (KeyError, ValueError) as exc:
        raise PriceFeedError(f"azure retail price row is malformed ({exc!r}): {dict(item)}") from exc


@dataclass
class _FeedState:
    feed: PriceFeed
    last_attempt: datetime | None = None
    last_success: datetime | None = None
    last_error: str | None = None


class PriceBook:
    """Latest spot prices from every feed; thread-safe; refreshed by `refresh(now)` or `start()`."""

    def __init__(
        self,
        feeds: Sequence[PriceFeed],
        refresh_interval_s: float = 300.0,
        stale_after_s: float = 900.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._feeds = {feed.provider: _FeedState(feed) for feed in feeds}
        self._prices: dict[tuple[str, str, str], SpotPrice] = {}
        self._interval = timedelta(seconds=refresh_interval_s)
        self._stale_after = timedelta(seconds=stale_after_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for provider in self._feeds:
            PRICE_FEED_STALE.labels(provider=provider).set(1)  # stale until the first success

    def refresh(self, now: datetime, force: bool = False) -> None:
        """Refresh every feed that is due (or all with `force`); a failing feed is logged, not raised."""
        for provider, state in self._feeds.items():
            if not force and state.last_attempt is not None and now - state.last_attempt < self._interval:
                continue
            state.last_attempt = now
            try:
                prices = state.feed.refresh(now)
            except Exception as exc:  # any feed failure must only mark the feed stale
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("price_feed_failed", provider=provider, error=state.last_error)
            else:
                with self._lock:
                    for price in prices:
                        self._prices[(price.provider, price.region, price.instance_type)] = price
                        SPOT_PRICE.labels(price.provider, price.region, price.instance_type).set(price.usd_per_hour)
                state.last_success = now
                state.last_error = None
                log.info("price_feed_refreshed", provider=provider, prices=len(prices))
            PRICE_FEED_STALE.labels(provider=provider).set(1 if self.feed_stale(provider, now) else 0)

    def feed_stale(self, provider: str, now: datetime) -> bool:
        state = self._feeds.get(provider)
        if state is None or state.last_success is None or state.last_error is not None:
            return True
        return now - state.last_success > self._stale_after

    def price(self, provider: str, region: str, instance_type: str, now: datetime) -> tuple[float | None, bool]:
        """(usd_per_hour or None when unknown, stale). Placement must treat stale as unknown."""
        with self._lock:
            known = self._prices.get((provider, region, instance_type))
        stale = self.feed_stale(provider, now) or known is None
        PRICE_FEED_STALE.labels(provider=provider).set(1 if self.feed_stale(provider, now) else 0)
        return (known.usd_per_hour if known else None), stale

    def snapshot(self) -> list[SpotPrice]:
        with self._lock:
            return sorted(self._prices.values(), key=lambda p: (p.provider, p.region, p.instance_type))

    def feed_errors(self) -> dict[str, str | None]:
        return {provider: state.last_error for provider, state in self._feeds.items()}

    def start(self, poll_s: float = 5.0) -> None:
        """Refresh in a daemon thread; each feed still refreshes at most once per interval."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                self.refresh(self._clock())
                self._stop.wait(poll_s)

        self._thread = threading.Thread(target=loop, name="facefleet-pricebook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
