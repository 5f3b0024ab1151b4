import datetime

from facefleet.v1 import agent_pb2 as _agent_pb2
from facefleet.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitTaskRequest(_message.Message):
    __slots__ = ("task", "idempotency_key")
    TASK_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    idempotency_key: str
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitTaskResponse(_message.Message):
    __slots__ = ("task_id", "created", "state")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    created: bool
    state: _types_pb2.TaskState
    def __init__(self, task_id: _Optional[str] = ..., created: _Optional[bool] = ..., state: _Optional[_Union[_types_pb2.TaskState, str]] = ...) -> None: ...

class SubmitTasksRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SubmitTaskRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[SubmitTaskRequest, _Mapping]]] = ...) -> None: ...

class SubmitTasksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitTaskResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitTaskResult, _Mapping]]] = ...) -> None: ...

class SubmitTaskResult(_message.Message):
    __slots__ = ("submitted", "error")
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    submitted: SubmitTaskResponse
    error: _types_pb2.Error
    def __init__(self, submitted: _Optional[_Union[SubmitTaskResponse, _Mapping]] = ..., error: _Optional[_Union[_types_pb2.Error, _Mapping]] = ...) -> None: ...

class SubmitStreamRequest(_message.Message):
    __slots__ = ("seq", "submit")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    submit: SubmitTaskRequest
    def __init__(self, seq: _Optional[int] = ..., submit: _Optional[_Union[SubmitTaskRequest, _Mapping]] = ...) -> None: ...

class SubmitStreamResponse(_message.Message):
    __slots__ = ("seq", "result")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    result: SubmitTaskResult
    def __init__(self, seq: _Optional[int] = ..., result: _Optional[_Union[SubmitTaskResult, _Mapping]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task", "state", "pool", "rule", "agent_id", "attempts", "placement", "last_progress", "transitions", "submitted_at")
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    state: _types_pb2.TaskState
    pool: str
    rule: str
    agent_id: str
    attempts: int
    placement: _types_pb2.PlacementDecision
    last_progress: _types_pb2.Progress
    transitions: _containers.RepeatedCompositeFieldContainer[_types_pb2.StateTransition]
    submitted_at: _timestamp_pb2.Timestamp
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., state: _Optional[_Union[_types_pb2.TaskState, str]] = ..., pool: _Optional[str] = ..., rule: _Optional[str] = ..., agent_id: _Optional[str] = ..., attempts: _Optional[int] = ..., placement: _Optional[_Union[_types_pb2.PlacementDecision, _Mapping]] = ..., last_progress: _Optional[_Union[_types_pb2.Progress, _Mapping]] = ..., transitions: _Optional[_Iterable[_Union[_types_pb2.StateTransition, _Mapping]]] = ..., submitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("project", "state", "pool", "limit", "page_token")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project: str
    state: _types_pb2.TaskState
    pool: str
    limit: int
    page_token: str
    def __init__(self, project: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.TaskState, str]] = ..., pool: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("task_id", "state", "reason", "at", "progress", "pool")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: _types_pb2.TaskState
    reason: str
    at: _timestamp_pb2.Timestamp
    progress: _types_pb2.Progress
    pool: str
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.TaskState, str]] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress: _Optional[_Union[_types_pb2.Progress, _Mapping]] = ..., pool: _Optional[str] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _types_pb2.TaskState
    def __init__(self, state: _Optional[_Union[_types_pb2.TaskState, str]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("task_id", "task")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task: _types_pb2.Task
    def __init__(self, task_id: _Optional[str] = ..., task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_id", "address", "pool", "trust_zone", "provider", "region", "total_slots", "free_slots", "healthy", "running_task_ids", "execution_providers", "gpu", "sec_per_frame", "preempting", "instance_id", "runs", "known_leader_term")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TRUST_ZONE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    SEC_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    PREEMPTING_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_LEADER_TERM_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    address: str
    pool: str
    trust_zone: str
    provider: str
    region: str
    total_slots: int
    free_slots: int
    healthy: bool
    running_task_ids: _containers.RepeatedScalarFieldContainer[str]
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    gpu: str
    sec_per_frame: float
    preempting: bool
    instance_id: str
    runs: _containers.RepeatedCompositeFieldContainer[_types_pb2.RunReport]
    known_leader_term: int
    def __init__(self, agent_id: _Optional[str] = ..., address: _Optional[str] = ..., pool: _Optional[str] = ..., trust_zone: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., total_slots: _Optional[int] = ..., free_slots: _Optional[int] = ..., healthy: _Optional[bool] = ..., running_task_ids: _Optional[_Iterable[str]] = ..., execution_providers: _Optional[_Iterable[str]] = ..., gpu: _Optional[str] = ..., sec_per_frame: _Optional[float] = ..., preempting: _Optional[bool] = ..., instance_id: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[_types_pb2.RunReport, _Mapping]]] = ..., known_leader_term: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("drain", "cancel_task_ids", "heartbeat_interval_s", "server_time", "leader_term", "acknowledged", "run_limits")
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    LEADER_TERM_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    RUN_LIMITS_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    cancel_task_ids: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_interval_s: int
    server_time: _timestamp_pb2.Timestamp
    leader_term: int
    acknowledged: _containers.RepeatedCompositeFieldContainer[_types_pb2.RunRef]
    run_limits: _containers.RepeatedCompositeFieldContainer[RunLimit]
    def __init__(self, drain: _Optional[bool] = ..., cancel_task_ids: _Optional[_Iterable[str]] = ..., heartbeat_interval_s: _Optional[int] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., leader_term: _Optional[int] = ..., acknowledged: _Optional[_Iterable[_Union[_types_pb2.RunRef, _Mapping]]] = ..., run_limits: _Optional[_Iterable[_Union[RunLimit, _Mapping]]] = ...) -> None: ...

class RunLimit(_message.Message):
    __slots__ = ("task_id", "attempt", "max_run_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_RUN_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    max_run_s: float
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., max_run_s: _Optional[float] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("heartbeat", "updates", "refusals")
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    heartbeat: HeartbeatRequest
    updates: _containers.RepeatedCompositeFieldContainer[RunUpdate]
    refusals: _containers.RepeatedCompositeFieldContainer[RunRefusal]
    def __init__(self, heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ..., updates: _Optional[_Iterable[_Union[RunUpdate, _Mapping]]] = ..., refusals: _Optional[_Iterable[_Union[RunRefusal, _Mapping]]] = ...) -> None: ...

class RunUpdate(_message.Message):
    __slots__ = ("task_id", "attempt", "progress")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    progress: _types_pb2.Progress
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., progress: _Optional[_Union[_types_pb2.Progress, _Mapping]] = ...) -> None: ...

class RunRefusal(_message.Message):
    __slots__ = ("task_id", "attempt", "error", "retry")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    error: _types_pb2.Error
    retry: bool
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., error: _Optional[_Union[_types_pb2.Error, _Mapping]] = ..., retry: _Optional[bool] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("control", "assignments")
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    control: HeartbeatResponse
    assignments: _containers.RepeatedCompositeFieldContainer[_agent_pb2.RunTaskRequest]
    def __init__(self, control: _Optional[_Union[HeartbeatResponse, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[_agent_pb2.RunTaskRequest, _Mapping]]] = ...) -> None: ...
