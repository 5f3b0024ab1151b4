"""Swap pipeline throughput: end-to-end frames/s vs the model-only inference rate on the same frames.

    .venv/bin/python bench/pipeline.py [--frames 48] [--width 320] [--height 240] [--workers 2]
                                       [--models DIR] [--provider cuda]

Without --models it generates the tiny test models (real insightface signatures, tiny compute), so
the ratio then measures pipeline overhead against very cheap inference: a worst case. Prints one JSON
document and a one-line summary. Target: end_to_end_fps / model_only_fps >= 0.85.
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
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.models.tiny import DETECTOR_SIZE, draw_synthetic_face, write_tiny_models
from agent.pipeline.align import norm_crop
from agent.pipeline.engine import OnnxEngine
from agent.pipeline.media import probe_video, read_frames
from agent.pipeline.runner import ProgressUpdate, SwapJob, SwapPipeline


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


def model_only_seconds(pipeline: SwapPipeline, source: Path, video: Path) -> tuple[float, int]:
    """Detector + swapper + recognizer (quality) inference on every frame, nothing else, one thread."""
    engine = pipeline._loaded.engine
    if not isinstance(engine, OnnxEngine):
        raise SystemExit("model-only rate needs the ONNX engine (verified detector, recognizer, swapper)")
    source_image = cv2.imread(str(source))
    source_face = max(engine.detector.detect(source_image), key=lambda f: f.area)
    latent = engine.swapper.latent(engine.recognizer.embed_face(source_image, source_face))
    frames = list(read_frames(video, probe_video(video)))
    total = 0.0
    for frame in frames:
        started = time.perf_counter()
        faces = engine.detector.detect(frame)
        for face in faces[:1]:
            crop, _ = norm_crop(frame, face.kps, engine.swapper.crop_size)
            engine.swapper.swap_crop(crop, latent)
            engine.recognizer.embed_face(frame, face)
        total += time.perf_counter() - started
    return total, len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--provider", action="append", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="facefleet-bench-") as tmp:
        work = Path(tmp)
        models = args.models or write_tiny_models(work / "models").models_dir
        source, video = make_inputs(work, args.frames, args.width, args.height)
        pipeline = SwapPipeline.load(models, providers=args.provider, workers=args.workers)
        updates: list[ProgressUpdate] = []
        job = SwapJob(
            task_id="bench",
            source_path=source,
            target_path=video,
            output_path=work / "out.mp4",
            checkpoint_dir=work / "ckpt",
            checkpoint_every_frames=max(1, args.frames // 2),
        )
        started = time.perf_counter()
        result = pipeline.run(job, updates.append, threading.Event())
        end_to_end = time.perf_counter() - started
        model_seconds, frames = model_only_seconds(pipeline, source, video)

    e2e_fps = result.frames / end_to_end
    model_fps = frames / model_seconds
    report = {
        "benchmark": "pipeline",
        "engine": result.engine,
        "execution_providers": pipeline.execution_providers,
        "frames": result.frames,
        "size": f"{args.width}x{args.height}",
        "workers": args.workers,
        "end_to_end_seconds": round(end_to_end, 3),
        "end_to_end_fps": round(e2e_fps, 2),
        "model_only_fps": round(model_fps, 2),
        "ratio": round(e2e_fps / model_fps, 3),
        "target_ratio": 0.85,
        "stage_ms_per_frame": {
            k: round(1000 * v / result.frames_processed, 3) for k, v in sorted(result.stage_seconds.items())
        },
        "id_similarity_mean": result.quality.id_similarity_mean,
        "progress_fps_median": round(statistics.median(u.fps for u in updates if u.fps > 0), 2),
    }
    print(json.dumps(report, indent=2))
    print(
        f"pipeline: {report['end_to_end_fps']} fps end-to-end vs {report['model_only_fps']} fps model-only "
        f"(ratio {report['ratio']}, target >= 0.85) on {result.frames} frames {report['size']}, "
        f"{args.workers} workers, {pipeline.execution_providers[0]}"
    )


if __name__ == "__main__":
    main()
