"""The run bound (scheduler.placement.filters.run_bound_s / estimate): on a paid pool the reservation
covers everything the agent lets a run bill, and the limit never cuts a run shorter than its estimate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from facefleet.scheduler.placement.filters import estimate
from facefleet.scheduler.placement.model import PoolState, TaskSpec

seconds = st.floats(0.0, 1e4, allow_nan=False)


@given(
    frames=st.integers(1, 100_000),
    sec_per_frame=st.floats(0.001, 100.0),
    price=st.floats(0.01, 1e4),
    margin=st.floats(1.0, 100.0),
    slack=seconds,
    provision=seconds,
    free_slots=st.integers(0, 3),
    sla=st.one_of(st.just(0.0), st.floats(0.001, 1e7)),
    ran=st.floats(0.0, 1.0),  # how much of its limit the run used (the agent stops it at the limit)
    latency=st.floats(0.0, 1.0),  # dispatch + stop latency, as a share of the slack
)
def test_the_reservation_covers_any_billing_the_agent_allows(
    frames: int,
    sec_per_frame: float,
    price: float,
    margin: float,
    slack: float,
    provision: float,
    free_slots: int,
    sla: float,
    ran: float,
    latency: float,
) -> None:
    pool = PoolState(
        name="cloud-a", provider="aws", trust_zone="cloud", price_per_hour=price, sec_per_frame=sec_per_frame,
        run_margin=margin, run_slack_s=slack, provision_s=provision, free_slots=free_slots,
    )  # fmt: skip
    task = TaskSpec(id="t", project="p", sensitivity="public", priority="normal", frames=frames, sla_seconds=sla)
    est = estimate(task, pool)
    expected_run_s = frames * sec_per_frame
    assert est.max_run_s >= expected_run_s * (1 - 1e-12)  # never cut short of its own estimate
    if sla > 0:
        assert est.max_run_s <= max(sla, expected_run_s) * (1 + 1e-12)  # no paying past the SLA
    billed_usd = price / 3600 * (latency * slack + ran * est.max_run_s)  # reservation -> recorded end
    assert billed_usd <= est.reserve_usd * (1 + 1e-9)
    assert est.cost_usd <= est.reserve_usd * (1 + 1e-9)  # the bound is above the expected cost


def test_a_free_pool_reserves_nothing_and_sets_no_limit() -> None:
    pool = PoolState(name="onprem-a", provider="onprem", trust_zone="private", sec_per_frame=1.0, free_slots=1)
    est = estimate(TaskSpec(id="t", project="p", sensitivity="private", priority="normal", frames=10), pool)
    assert (est.reserve_usd, est.max_run_s, est.cost_usd) == (0.0, 0.0, 0.0)
