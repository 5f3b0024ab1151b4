"""The agent driving the real swap pipeline with the tiny ONNX models (agent.models.tiny)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from facefleet.agent.models.tiny import draw_synthetic_face, write_tiny_models
from facefleet.agent.pipeline.runner import SwapJob, SwapPipeline
from facefleet.rpc_errors import reason_of
from facefleet.v1 import agent_pb2, types_pb2
from tests.pipeline.conftest import SOURCE_LOOK, make_test_video, requires_ffmpeg


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("agent-models"), seed=7).models_dir


def write_faces(data: Path) -> tuple[Path, Path]:
    data.mkdir(parents=True, exist_ok=True)
    source = np.full((120, 160, 3), 200, np.uint8)
    draw_synthetic_face(source, (80.0, 60.0), **SOURCE_LOOK)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    target = cv2.resize(
        rng.integers(40, 120, (16, 21, 3)).astype(np.uint8), (160, 120), interpolation=cv2.INTER_NEAREST
    )
    draw_synthetic_face(target, (70.0, 55.0))
    cv2.imwrite(str(data / "source.png"), source)
    cv2.imwrite(str(data / "target.png"), target)
    return data / "source.png", data / "target.png"


def test_image_task_with_the_onnx_engine(make_agent, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pipeline=SwapPipeline.load(tiny_models_dir, None), job_factory=SwapJob)
    source, target = write_faces(env.data)
    description = env.stub.Describe(agent_pb2.DescribeRequest())
    assert description.engine == "onnx" and list(description.execution_providers) == ["CPUExecutionProvider"]
    assert {m.role for m in description.models if m.verified} >= {"detector", "recognizer", "swapper"}
    output = env.data / "out" / "swapped.png"
    task = env.task("t-real", source_uri=source.as_uri(), target_uri=target.as_uri(), output_uri=output.as_uri())
    final = env.run(task)[-1]
    assert final.state == types_pb2.TASK_STATE_SUCCEEDED, final.error
    assert final.engine == "onnx" and final.quality.faces_swapped == 1
    assert 0.0 < final.quality.id_similarity_mean <= 1.0
    swapped, original = cv2.imread(str(output)), cv2.imread(str(target))
    assert swapped is not None and original is not None
    assert swapped.shape == original.shape and not np.array_equal(swapped, original)
    assert list((env.work_dir / "tasks").iterdir()) == []


def test_quality_gate_fails_the_task_with_its_figures_and_counts_it(make_agent, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    env = make_agent(pipeline=SwapPipeline.load(tiny_models_dir, None), job_factory=SwapJob)
    source, target = write_faces(env.data)
    labels = {"engine": "onnx"}
    failures_before = REGISTRY.get_sample_value("facefleet_agent_quality_gate_failures_total", labels) or 0.0
    task = env.task(
        "t-gate",
        source_uri=source.as_uri(),
        target_uri=target.as_uri(),
        output_uri=(env.data / "out" / "gated.png").as_uri(),
        options=types_pb2.PipelineOptions(min_id_similarity=0.99),
    )
    final = env.run(task)[-1]
    assert final.state == types_pb2.TASK_STATE_FAILED
    assert final.error.reason == types_pb2.QUALITY_BELOW_THRESHOLD
    assert "ID similarity to the source: min" in final.error.message and "required 0.99" in final.error.message
    assert REGISTRY.get_sample_value("facefleet_agent_quality_gate_failures_total", labels) == failures_before + 1
    assert (REGISTRY.get_sample_value("facefleet_agent_id_similarity_count", labels) or 0) >= 1


def test_tampered_model_is_a_clear_refusal_and_the_agent_keeps_serving(tmp_path: Path, tiny_models_dir: Path) -> None:
    from facefleet.agent.server import serve_agent
    from facefleet.config import AgentConfig

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    swapper = models / "inswapper_tiny.onnx"
    data = bytearray(swapper.read_bytes())
    data[-10] ^= 0xFF
    swapper.write_bytes(bytes(data))
    config = AgentConfig(
        listen="127.0.0.1:0",
        metrics_port=0,
        models_dir=models,
        work_dir=tmp_path / "work",
        checkpoint_root=tmp_path / "ck",
        allowed_roots=[tmp_path / "data"],
    )
    handle = serve_agent(config, None, job_factory=SwapJob)  # loads the real pipeline from models_dir
    try:
        source, target = write_faces(tmp_path / "data")
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            from facefleet.v1 import agent_pb2_grpc

            stub = agent_pb2_grpc.AgentStub(channel)
            task = types_pb2.Task(
                id="t-tampered",
                source_uri=source.as_uri(),
                target_uri=target.as_uri(),
                output_uri=(tmp_path / "data" / "o.png").as_uri(),
            )
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.RunTask(agent_pb2.RunTaskRequest(task=task)))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(caught.value) == "MODEL_VERIFICATION_FAILED"
            assert "inswapper_tiny" in str(caught.value.details()) and "sha256 mismatch" in str(caught.value.details())
            description = stub.Describe(agent_pb2.DescribeRequest())  # still serving
            assert description.engine.startswith("unavailable:") and "sha256 mismatch" in description.engine
        assert handle.runtime.heartbeat_request().healthy is False
    finally:
        handle.stop(0)


@requires_ffmpeg
def test_truncated_video_fails_clearly_and_the_agent_keeps_serving(make_agent, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pipeline=SwapPipeline.load(tiny_models_dir, None), job_factory=SwapJob)
    source, target = write_faces(env.data)
    video = make_test_video(env.data, frames=12)
    truncated = env.data / "truncated.mp4"
    truncated.write_bytes(video.path.read_bytes()[: video.path.stat().st_size // 3])
    task = env.task(
        "t-trunc",
        source_uri=source.as_uri(),
        target_uri=truncated.as_uri(),
        output_uri=(env.data / "out" / "t.mp4").as_uri(),
    )
    final = env.run(task)[-1]
    assert final.state == types_pb2.TASK_STATE_FAILED
    assert final.error.reason == types_pb2.INPUT_REJECTED, final.error
    assert "truncated.mp4" in final.error.message
    ok = env.task(
        "t-after",
        source_uri=source.as_uri(),
        target_uri=target.as_uri(),
        output_uri=(env.data / "out" / "after.png").as_uri(),
    )
    assert env.run(ok)[-1].state == types_pb2.TASK_STATE_SUCCEEDED


@requires_ffmpeg
def test_video_preempted_on_one_agent_resumes_on_another(make_agent, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    first = make_agent(pipeline=SwapPipeline.load(tiny_models_dir, None, workers=1), job_factory=SwapJob, name="a1")
    second = make_agent(pipeline=SwapPipeline.load(tiny_models_dir, None), job_factory=SwapJob, name="a2")
    source, _ = write_faces(first.data)
    video = make_test_video(first.data, frames=96)
    interval = 12
    output = first.data / "out" / "moved.mp4"
    task = first.task(
        "t-move",
        frames=video.frames,
        source_uri=source.as_uri(),
        target_uri=video.path.as_uri(),
        output_uri=output.as_uri(),
        options=types_pb2.PipelineOptions(checkpoint_every_frames=interval),
    )
    seen: list[types_pb2.Progress] = []
    for progress in first.stub.RunTask(agent_pb2.RunTaskRequest(task=task), timeout=120):
        seen.append(progress)
        if progress.checkpoint_frame >= interval and not first.handle.runtime.preempting:
            first.handle.runtime.notice_preemption()
    stopped = seen[-1]
    assert stopped.state == types_pb2.TASK_STATE_PREEMPTED, stopped
    assert interval <= stopped.checkpoint_frame < video.frames
    assert stopped.checkpoint_frame % interval == 0
    resumed = list(
        second.stub.RunTask(
            agent_pb2.RunTaskRequest(
                task=task,
                attempt=1,
                resume_from_frame=stopped.checkpoint_frame,
                checkpoint_uri=stopped.checkpoint_uri,
            ),
            timeout=120,
        )
    )
    final = resumed[-1]
    assert final.state == types_pb2.TASK_STATE_SUCCEEDED, final.error
    assert final.frames_done == video.frames
    first_running = [
        p.frames_done for p in resumed if p.state == types_pb2.TASK_STATE_RUNNING and p.stage != "accepted"
    ]
    # the second agent started at the checkpoint: at most one interval of the first agent's work is redone
    assert min(first_running) > stopped.checkpoint_frame
    assert min(first_running) - stopped.checkpoint_frame <= interval
    assert stopped.frames_done - stopped.checkpoint_frame <= interval
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            str(output),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(probe.stdout.strip()) == video.frames
