"""The fleet as the Admin service reports it (`ListFleet`): pools as placement sees them and every
known agent. Read-only: built from the capacity view and the agent registry at one instant."""

from __future__ import annotations

from facefleet.scheduler.capacity import AgentRegistry, CapacityView
from facefleet.v1 import admin_pb2


def fleet_status(registry: AgentRegistry, capacity: CapacityView, now: float) -> admin_pb2.Fleet:
    snapshot = capacity.snapshot(now)
    pools = [
        admin_pb2.PoolStatus(
            name=pool.name,
            provider=pool.provider,
            trust_zone=pool.trust_zone,
            region=pool.region,
            free_slots=max(0, pool.free_slots),
            price_per_hour=pool.price_per_hour,
            spot=pool.spot,
            price_stale=pool.price_stale,
            healthy=pool.healthy,
            instance_type=pool.instance_type,
            can_provision=max(0, pool.can_provision),
            queue_wait_s=pool.queue_wait_s,
        )
        for pool in sorted(snapshot.pools, key=lambda p: p.name)
    ]
    agents = [
        admin_pb2.AgentStatus(
            agent_id=agent.agent_id,
            pool=agent.pool,
            trust_zone=agent.trust_zone,
            provider=agent.provider,
            region=agent.region,
            total_slots=agent.total_slots,
            free_slots=agent.free_slots,
            healthy=agent.healthy,
            draining=agent.draining,
            preempting=agent.preempting,
            lost=agent.lost_at is not None,
            seen_s_ago=max(0.0, now - agent.last_seen),
            running=len(agent.running),
            gpu=agent.gpu,
            instance_id=agent.instance_id,
        )
        for agent in registry.agents()
    ]
    return admin_pb2.Fleet(pools=pools, agents=agents, notes=list(snapshot.notes))
