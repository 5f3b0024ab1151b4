"""Resumable video progress: encoded segments plus a small JSON state, under a checkpoint dir.

The directory is self-contained: copy it to another agent and `SwapPipeline.run` continues from the
last committed segment, redoing at most one checkpoint interval. A fingerprint of the inputs and
options guards against resuming a different job's segments.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

from facefleet.agent.models.verify import file_sha256

STATE_FILE = "checkpoint.json"
log = structlog.get_logger()


@dataclass
class CheckpointState:
    fingerprint: str
    next_frame: int = 0
    segments: list[str] = field(default_factory=list)
    similarity_sum: float = 0.0
    similarity_min: float | None = None
    similarity_count: int = 0
    faces_swapped: int = 0


def job_fingerprint(source: Path, target: Path, engine: str, options: dict[str, object]) -> str:
    digest = hashlib.sha256()
    digest.update(file_sha256(source).encode())
    digest.update(file_sha256(target).encode())
    digest.update(engine.encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class CheckpointStore:
    def __init__(self, directory: Path, fingerprint: str):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state = self._load(fingerprint)

    def _load(self, fingerprint: str) -> CheckpointState:
        path = self.directory / STATE_FILE
        if path.exists():
            try:
                state = CheckpointState(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as exc:
                log.warning("checkpoint_unreadable", path=str(path), error=str(exc), action="starting over")
            else:
                segments_present = all((self.directory / s).is_file() for s in state.segments)
                if state.fingerprint == fingerprint and segments_present:
                    return state
                log.warning(
                    "checkpoint_discarded",
                    path=str(path),
                    reason="different job inputs/options" if segments_present else "segments missing",
                )
        self.clear()
        return CheckpointState(fingerprint=fingerprint)

    def segment_path(self, start_frame: int) -> Path:
        return self.directory / f"seg_{start_frame:08d}.mp4"

    def commit(self, segment: Path, frames: int, similarities: list[float], faces_swapped: int) -> None:
        """Record a fully encoded segment; the state file is replaced atomically."""
        state = self.state
        state.segments.append(segment.name)
        state.next_frame += frames
        state.similarity_sum += sum(similarities)
        state.similarity_count += len(similarities)
        if similarities:
            low = min(similarities)
            state.similarity_min = low if state.similarity_min is None else min(state.similarity_min, low)
        state.faces_swapped += faces_swapped
        tmp = self.directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state)), encoding="utf-8")
        os.replace(tmp, self.directory / STATE_FILE)

    def segments(self) -> list[Path]:
        return [self.directory / name for name in self.state.segments]

    def clear(self) -> None:
        for path in self.directory.glob("seg_*.mp4*"):
            path.unlink(missing_ok=True)
        (self.directory / STATE_FILE).unlink(missing_ok=True)
