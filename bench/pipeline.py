"""Swap pipeline throughput: end-to-end frames/s vs the model-only inference rate on the same frames.

    .venv/bin/python bench/pipeline.py [--frames 48 --frames 240] [--runs 3] [--workers 2]
                                       [--model-cost LAYERS] [--width 320] [--height 240]
                                       [--models DIR] [--provider cuda]

end_to_end: `SwapPipeline.run` wall time (probe, input hashing, decode, every stage, x264 encode of
each checkpoint segment, mux with audio) on a generated video with one face per frame.
model_only: the same models (the pipeline's own, warm) running the same inference on the same frames
with the same concurrency (`--workers` threads): detector on each frame, swapper on the face crop,
and the quality gate's dlib ResNet descriptor (5-point shape + network) of the face. Inputs are
prepared before the clock starts, so it is pure model time: the ceiling the pipeline could reach.
Both are the median of `--runs` timed runs after one warm-up run per clip.

Without --models it generates the tiny test models (real insightface signatures). `--model-cost 0`
keeps them tiny (about 1 ms of inference per frame: a worst case that measures pipeline overhead);
`--model-cost N` adds N conv layers to the detector and swapper (about 3 + 1.6 ms per layer on one
core), a production-like balance of model time to overhead. Prints one JSON document and a one-line
summary per clip. Target: end_to_end_fps / model_only_fps >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts
from facefleet.agent.models.tiny import DETECTOR_SIZE, draw_synthetic_face, write_tiny_models
from facefleet.agent.pipeline.align import norm_crop
from facefleet.agent.pipeline.dlib_faces import dlib_faces
from facefleet.agent.pipeline.engine import OnnxEngine
from facefleet.agent.pipeline.media import probe_video, read_frames, read_image
from facefleet.agent.pipeline.runner import SwapJob, SwapPipeline, SwapResult


def make_inputs(work: Path, frames: int, width: int, height: int) -> tuple[Path, Path]:
    scale = max(width, height) / DETECTOR_SIZE  # the tiny detector letterboxes into 160x160
    rng = np.random.default_rng(0)
    base = rng.integers(40, 120, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    background = cv2.resize(base, (width, height), interpolation=cv2.INTER_NEAREST)
    video = work / "target.mp4"
    cmd = [
        "ffmpeg",
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "bgr24",
        "-s",
        f"{width}x{height}",
        "-r",
        "24",
        "-i",
        "-",
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=440:duration={frames / 24}",
        "-map",
        "0:v",
        "-map",
        "1:a",
        "-c:v",
        "libx264",
        "-crf",
        "12",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(video),
    ]
    encoder = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert encoder.stdin is not None
    for index in range(frames):
        frame = np.roll(background, index, axis=1)
        draw_synthetic_face(frame, (width * 0.45 + index % 5, height * 0.48), scale)
        encoder.stdin.write(frame.tobytes())
    encoder.stdin.close()
    if encoder.wait() != 0:
        raise SystemExit("ffmpeg failed to build the benchmark video")
    source = np.full((height, width, 3), 200, np.uint8)
    draw_synthetic_face(
        source, (width / 2, height / 2), scale, skin_rgb=(228, 172, 124), eye_rgb=(30, 60, 200), mouth_rgb=(200, 20, 60)
    )
    source_path = work / "source.png"
    cv2.imwrite(str(source_path), source)
    return source_path, video


ModelCall = Callable[[], object]


def _model_inputs(engine: OnnxEngine, frames: list[np.ndarray], latent: np.ndarray) -> list[list[ModelCall]]:
    """Per frame, the model calls the pipeline makes on it, with their inputs prepared up front."""
    faces_model = dlib_faces()
    per_frame: list[list[ModelCall]] = []
    for frame in frames:
        blob, _ = engine.detector.blob(frame)
        calls: list[ModelCall] = [partial(engine.detector.session.run, None, {engine.detector.input_name: blob})]
        faces = engine.detector.detect(frame)
        if faces:
            face = max(faces, key=lambda f: f.area)  # the pipeline's default selector: largest
            crop, _ = norm_crop(frame, face.kps, engine.swapper.crop_size)
            swap_feeds = {engine.swapper.target_name: engine.swapper.blob(crop), engine.swapper.source_name: latent}
            calls.append(partial(engine.swapper.session.run, None, swap_feeds))
            calls.append(partial(faces_model.descriptor, faces_model.rgb(frame), face.bbox))
        per_frame.append(calls)
    return per_frame


def model_only_seconds(pipeline: SwapPipeline, source: Path, video: Path) -> tuple[float, int]:
    """Wall time of the pipeline's sessions on every frame's inputs, `pipeline.workers` at a time."""
    engine = pipeline._loaded.engine
    if not isinstance(engine, OnnxEngine):
        raise SystemExit("model-only rate needs the ONNX engine (verified detector, recognizer, swapper)")
    source_image = read_image(source, "benchmark source image")
    source_face = max(engine.detector.detect(source_image), key=lambda f: f.area)
    latent = engine.swapper.latent(engine.recognizer.embed_face(source_image, source_face))
    frames = list(read_frames(video, probe_video(video)))
    inputs = _model_inputs(engine, frames, latent)

    def infer(calls: list[ModelCall]) -> None:
        for call in calls:
            call()

    with ThreadPoolExecutor(max_workers=pipeline.workers) as pool:
        started = time.perf_counter()
        list(pool.map(infer, inputs))
        return time.perf_counter() - started, len(frames)


def end_to_end_run(pipeline: SwapPipeline, work: Path, source: Path, video: Path, run: int) -> tuple[float, SwapResult]:
    frames = probe_video(video).frames
    job = SwapJob(
        task_id=f"bench-{run}",
        source_path=source,
        target_path=video,
        output_path=work / f"out-{run}.mp4",
        checkpoint_dir=work / f"ckpt-{run}",
        checkpoint_every_frames=max(1, min(48, frames // 2)),
    )
    started = time.perf_counter()
    result = pipeline.run(job, lambda update: None, threading.Event())
    return time.perf_counter() - started, result


def bench_clip(pipeline: SwapPipeline, work: Path, frames: int, width: int, height: int, runs: int) -> dict:
    clip_dir = work / f"clip-{frames}"
    clip_dir.mkdir()
    source, video = make_inputs(clip_dir, frames, width, height)
    end_to_end_run(pipeline, clip_dir, source, video, -1)  # warm-up: sessions, page cache, ffmpeg
    model_only_seconds(pipeline, source, video)
    e2e = [end_to_end_run(pipeline, clip_dir, source, video, run) for run in range(runs)]
    model = [model_only_seconds(pipeline, source, video)[0] for _ in range(runs)]
    median_e2e = statistics.median(seconds for seconds, _ in e2e)
    median_run = min(e2e, key=lambda item: abs(item[0] - median_e2e))[1]
    median_model = statistics.median(model)
    e2e_fps = median_run.frames / median_e2e
    model_fps = frames / median_model
    return {
        "frames": median_run.frames,
        "end_to_end_seconds": [round(seconds, 3) for seconds, _ in e2e],
        "model_only_seconds": [round(seconds, 3) for seconds in model],
        "end_to_end_fps": round(e2e_fps, 2),
        "model_only_fps": round(model_fps, 2),
        "ratio": round(e2e_fps / model_fps, 3),
        "stage_ms_per_frame": {  # summed worker time per frame (stages overlap across workers)
            k: round(1000 * v / median_run.frames_processed, 3) for k, v in sorted(median_run.stage_seconds.items())
        },
        "id_similarity_mean": median_run.quality.id_similarity_mean,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--frames", type=int, action="append", default=None, help="clip length; repeat (48, 240)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model-cost", type=int, default=0, help="extra conv layers in the generated models")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--provider", action="append", default=None)
    args = parser.parse_args()
    clips = args.frames or [48, 240]

    with tempfile.TemporaryDirectory(prefix="facefleet-bench-") as tmp:
        work = Path(tmp)
        models = args.models or write_tiny_models(work / "models", compute_layers=args.model_cost).models_dir
        pipeline = SwapPipeline.load(models, providers=args.provider, workers=args.workers)
        results = [bench_clip(pipeline, work, n, args.width, args.height, args.runs) for n in clips]

    report = {
        "benchmark": "pipeline",
        "machine": machine_facts(),
        "engine": pipeline.engine,
        "models": str(args.models) if args.models else f"generated tiny, model_cost={args.model_cost}",
        "execution_providers": pipeline.execution_providers,
        "size": f"{args.width}x{args.height}",
        "workers": args.workers,
        "runs": args.runs,
        "target_ratio": 0.85,
        "clips": results,
    }
    print(json.dumps(report, indent=2))
    for clip in results:
        print(
            f"pipeline: {clip['frames']} frames {report['size']}, {report['models']}: "
            f"{clip['end_to_end_fps']} fps end-to-end vs {clip['model_only_fps']} fps model-only "
            f"(ratio {clip['ratio']}, target >= 0.85), {args.workers} workers, {pipeline.execution_providers[0]}"
        )


if __name__ == "__main__":
    main()
