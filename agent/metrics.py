"""Every Prometheus metric an agent exports on /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SLOTS_FREE = Gauge("facefleet_agent_slots_free", "Free task slots on this agent.", ["pool"])
SLOTS_BUSY = Gauge("facefleet_agent_slots_busy", "Busy task slots on this agent.", ["pool"])
FRAMES = Counter("facefleet_agent_frames_total", "Frames processed.", ["pool", "engine"])
FPS = Gauge("facefleet_agent_frames_per_second", "Frames per second of the most recent task.", ["pool"])
STAGE_SECONDS = Histogram(
    "facefleet_agent_stage_seconds",
    "Per-frame latency of each pipeline stage.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ID_SIMILARITY = Histogram(
    "facefleet_agent_id_similarity",
    "Worst-face ID similarity to the source per finished job (dlib ResNet, 1 - distance; >= 0.4 same person).",
    ["engine"],
    buckets=(0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0),
)
QUALITY_GATE_FAILURES = Counter(
    "facefleet_agent_quality_gate_failures_total",
    "Jobs failed because their ID similarity was under the task's min_id_similarity.",
    ["engine"],
)
TASKS = Counter("facefleet_agent_tasks_total", "Tasks finished on this agent, by outcome.", ["pool", "outcome"])
REFUSALS = Counter("facefleet_agent_refusals_total", "Tasks refused, by reason code.", ["reason"])
GPU_UTILIZATION = Gauge("facefleet_agent_gpu_utilization_ratio", "GPU utilisation 0..1 (NVML).", ["gpu"])
GPU_MEMORY_USED = Gauge("facefleet_agent_gpu_memory_used_bytes", "GPU memory in use (NVML).", ["gpu"])
PREEMPTION_NOTICES = Counter(
    "facefleet_agent_preemption_notices_total", "Spot interruption notices seen.", ["provider"]
)
