"""Media edges: image read with limits, video probe/decode/encode/mux through ffmpeg subprocesses.

Frames travel through pipes (raw BGR24), never as files on disk; encoded checkpoint segments are
the only video artefacts written before the final mux.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from facefleet.agent.pipeline.errors import InputRejected, ToolMissing

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
VIDEO_OUTPUT_SUFFIXES = frozenset({".mp4", ".mov", ".mkv"})
STDERR_TAIL = 600


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 2 * 1024**3
    max_pixels: int = 8192 * 8192
    max_frames: int = 200_000


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frame_rate: str  # exact rational as ffmpeg prints it, e.g. "24/1" or "30000/1001"
    frames: int
    has_audio: bool
    audio_codec: str = ""  # ffprobe codec_name of the first audio stream, "" without audio

    @property
    def fps(self) -> float:
        return float(Fraction(self.frame_rate))


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} is not installed on this agent; video jobs need it (Debian: apt-get install ffmpeg)")
    return path


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _check_file(path: Path, what: str, limits: MediaLimits) -> None:
    if not path.is_file():
        raise InputRejected(f"{what} {path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise InputRejected(f"{what} {path} is empty (0 bytes); upload it again")
    if size > limits.max_bytes:
        raise InputRejected(
            f"{what} {path} is {size} bytes, over the {limits.max_bytes}-byte limit; "
            "downscale or split it, or raise agent.max_input_bytes"
        )


def read_image(path: Path, what: str, limits: MediaLimits | None = None) -> np.ndarray:
    """Decode an image to BGR uint8, rejecting missing, oversized, corrupt and non-image files."""
    limits = limits or MediaLimits()
    _check_file(path, what, limits)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputRejected(
            f"{what} {path}: {path.suffix or 'no suffix'} is not a supported image type "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    data = np.frombuffer(path.read_bytes(), np.uint8)
    header_ok, width, height = _image_header_size(data)
    if header_ok and width * height > limits.max_pixels:
        raise InputRejected(f"{what} {path} is {width}x{height}, over the {limits.max_pixels}-pixel limit")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise InputRejected(
            f"{what} {path} could not be decoded: the file is corrupt, truncated or not "
            "really an image; re-export it as PNG or JPEG"
        )
    if image.shape[0] * image.shape[1] > limits.max_pixels:
        raise InputRejected(
            f"{what} {path} is {image.shape[1]}x{image.shape[0]}, over the {limits.max_pixels}-pixel limit"
        )
    return image


def _image_header_size(data: np.ndarray) -> tuple[bool, int, int]:
    """Width/height from a PNG header without decoding (guards against decompression bombs)."""
    raw = data[:24].tobytes()
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        return True, int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    return False, 0, 0


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
        raise InputRejected(f"{what}: ffmpeg failed: {tail}")
    return result


def _ffprobe_streams(path: Path, count_packets: bool) -> list[dict[str, object]]:
    entries = "stream=codec_type,codec_name,width,height,r_frame_rate,nb_frames" + (
        ",nb_read_packets" if count_packets else ""
    )
    cmd = [_binary("ffprobe"), "-v", "error", *(["-count_packets"] if count_packets else [])]
    cmd += ["-show_entries", entries, "-of", "json", str(path)]
    result = subprocess.run(cmd, capture_output=True, check=False)
    errors = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0 or errors:
        raise InputRejected(
            f"target video {path} is corrupt or truncated ({errors[-STDERR_TAIL:] or 'ffprobe failed'}); "
            "re-upload the complete file"
        )
    streams: list[dict[str, object]] = json.loads(result.stdout or b"{}").get("streams", [])
    return streams


def probe_video(path: Path, limits: MediaLimits | None = None) -> VideoInfo:
    """Stream layout and frame count; a truncated or non-video file is `InputRejected`.

    The count comes from the container header (mp4/mov `nb_frames`) when it has one; only containers
    without it (mkv, webm, avi) are scanned packet by packet. Truncation the header cannot show is
    caught when decoding ends early with errors (`read_frames`)."""
    limits = limits or MediaLimits()
    _check_file(path, "target video", limits)
    streams = _ffprobe_streams(path, count_packets=False)
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None:
        raise InputRejected(f"target video {path} has no video stream")
    frames = int(str(video.get("nb_frames") or 0)) if str(video.get("nb_frames", "")).isdigit() else 0
    if frames <= 0:
        scanned = _ffprobe_streams(path, count_packets=True)
        counted = next((s for s in scanned if s.get("codec_type") == "video"), {})
        frames = int(str(counted.get("nb_read_packets") or 0))
    if frames <= 0:
        raise InputRejected(f"target video {path} has no decodable frames")
    if frames > limits.max_frames:
        raise InputRejected(f"target video {path} has {frames} frames, over the {limits.max_frames} limit")
    width, height = int(str(video["width"])), int(str(video["height"]))
    if width * height > limits.max_pixels:
        raise InputRejected(f"target video {path} is {width}x{height}, over the {limits.max_pixels}-pixel limit")
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    return VideoInfo(
        width=width,
        height=height,
        frame_rate=str(video.get("r_frame_rate", "25/1")),
        frames=frames,
        has_audio=audio is not None,
        audio_codec=str(audio.get("codec_name", "")) if audio is not None else "",
    )


def read_frames(path: Path, info: VideoInfo, start_frame: int = 0) -> Iterator[np.ndarray]:
    """Decoded BGR frames from `start_frame` on; a decode failure part-way is `InputRejected`."""
    cmd = [
        _binary("ffmpeg"),
        "-v",
        "error",
        "-i",
        str(path),
        "-map",
        "0:v:0",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "bgr24",
        "-fps_mode",
        "passthrough",
        "-",
    ]
    frame_bytes = info.width * info.height * 3
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    index = 0
    skip = bytearray(frame_bytes)
    try:
        while True:
            # Read straight into the frame's own buffer: no intermediate bytes object, no copy.
            buffer = bytearray(frame_bytes) if index >= start_frame else skip
            if not _read_exactly(process.stdout, buffer):
                break
            if index >= start_frame:
                yield np.frombuffer(buffer, np.uint8).reshape(info.height, info.width, 3)
            index += 1
        code = process.wait()
        tail = process.stderr.read().decode(errors="replace").strip()[-STDERR_TAIL:]
        if code != 0 or (tail and index < info.frames):
            raise InputRejected(
                f"target video {path} is corrupt or truncated: decoding failed at frame {index} of "
                f"{info.frames} ({tail or f'ffmpeg exit {code}'}); re-upload the complete file"
            )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def _read_exactly(stream: IO[bytes], buffer: bytearray) -> bool:
    """Fill `buffer` from `stream`; False at end of stream (a partial last frame is dropped)."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not got:
            return False
        filled += got
    return True


