"""The one check for money and the quantities money is computed from (docs/finance.md#limits).

Every place where an amount enters facefleet — budgets.yaml and Consul budgets, rule prices, world
files, simulator workloads and sweeps, Admin.SetBudget, the CLI — calls `check`: NaN, infinities,
negative values and values above the documented ceiling are refused with a message that names
where the value came from. A NaN cap compares false with everything, so without this one check it
acts as no cap at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator


class AmountError(ValueError):
    """A money amount, price, duration or percentage is not a finite value in its documented range."""


@dataclass(frozen=True, slots=True)
class Quantity:
    unit: str
    ceiling: float
    minimum: float = 0.0

    def check(self, value: Any, where: str) -> float:
        """`value` as a float; AmountError naming `where` unless finite and in [minimum, ceiling]."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AmountError(f"{where}: expected a number ({self.unit}), got {value!r}")
        number = float(value)
        if math.isnan(number):
            raise AmountError(f"{where}: NaN is not an amount; give a number ({self.unit})")
        if math.isinf(number):
            raise AmountError(f"{where}: {number} is not an amount; give a finite number ({self.unit})")
        if number < self.minimum:
            raise AmountError(f"{where}: must be >= {self.minimum:g} {self.unit}, got {number:g}")
        if number > self.ceiling:
            raise AmountError(f"{where}: {number:g} {self.unit} is above the ceiling of {self.ceiling:g} {self.unit}")
        return number

    def validate(self, value: float) -> float:
        """The check as a pydantic validator (pydantic names the field)."""
        return self.check(value, self.unit)


# Ceilings: far above any real figure, low enough that a typo (an extra 000) or a unit mix-up is caught.
USD = Quantity("USD", 1e9)  # budget caps, spend: a billion dollars a month
USD_PER_HOUR = Quantity("USD/h", 1e4)  # an instance-hour's price
SECONDS = Quantity("s", 31 * 86400.0)  # durations: waits, run times, boot, SLAs (a month)
PERCENT = Quantity("%", 100.0)
RUN_MARGIN = Quantity("x", 100.0, minimum=1.0)  # a paid run's time limit over its estimate (run bound)
SWEEP_POINTS_MAX = 1000  # a what-if sweep evaluates at most this many values

# The same checks for pydantic models (facefleet.toml, environment).
UsdPerHour = Annotated[float, AfterValidator(USD_PER_HOUR.validate)]
Seconds = Annotated[float, AfterValidator(SECONDS.validate)]
RunMargin = Annotated[float, AfterValidator(RUN_MARGIN.validate)]
