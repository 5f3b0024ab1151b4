import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sensitivity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SENSITIVITY_UNSPECIFIED: _ClassVar[Sensitivity]
    SENSITIVITY_PUBLIC: _ClassVar[Sensitivity]
    SENSITIVITY_INTERNAL: _ClassVar[Sensitivity]
    SENSITIVITY_PRIVATE: _ClassVar[Sensitivity]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
    PRIORITY_URGENT: _ClassVar[Priority]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_PLACED: _ClassVar[TaskState]
    TASK_STATE_DISPATCHED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_PREEMPTED: _ClassVar[TaskState]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    INVALID_TASK: _ClassVar[ErrorReason]
    UNKNOWN_TASK: _ClassVar[ErrorReason]
    RESIDENCY_VIOLATION: _ClassVar[ErrorReason]
    PROJECT_LOCKED: _ClassVar[ErrorReason]
    NO_CAPACITY: _ClassVar[ErrorReason]
    PERMISSION_DENIED_ROLE: _ClassVar[ErrorReason]
    MODEL_VERIFICATION_FAILED: _ClassVar[ErrorReason]
    INPUT_REJECTED: _ClassVar[ErrorReason]
    PROVIDER_UNAVAILABLE: _ClassVar[ErrorReason]
    PREEMPTED: _ClassVar[ErrorReason]
    CANCELLED: _ClassVar[ErrorReason]
    POLICY_INVALID: _ClassVar[ErrorReason]
    BUDGET_EXHAUSTED: _ClassVar[ErrorReason]
    NOT_LEADER: _ClassVar[ErrorReason]
    INTERNAL: _ClassVar[ErrorReason]
    QUALITY_BELOW_THRESHOLD: _ClassVar[ErrorReason]
    STALE_LEADER_TERM: _ClassVar[ErrorReason]
SENSITIVITY_UNSPECIFIED: Sensitivity
SENSITIVITY_PUBLIC: Sensitivity
SENSITIVITY_INTERNAL: Sensitivity
SENSITIVITY_PRIVATE: Sensitivity
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
PRIORITY_URGENT: Priority
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_PLACED: TaskState
TASK_STATE_DISPATCHED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_PREEMPTED: TaskState
ERROR_REASON_UNSPECIFIED: ErrorReason
INVALID_TASK: ErrorReason
UNKNOWN_TASK: ErrorReason
RESIDENCY_VIOLATION: ErrorReason
PROJECT_LOCKED: ErrorReason
NO_CAPACITY: ErrorReason
PERMISSION_DENIED_ROLE: ErrorReason
MODEL_VERIFICATION_FAILED: ErrorReason
INPUT_REJECTED: ErrorReason
PROVIDER_UNAVAILABLE: ErrorReason
PREEMPTED: ErrorReason
CANCELLED: ErrorReason
POLICY_INVALID: ErrorReason
BUDGET_EXHAUSTED: ErrorReason
NOT_LEADER: ErrorReason
INTERNAL: ErrorReason
QUALITY_BELOW_THRESHOLD: ErrorReason
STALE_LEADER_TERM: ErrorReason

