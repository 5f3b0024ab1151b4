import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Identity(_message.Message):
    __slots__ = ("subject", "roles")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    subject: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, subject: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("name", "monthly_cap_usd", "alert_pct", "spent_usd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_CAP_USD_FIELD_NUMBER: _ClassVar[int]
    ALERT_PCT_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    name: str
    monthly_cap_usd: float
    alert_pct: float
    spent_usd: float
    def __init__(self, name: _Optional[str] = ..., monthly_cap_usd: _Optional[float] = ..., alert_pct: _Optional[float] = ..., spent_usd: _Optional[float] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("name", "monthly_cap_usd", "alert_pct", "reason", "create")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_CAP_USD_FIELD_NUMBER: _ClassVar[int]
    ALERT_PCT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    monthly_cap_usd: float
    alert_pct: float
    reason: str
    create: bool
    def __init__(self, name: _Optional[str] = ..., monthly_cap_usd: _Optional[float] = ..., alert_pct: _Optional[float] = ..., reason: _Optional[str] = ..., create: _Optional[bool] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    def __init__(self, budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ...) -> None: ...

class ProjectLock(_message.Message):
    __slots__ = ("project", "reason", "locked", "by", "at")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOCKED_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    project: str
    reason: str
    locked: bool
    by: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, project: _Optional[str] = ..., reason: _Optional[str] = ..., locked: _Optional[bool] = ..., by: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LockProjectRequest(_message.Message):
    __slots__ = ("project", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    reason: str
    def __init__(self, project: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnlockProjectRequest(_message.Message):
    __slots__ = ("project", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    reason: str
    def __init__(self, project: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListLocksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLocksResponse(_message.Message):
    __slots__ = ("locks",)
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[ProjectLock]
    def __init__(self, locks: _Optional[_Iterable[_Union[ProjectLock, _Mapping]]] = ...) -> None: ...

class ReloadRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadRulesResponse(_message.Message):
    __slots__ = ("version", "applied", "errors")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    version: str
    applied: bool
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., applied: _Optional[bool] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class DrainAgentRequest(_message.Message):
    __slots__ = ("agent_id", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainAgentResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ListFleetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("name", "provider", "trust_zone", "region", "free_slots", "price_per_hour", "spot", "price_stale", "healthy", "instance_type", "can_provision", "queue_wait_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TRUST_ZONE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    SPOT_FIELD_NUMBER: _ClassVar[int]
    PRICE_STALE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CAN_PROVISION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    trust_zone: str
    region: str
    free_slots: int
    price_per_hour: float
    spot: bool
    price_stale: bool
    healthy: bool
    instance_type: str
    can_provision: int
    queue_wait_s: float
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., trust_zone: _Optional[str] = ..., region: _Optional[str] = ..., free_slots: _Optional[int] = ..., price_per_hour: _Optional[float] = ..., spot: _Optional[bool] = ..., price_stale: _Optional[bool] = ..., healthy: _Optional[bool] = ..., instance_type: _Optional[str] = ..., can_provision: _Optional[int] = ..., queue_wait_s: _Optional[float] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent_id", "pool", "trust_zone", "provider", "region", "total_slots", "free_slots", "healthy", "draining", "preempting", "lost", "seen_s_ago", "running", "gpu", "instance_id")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TRUST_ZONE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PREEMPTING_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    SEEN_S_AGO_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    pool: str
    trust_zone: str
    provider: str
    region: str
    total_slots: int
    free_slots: int
    healthy: bool
    draining: bool
    preempting: bool
    lost: bool
    seen_s_ago: float
    running: int
    gpu: str
    instance_id: str
    def __init__(self, agent_id: _Optional[str] = ..., pool: _Optional[str] = ..., trust_zone: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., total_slots: _Optional[int] = ..., free_slots: _Optional[int] = ..., healthy: _Optional[bool] = ..., draining: _Optional[bool] = ..., preempting: _Optional[bool] = ..., lost: _Optional[bool] = ..., seen_s_ago: _Optional[float] = ..., running: _Optional[int] = ..., gpu: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class Fleet(_message.Message):
    __slots__ = ("pools", "agents", "notes")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...
