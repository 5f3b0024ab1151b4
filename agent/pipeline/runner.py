"""`SwapPipeline`: the one entry point the agent server and `facefleet swap` call.

`load` verifies the model manifest (sha256 + signature before any session) and picks the engine;
`run` swaps one image or video, streaming progress, honouring cancellation, and checkpointing video
work so another agent can continue it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import structlog

from facefleet.agent.metrics import ID_SIMILARITY, QUALITY_GATE_FAILURES, STAGE_SECONDS
from facefleet.agent.models.sessions import resolve_providers
from facefleet.agent.models.verify import ModelStatus
from facefleet.agent.pipeline.checkpoint import CheckpointStore, job_fingerprint
from facefleet.agent.pipeline.engine import LoadedEngine, StageChain, StageOptions, load_engine
from facefleet.agent.pipeline.errors import Cancelled, InputRejected
from facefleet.agent.pipeline.mask import DEFAULT_MASK, MaskKind
from facefleet.agent.pipeline.media import (
    MediaLimits,
    SegmentEncoder,
    VideoInfo,
    is_video,
    mux_segments,
    probe_video,
    read_frames,
    read_image,
)
from facefleet.agent.pipeline.prefetch import Prefetched
from facefleet.agent.pipeline.provenance import (
    C2paSigningKey,
    ProvenanceRecord,
    ProvenanceSigningFailed,
    c2pa_mime_type,
    c2pa_sidecar_fields,
    sign_c2pa,
    write_labelled_image,
    write_sidecar,
)
from facefleet.agent.pipeline.quality import QualityBelowThreshold, QualityReport, enforce, summarize
from facefleet.agent.pipeline.select import FaceSelector
from facefleet.agent.pipeline.stage import FrameState

log = structlog.get_logger()


@dataclass
class SwapJob:
    task_id: str
    source_path: Path
    target_path: Path
    output_path: Path
    checkpoint_dir: Path
    face_selector: str = "largest"
    reference_face_path: Path | None = None
    blend: float = 1.0
    mask: str = DEFAULT_MASK
    enhance: bool = False
    checkpoint_every_frames: int = 48
    resume_from_frame: int = 0  # informational: the checkpoint dir decides where work resumes
    min_id_similarity: float | None = None  # quality gate: fail below this (see quality.enforce)


@dataclass
class ProgressUpdate:
    frames_done: int
    frames_total: int
    fps: float
    stage: str
    checkpoint_frame: int
    message: str = ""


@dataclass
class SwapResult:
    output_path: Path
    frames: int
    engine: str
    quality: QualityReport
    checkpoint_frame: int
    stage_seconds: dict[str, float] = field(default_factory=dict)  # totals over the frames run here
    frames_processed: int = 0  # frames this call ran through the stages (less than `frames` on resume)
    engine_note: str = ""
    sidecar_path: Path | None = None


def _options(job: SwapJob) -> StageOptions:
    try:
        selector = FaceSelector(job.face_selector)
    except ValueError:
        raise InputRejected(
            f"face_selector {job.face_selector!r} is not one of all, largest, reference", reason_code="INVALID_TASK"
        ) from None
    try:
        mask = MaskKind(job.mask)
    except ValueError:
        raise InputRejected(
            f"mask {job.mask!r} is not one of {', '.join(MaskKind)}", reason_code="INVALID_TASK"
        ) from None
    if not 0.0 <= job.blend <= 1.0:
        raise InputRejected(f"blend {job.blend} must be between 0 and 1", reason_code="INVALID_TASK")
    if job.min_id_similarity is not None and not 0.0 <= job.min_id_similarity <= 1.0:
        raise InputRejected(
            f"min_id_similarity {job.min_id_similarity} must be between 0 and 1", reason_code="INVALID_TASK"
        )
    if job.checkpoint_every_frames < 1:
        raise InputRejected("checkpoint_every_frames must be at least 1", reason_code="INVALID_TASK")
    return StageOptions(face_selector=selector, blend=job.blend, mask=mask, enhance=job.enhance)


class _StageTotals:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.similarities: list[float] = []
        self.faces_swapped = 0

    def add(self, state: FrameState) -> None:
        for name, seconds in state.stage_seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            STAGE_SECONDS.labels(stage=name).observe(seconds)
        self.similarities.extend(state.id_similarities)
        self.faces_swapped += state.faces_swapped


class SwapPipeline:
    def __init__(
        self,
        loaded: LoadedEngine,
        providers: list[str],
        models_dir: Path,
        workers: int,
        limits: MediaLimits,
        provenance_signer: C2paSigningKey | None = None,
    ):
        self._loaded = loaded
        self.provenance_signer = provenance_signer
        self.execution_providers = providers
        self.models_dir = models_dir
        self.workers = workers
        self.limits = limits

    @classmethod
    def load(
        cls,
        models_dir: Path,
        providers: list[str] | None = None,
        workers: int | None = None,
        limits: MediaLimits | None = None,
        provenance_signer: C2paSigningKey | None = None,
    ) -> SwapPipeline:
        """`provenance_signer`: sign every output with a C2PA manifest (None: label + sidecar only)."""
        resolved = resolve_providers(providers)
        cores = os.cpu_count() or 1
        workers = workers or min(4, cores)
        # Frame workers run sessions concurrently: split the cores between them instead of letting
        # every session spin up one thread per core (oversubscription on small machines).
        loaded = load_engine(models_dir, resolved, intra_op_threads=max(1, cores // workers))
        pipeline = cls(loaded, resolved, models_dir, workers, limits or MediaLimits(), provenance_signer)
        log.info(
            "swap_pipeline_loaded",
            engine=pipeline.engine,
            providers=resolved,
            models=[(m.name, m.verified) for m in pipeline.models],
            note=pipeline.engine_note,
            c2pa_signing=str(provenance_signer.cert_path) if provenance_signer else None,
        )
        return pipeline

    @property
    def engine(self) -> str:
        return self._loaded.engine.name

    @property
    def engine_note(self) -> str:
        return self._loaded.engine.note

    @property
    def models(self) -> list[ModelStatus]:
        return list(self._loaded.statuses)

    def _record(self, job: SwapJob) -> ProvenanceRecord:
        models = [{"name": m.name, "role": m.role, "sha256": m.sha256} for m in self.models if m.verified]
        return ProvenanceRecord(task_id=job.task_id, engine=self.engine, models=models)

    def _sign(self, job: SwapJob, record: ProvenanceRecord) -> dict[str, object]:
        """C2PA-sign the finished output when a key is configured; the sidecar fields either way."""
        if self.provenance_signer is None:
            return c2pa_sidecar_fields(None)
        try:
            label = sign_c2pa(job.output_path, record, job.target_path, self.provenance_signer)
        except ProvenanceSigningFailed:
            job.output_path.unlink(missing_ok=True)  # a configured key means no unsigned output is left behind
            raise
        return c2pa_sidecar_fields(label)

    def run(
        self, job: SwapJob, on_progress: Callable[[ProgressUpdate], None], cancelled: threading.Event
    ) -> SwapResult:
        options = _options(job)
        if self.provenance_signer is not None:  # refuse before any work what could not be signed
            c2pa_mime_type(job.output_path)
            c2pa_mime_type(job.target_path)
        source = read_image(job.source_path, "source image", self.limits)
        reference = (
            read_image(job.reference_face_path, "reference face image", self.limits)
            if job.reference_face_path is not None
            else None
        )
        job.output_path.parent.mkdir(parents=True, exist_ok=True)
        if is_video(job.target_path):
            return self._run_video(job, options, source, reference, on_progress, cancelled)
        return self._run_image(job, options, source, reference, on_progress, cancelled)

    def _run_image(
        self,
        job: SwapJob,
        options: StageOptions,
        source: np.ndarray,
        reference: np.ndarray | None,
        on_progress: Callable[[ProgressUpdate], None],
        cancelled: threading.Event,
    ) -> SwapResult:
        target = read_image(job.target_path, "target image", self.limits)
        chain = self._loaded.engine.prepare(source, options, reference)
        if cancelled.is_set():
            raise Cancelled(f"task {job.task_id} cancelled before it started")
        started = time.perf_counter()
        state = chain.process(target)
        totals = _StageTotals()
        totals.add(state)
        record = self._record(job)
        write_labelled_image(state.frame, job.output_path, record)
        signed = self._sign(job, record)
        sidecar = write_sidecar(
            job.output_path, record, job.source_path, job.target_path, {"engine_note": self.engine_note, **signed}
        )
        elapsed = time.perf_counter() - started
        on_progress(
            ProgressUpdate(
                1, 1, 1.0 / elapsed if elapsed > 0 else 0.0, "done", 0, f"{state.faces_swapped} face(s) swapped"
            )
        )
        quality = summarize(state.id_similarities, state.faces_swapped)
        self._gate(job, quality)
        return SwapResult(
            output_path=job.output_path,
            frames=1,
            engine=self.engine,
            quality=quality,
            checkpoint_frame=0,
            stage_seconds=totals.seconds,
            frames_processed=1,
            engine_note=self.engine_note,
            sidecar_path=sidecar,
        )

    def _run_video(
        self,
        job: SwapJob,
        options: StageOptions,
        source: np.ndarray,
        reference: np.ndarray | None,
        on_progress: Callable[[ProgressUpdate], None],
        cancelled: threading.Event,
    ) -> SwapResult:
        fingerprint_options: dict[str, object] = {
            "selector": options.face_selector,
            "blend": options.blend,
            "mask": options.mask,
            "enhance": options.enhance,
            "interval": job.checkpoint_every_frames,
            "reference": str(job.reference_face_path or ""),
        }
        # Hashing the inputs (I/O bound) overlaps the probe and the source-face inference.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint") as hasher:
            fingerprint_future = hasher.submit(
                job_fingerprint, job.source_path, job.target_path, self.engine, fingerprint_options
            )
            info = probe_video(job.target_path, self.limits)
            chain = self._loaded.engine.prepare(source, options, reference)
            fingerprint = fingerprint_future.result()
        store = CheckpointStore(job.checkpoint_dir, fingerprint)
        start = store.state.next_frame
        chain.start_at(start)
        if job.resume_from_frame > start:
            log.warning(
                "resume_point_ahead_of_checkpoint",
                task_id=job.task_id,
                requested=job.resume_from_frame,
                checkpoint=start,
                action="resuming from the checkpoint; frames after it were never committed",
            )
        work_dir = Path(tempfile.mkdtemp(prefix=f"facefleet-{job.task_id}-"))
        totals = _StageTotals()
        started = time.perf_counter()
        processed = 0
        # Decode on its own thread, a couple of batches ahead of the worker pool.
        frames = Prefetched(read_frames(job.target_path, info, start), depth=self.workers * 4, name="decode")
        try:
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="swap-frame") as pool:
                while store.state.next_frame < info.frames:
                    segment_start = store.state.next_frame
                    count = min(job.checkpoint_every_frames, info.frames - segment_start)
                    done_in_segment = self._encode_segment(
                        job,
                        info,
                        chain,
                        pool,
                        islice(frames, count),
                        store,
                        totals,
                        segment_start,
                        on_progress,
                        cancelled,
                        started,
                        processed,
                    )
                    processed += done_in_segment
                    if done_in_segment == 0:
                        break  # fewer decodable frames than packets: the stream ended early
            record = self._record(job)
            staging = work_dir / f"output{job.output_path.suffix}"
            on_progress(
                ProgressUpdate(
                    store.state.next_frame,
                    info.frames,
                    self._fps(processed, started),
                    "mux",
                    store.state.next_frame,
                    "joining segments and original audio",
                )
            )
            mux_segments(store.segments(), job.target_path, staging, record.label(), work_dir, info.audio_codec)
            shutil.move(str(staging), job.output_path)
            signed = self._sign(job, record)
            sidecar = write_sidecar(
                job.output_path,
                record,
                job.source_path,
                job.target_path,
                {"engine_note": self.engine_note, "frames": store.state.next_frame, **signed},
            )
            state = store.state
            mean = state.similarity_sum / state.similarity_count if state.similarity_count else None
            quality = QualityReport(mean, state.similarity_min, state.faces_swapped)
            frames_total = state.next_frame
            store.clear()
            self._gate(job, quality)
            on_progress(
                ProgressUpdate(
                    frames_total, info.frames, self._fps(processed, started), "done", frames_total, "finished"
                )
            )
            return SwapResult(
                output_path=job.output_path,
                frames=frames_total,
                engine=self.engine,
                quality=quality,
                checkpoint_frame=frames_total,
                stage_seconds=totals.seconds,
                frames_processed=processed,
                engine_note=self.engine_note,
                sidecar_path=sidecar,
            )
        finally:
            frames.close()
            shutil.rmtree(work_dir, ignore_errors=True)

    def _gate(self, job: SwapJob, quality: QualityReport) -> None:
        """Export the job's ID similarity and fail it when under its `min_id_similarity`."""
        if quality.id_similarity_min is not None:
            ID_SIMILARITY.labels(engine=self.engine).observe(quality.id_similarity_min)
        try:
            enforce(quality, job.min_id_similarity)
        except QualityBelowThreshold as failure:
            QUALITY_GATE_FAILURES.labels(engine=self.engine).inc()
            log.warning("quality_gate_failed", task_id=job.task_id, reason=failure.message, output=str(job.output_path))
            kept = f"; the output is kept at {job.output_path} for review"
            raise QualityBelowThreshold(failure.message + kept) from None

    @staticmethod
    def _fps(frames: int, started: float) -> float:
        elapsed = time.perf_counter() - started
        return frames / elapsed if elapsed > 0 else 0.0

    def _encode_segment(
        self,
        job: SwapJob,
        info: VideoInfo,
        chain: StageChain,
        pool: ThreadPoolExecutor,
        frames: Iterator[np.ndarray],
        store: CheckpointStore,
        totals: _StageTotals,
        segment_start: int,
        on_progress: Callable[[ProgressUpdate], None],
        cancelled: threading.Event,
        started: float,
        processed_before: int,
    ) -> int:
        """Process and encode one checkpoint interval; commit it only when fully encoded."""
        final = store.segment_path(segment_start)
        partial = final.with_name(final.name + ".partial")
        encoder = SegmentEncoder(partial, info)
        window = self.workers * 2  # bounded memory: at most this many frames in flight
        pending: deque[Future[FrameState]] = deque()
        segment_totals = _StageTotals()
        written = 0

        def drain_one() -> None:
            nonlocal written
            state = pending.popleft().result()
            encoder.write(state.frame)
            segment_totals.add(state)
            written += 1
            if cancelled.is_set():
                raise Cancelled(
                    f"task {job.task_id} cancelled at frame {segment_start + written}; "
                    f"resume from checkpoint frame {store.state.next_frame}",
                    checkpoint_frame=store.state.next_frame,
                )
            done = segment_start + written
            on_progress(
                ProgressUpdate(
                    done, info.frames, self._fps(processed_before + written, started), "swap", store.state.next_frame
                )
            )

        try:
            for offset, frame in enumerate(frames):
                pending.append(pool.submit(chain.process, frame, segment_start + offset))
                if len(pending) >= window:
                    drain_one()
            while pending:
                drain_one()
        except BaseException:
            for future in pending:
                future.cancel()
            encoder.abort()
            raise
        if written == 0:
            encoder.abort()
            return 0
        encoder.close()
        os.replace(partial, final)
        store.commit(final, written, segment_totals.similarities, segment_totals.faces_swapped)
        for name, seconds in segment_totals.seconds.items():
            totals.seconds[name] = totals.seconds.get(name, 0.0) + seconds
        on_progress(
            ProgressUpdate(
                store.state.next_frame,
                info.frames,
                self._fps(processed_before + written, started),
                "checkpoint",
                store.state.next_frame,
                f"checkpoint at frame {store.state.next_frame}",
            )
        )
        return written