class Error(_message.Message):
    __slots__ = ("reason", "message", "field")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    message: str
    field: str
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class PipelineOptions(_message.Message):
    __slots__ = ("face_selector", "reference_face_uri", "blend", "mask", "enhance", "execution_provider", "checkpoint_every_frames", "min_id_similarity")
    FACE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FACE_URI_FIELD_NUMBER: _ClassVar[int]
    BLEND_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    ENHANCE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MIN_ID_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    face_selector: str
    reference_face_uri: str
    blend: float
    mask: str
    enhance: bool
    execution_provider: str
    checkpoint_every_frames: int
    min_id_similarity: float
    def __init__(self, face_selector: _Optional[str] = ..., reference_face_uri: _Optional[str] = ..., blend: _Optional[float] = ..., mask: _Optional[str] = ..., enhance: _Optional[bool] = ..., execution_provider: _Optional[str] = ..., checkpoint_every_frames: _Optional[int] = ..., min_id_similarity: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "project", "sensitivity", "priority", "sla_seconds", "frames", "source_uri", "target_uri", "output_uri", "options", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SLA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    TARGET_URI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    project: str
    sensitivity: Sensitivity
    priority: Priority
    sla_seconds: int
    frames: int
    source_uri: str
    target_uri: str
    output_uri: str
    options: PipelineOptions
    labels: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., project: _Optional[str] = ..., sensitivity: _Optional[_Union[Sensitivity, str]] = ..., priority: _Optional[_Union[Priority, str]] = ..., sla_seconds: _Optional[int] = ..., frames: _Optional[int] = ..., source_uri: _Optional[str] = ..., target_uri: _Optional[str] = ..., output_uri: _Optional[str] = ..., options: _Optional[_Union[PipelineOptions, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Estimate(_message.Message):
    __slots__ = ("cost_usd", "completion_s", "reserve_usd", "max_run_s")
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_S_FIELD_NUMBER: _ClassVar[int]
    RESERVE_USD_FIELD_NUMBER: _ClassVar[int]
    MAX_RUN_S_FIELD_NUMBER: _ClassVar[int]
    cost_usd: float
    completion_s: float
    reserve_usd: float
    max_run_s: float
    def __init__(self, cost_usd: _Optional[float] = ..., completion_s: _Optional[float] = ..., reserve_usd: _Optional[float] = ..., max_run_s: _Optional[float] = ...) -> None: ...

class CandidateTrace(_message.Message):
    __slots__ = ("pool", "feasible", "failed_filter", "detail", "score", "estimate")
    POOL_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FILTER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    pool: str
    feasible: bool
    failed_filter: str
    detail: str
    score: float
    estimate: Estimate
    def __init__(self, pool: _Optional[str] = ..., feasible: _Optional[bool] = ..., failed_filter: _Optional[str] = ..., detail: _Optional[str] = ..., score: _Optional[float] = ..., estimate: _Optional[_Union[Estimate, _Mapping]] = ...) -> None: ...

class PlacementDecision(_message.Message):
    __slots__ = ("outcome", "pool", "rule", "reason", "candidates", "estimate", "rules_version", "notes")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[PlacementDecision.Outcome]
        DISPATCH: _ClassVar[PlacementDecision.Outcome]
        QUEUE: _ClassVar[PlacementDecision.Outcome]
        REJECT: _ClassVar[PlacementDecision.Outcome]
    OUTCOME_UNSPECIFIED: PlacementDecision.Outcome
    DISPATCH: PlacementDecision.Outcome
    QUEUE: PlacementDecision.Outcome
    REJECT: PlacementDecision.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    outcome: PlacementDecision.Outcome
    pool: str
    rule: str
    reason: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateTrace]
    estimate: Estimate
    rules_version: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, outcome: _Optional[_Union[PlacementDecision.Outcome, str]] = ..., pool: _Optional[str] = ..., rule: _Optional[str] = ..., reason: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateTrace, _Mapping]]] = ..., estimate: _Optional[_Union[Estimate, _Mapping]] = ..., rules_version: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class Quality(_message.Message):
    __slots__ = ("id_similarity_mean", "id_similarity_min", "faces_swapped")
    ID_SIMILARITY_MEAN_FIELD_NUMBER: _ClassVar[int]
    ID_SIMILARITY_MIN_FIELD_NUMBER: _ClassVar[int]
    FACES_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    id_similarity_mean: float
    id_similarity_min: float
    faces_swapped: int
    def __init__(self, id_similarity_mean: _Optional[float] = ..., id_similarity_min: _Optional[float] = ..., faces_swapped: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("task_id", "frames_done", "frames_total", "fps", "stage", "checkpoint_frame", "checkpoint_uri", "message", "quality", "output_uri", "engine", "state", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FRAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    frames_done: int
    frames_total: int
    fps: float
    stage: str
    checkpoint_frame: int
    checkpoint_uri: str
    message: str
    quality: Quality
    output_uri: str
    engine: str
    state: TaskState
    error: Error
    def __init__(self, task_id: _Optional[str] = ..., frames_done: _Optional[int] = ..., frames_total: _Optional[int] = ..., fps: _Optional[float] = ..., stage: _Optional[str] = ..., checkpoint_frame: _Optional[int] = ..., checkpoint_uri: _Optional[str] = ..., message: _Optional[str] = ..., quality: _Optional[_Union[Quality, _Mapping]] = ..., output_uri: _Optional[str] = ..., engine: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class RunReport(_message.Message):
    __slots__ = ("task_id", "attempt", "leader_term", "finished", "outcome")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEADER_TERM_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    leader_term: int
    finished: bool
    outcome: Progress
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., leader_term: _Optional[int] = ..., finished: _Optional[bool] = ..., outcome: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class RunRef(_message.Message):
    __slots__ = ("task_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class StateTransition(_message.Message):
    __slots__ = ("from_state", "to_state", "reason", "at", "pool", "agent_id")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    from_state: TaskState
    to_state: TaskState
    reason: str
    at: _timestamp_pb2.Timestamp
    pool: str
    agent_id: str
    def __init__(self, from_state: _Optional[_Union[TaskState, str]] = ..., to_state: _Optional[_Union[TaskState, str]] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pool: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...
