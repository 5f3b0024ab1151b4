from facefleet.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunTaskRequest(_message.Message):
    __slots__ = ("task", "attempt", "resume_from_frame", "checkpoint_uri", "project_locked", "leader_term", "max_run_s")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FRAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    PROJECT_LOCKED_FIELD_NUMBER: _ClassVar[int]
    LEADER_TERM_FIELD_NUMBER: _ClassVar[int]
    MAX_RUN_S_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    attempt: int
    resume_from_frame: int
    checkpoint_uri: str
    project_locked: bool
    leader_term: int
    max_run_s: float
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., attempt: _Optional[int] = ..., resume_from_frame: _Optional[int] = ..., checkpoint_uri: _Optional[str] = ..., project_locked: _Optional[bool] = ..., leader_term: _Optional[int] = ..., max_run_s: _Optional[float] = ...) -> None: ...

class AgentCancelRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AgentCancelResponse(_message.Message):
    __slots__ = ("was_running",)
    WAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    was_running: bool
    def __init__(self, was_running: _Optional[bool] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "role", "sha256", "verified", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    sha256: str
    verified: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., sha256: _Optional[str] = ..., verified: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class AgentDescription(_message.Message):
    __slots__ = ("agent_id", "pool", "trust_zone", "provider", "region", "execution_providers", "models", "gpu", "gpu_memory_mb", "engine", "total_slots", "free_slots", "version")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TRUST_ZONE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    pool: str
    trust_zone: str
    provider: str
    region: str
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    gpu: str
    gpu_memory_mb: int
    engine: str
    total_slots: int
    free_slots: int
    version: str
    def __init__(self, agent_id: _Optional[str] = ..., pool: _Optional[str] = ..., trust_zone: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., execution_providers: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., gpu: _Optional[str] = ..., gpu_memory_mb: _Optional[int] = ..., engine: _Optional[str] = ..., total_slots: _Optional[int] = ..., free_slots: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