class SegmentEncoder:
    """Encodes frames fed one by one into an H.264 segment (libx264, yuv420p)."""

    def __init__(self, path: Path, info: VideoInfo, crf: int = 18, preset: str = "veryfast", queue_depth: int = 8):
        self.path = path
        cmd = [
            _binary("ffmpeg"),
            "-v",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "bgr24",
            "-s",
            f"{info.width}x{info.height}",
            "-r",
            info.frame_rate,
            "-i",
            "-",
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-c:v",
            "libx264",
            "-preset",
            preset,
            "-crf",
            str(crf),
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            str(path),
        ]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        # A writer thread feeds x264 so the caller never blocks on the pipe while frames are ready.
        self._frames: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=queue_depth)
        self._write_error: BaseException | None = None
        self._writer = threading.Thread(target=self._feed, name=f"encode-{path.name}", daemon=True)
        self._writer.start()

    def _feed(self) -> None:
        assert self.process.stdin is not None
        while (frame := self._frames.get()) is not None:
            if self._write_error is not None:
                continue  # drain so a blocked `write` returns; the error is raised on close
            try:
                self.process.stdin.write(np.ascontiguousarray(frame).data)
            except (BrokenPipeError, OSError, ValueError) as exc:
                self._write_error = exc

    def write(self, frame: np.ndarray) -> None:
        if self._write_error is not None:
            raise InputRejected(
                f"encoding segment {self.path} failed: ffmpeg stopped reading ({self._write_error})",
                reason_code="INTERNAL",
            )
        self._frames.put(frame)

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stderr is not None
        self._frames.put(None)
        self._writer.join()
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        code = self.process.wait()
        errors = self.process.stderr.read().decode(errors="replace")
        self.process.stderr.close()
        if code != 0 or self._write_error is not None:
            raise InputRejected(
                f"encoding segment {self.path} failed: {errors[-STDERR_TAIL:] or self._write_error}",
                reason_code="INTERNAL",
            )

    def abort(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._write_error = self._write_error or BrokenPipeError("aborted")
        while self._writer.is_alive():  # unblock the writer: it drains until it sees the end marker
            try:
                self._frames.put(None, timeout=0.1)
            except queue.Full:
                continue
            self._writer.join(timeout=5)
        for stream in (self.process.stdin, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()
        self.path.unlink(missing_ok=True)


def mux_segments(
    segments: list[Path], original: Path, output: Path, comment: str, work_dir: Path, audio_codec: str = ""
) -> None:
    """Concatenate encoded segments (stream copy) and carry the original audio, if any, as AAC
    (copied untouched when it already is AAC, re-encoded otherwise)."""
    if output.suffix.lower() not in VIDEO_OUTPUT_SUFFIXES:
        raise InputRejected(f"output {output}: a video output must end in {sorted(VIDEO_OUTPUT_SUFFIXES)}")
    listing = work_dir / "segments.txt"
    listing.write_text("".join(f"file '{s.resolve()}'\n" for s in segments), encoding="utf-8")
    cmd = [
        _binary("ffmpeg"),
        "-v",
        "error",
        "-y",
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(listing),
        "-i",
        str(original),
        "-map",
        "0:v:0",
        "-map",
        "1:a?",
        "-c:v",
        "copy",
        "-c:a",
        "copy" if audio_codec == "aac" else "aac",
        "-metadata",
        f"comment={comment}",
        "-movflags",
        "+faststart",
        str(output),
    ]
    _run(cmd, f"muxing {output}")


def count_video_frames(path: Path) -> int:
    return probe_video(path).frames
