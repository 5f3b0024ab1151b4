"""Video jobs: frame count and audio kept, only the face changes, checkpoints survive a move."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from facefleet.agent.models.tiny import TinyModelSet
from facefleet.agent.pipeline.errors import Cancelled, InputRejected
from facefleet.agent.pipeline.media import probe_video, read_frames
from facefleet.agent.pipeline.runner import ProgressUpdate, SwapJob, SwapPipeline

from .conftest import GeneratedVideo, Scene, requires_ffmpeg

pytestmark = [pytest.mark.ffmpeg, requires_ffmpeg]


@pytest.fixture(scope="module")
def pipeline(tiny_models: TinyModelSet) -> SwapPipeline:
    return SwapPipeline.load(tiny_models.models_dir, workers=2)


def _job(tmp_path: Path, source: Path, target: Path, checkpoint_dir: Path, every: int = 12) -> SwapJob:
    return SwapJob(
        task_id="t-vid",
        source_path=source,
        target_path=target,
        output_path=tmp_path / "out.mp4",
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_frames=every,
    )


def _comment(path: Path) -> str:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format_tags=comment", "-of", "json", str(path)],
        capture_output=True,
        check=True,
    )
    return str(json.loads(out.stdout)["format"].get("tags", {}).get("comment", ""))


def test_video_swap_keeps_frames_and_audio_and_changes_only_the_face(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, test_video: GeneratedVideo
) -> None:
    updates: list[ProgressUpdate] = []
    checkpoints = tmp_path / "ckpt"
    result = pipeline.run(
        _job(tmp_path, source_scene.path, test_video.path, checkpoints), updates.append, threading.Event()
    )
    info = probe_video(result.output_path)
    assert result.frames == test_video.frames == info.frames
    assert info.has_audio
    assert result.quality.faces_swapped == test_video.frames
    assert result.quality.id_similarity_min is not None and result.quality.id_similarity_mean is not None
    assert result.quality.id_similarity_min <= result.quality.id_similarity_mean
    assert _comment(result.output_path).startswith("AI-generated")
    assert [u.checkpoint_frame for u in updates if u.stage == "checkpoint"] == [12, 24, 36]
    assert updates[-1].frames_done == test_video.frames and updates[-1].fps > 0
    assert not list(checkpoints.glob("seg_*")), "segments are deleted after success"

    original = list(read_frames(test_video.path, probe_video(test_video.path)))
    swapped = list(read_frames(result.output_path, info))
    x1, y1, x2, y2 = test_video.face_box
    mx, my = (x2 - x1) // 4, (y2 - y1) // 4
    outside = np.ones(original[0].shape[:2], bool)
    outside[y1 - my : y2 + my, x1 - mx : x2 + mx] = False
    for before, after in zip(original, swapped, strict=True):
        diff = np.abs(before.astype(int) - after.astype(int)).sum(axis=2)
        assert diff[y1:y2, x1:x2].mean() > 20
        assert diff[outside].mean() < 10  # re-encoding noise only (sum of 3 channels)


@pytest.mark.slow
def test_interrupted_video_resumes_on_a_second_agent_redoing_at_most_one_interval(
    tiny_models: TinyModelSet, tmp_path: Path, source_scene: Scene, test_video: GeneratedVideo
) -> None:
    every = 8
    first_agent = SwapPipeline.load(tiny_models.models_dir, workers=2)
    checkpoints = tmp_path / "agent1-ckpt"
    cancel = threading.Event()
    seen: list[ProgressUpdate] = []

    def stop_half_way(update: ProgressUpdate) -> None:
        seen.append(update)
        if update.frames_done >= test_video.frames // 2 + 3:  # part-way into an interval
            cancel.set()

    with pytest.raises(Cancelled) as caught:
        first_agent.run(_job(tmp_path, source_scene.path, test_video.path, checkpoints, every), stop_half_way, cancel)
    interrupted_at = max(u.frames_done for u in seen)
    assert caught.value.checkpoint_frame == 16 and caught.value.reason_code == "CANCELLED"
    assert not list(checkpoints.glob("*.partial")), "an unfinished segment is never left behind"

    # "Move" the task: a second agent gets a copy of the checkpoint directory.
    moved = tmp_path / "agent2-ckpt"
    shutil.copytree(checkpoints, moved)
    second_agent = SwapPipeline.load(tiny_models.models_dir, workers=2)
    result = second_agent.run(
        _job(tmp_path, source_scene.path, test_video.path, moved, every), lambda u: None, threading.Event()
    )
    assert result.frames == test_video.frames == probe_video(result.output_path).frames
    assert result.frames_processed == test_video.frames - caught.value.checkpoint_frame
    redone = result.frames_processed - (test_video.frames - interrupted_at)
    assert 0 <= redone <= every
    assert result.quality.faces_swapped == test_video.frames  # quality covers both agents' frames


def test_checkpoint_of_a_different_job_is_not_reused(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, test_video: GeneratedVideo
) -> None:
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "checkpoint.json").write_text(json.dumps({"fingerprint": "other", "next_frame": 24, "segments": []}))
    result = pipeline.run(
        _job(tmp_path, source_scene.path, test_video.path, checkpoints, every=36), lambda u: None, threading.Event()
    )
    assert result.frames_processed == test_video.frames


def test_truncated_video_is_rejected_clearly(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, test_video: GeneratedVideo
) -> None:
    truncated = tmp_path / "truncated.mp4"
    data = test_video.path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputRejected, match=r"truncated.mp4 is corrupt or truncated"):
        pipeline.run(_job(tmp_path, source_scene.path, truncated, tmp_path / "ckpt"), lambda u: None, threading.Event())
    assert not (tmp_path / "out.mp4").exists()
