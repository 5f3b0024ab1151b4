"""What placement sees of a cloud pool: capacity from heartbeats, plus price and provisioning headroom."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime

from facefleet.config import CloudPoolConfig
from facefleet.scheduler.cloud.prices import PriceBook
from facefleet.scheduler.cloud.provisioner import Provisioner
from facefleet.scheduler.placement.model import PoolState

DEFAULT_PROVISION_S = 180.0  # typical spot launch + boot + agent registration


def cloud_pool_state(
    config: CloudPoolConfig,
    provisioner: Provisioner,
    prices: PriceBook,
    now: datetime,
    base: PoolState | None = None,
    provision_s: float = DEFAULT_PROVISION_S,
) -> PoolState:
    """`base` carries live capacity (free slots, queue wait, health) from heartbeats; this fills in the rest.

    A stale price keeps the last known value and sets `price_stale` (price-limited rules drop
    the pool). An unknown price is the pool's bid cap, or infinity without one, so a cost
    estimate (and the budget filter) can never see a free cloud pool.
    """
    price, stale = prices.price(config.provider, config.region, config.instance_type, now)
    state = base or PoolState(name=config.name, provider=config.provider, trust_zone="cloud", region=config.region)
    return replace(
        state,
        spot=True,
        instance_type=config.instance_type,
        price_per_hour=price if price is not None else (config.max_price_usd_per_hour or math.inf),
        price_stale=stale,
        can_provision=provisioner.can_provision(config.name, now.timestamp()),
        slots_per_instance=config.slots_per_instance,
        provision_s=provision_s,
    )
