"""Task inputs and outputs by URI: `file://` under allowed roots only, `s3://bucket/key` via boto3.

The checks that need no I/O beyond `stat` (scheme, containment, size) run before the agent accepts a
task, so a bad URI is refused with a gRPC status; downloads and uploads run in the task's thread.
Every refusal is an `InputRejected` naming the field, what was wrong and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from facefleet.v1 import types_pb2

INPUT_REJECTED = types_pb2.INPUT_REJECTED

# Leading bytes of the media the pipeline can decode; anything else is refused before work starts.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"BM", "bmp"),
    (0, b"GIF8", "gif"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (4, b"ftyp", "mp4/mov"),
    (0, b"\x1a\x45\xdf\xa3", "mkv/webm"),
    (0, b"\x00\x00\x01\xba", "mpeg-ps"),
)
_RIFF_KINDS = {b"WEBP": "webp", b"AVI ": "avi"}


class InputRejected(Exception):
    """A task input or output URI the agent will not use; reason INPUT_REJECTED."""

    reason_code = INPUT_REJECTED

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


@dataclass(frozen=True)
class ParsedUri:
    scheme: str  # "file" | "s3"
    path: str  # absolute local path for file, key for s3
    bucket: str = ""


def parse_uri(uri: str, field: str) -> ParsedUri:
    """Split `uri` into scheme/bucket/path; only `file://` and `s3://` are accepted."""
    if not uri:
        raise InputRejected(field, "is empty; give a file:// or s3:// URI")
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InputRejected(
                field, f"file URI {uri!r} names host {parts.netloc!r}; use file:///absolute/path on this agent"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InputRejected(field, f"file URI {uri!r} is not absolute; use file:///absolute/path")
        if "\x00" in path:
            raise InputRejected(field, f"file URI {uri!r} contains a NUL byte")
        return ParsedUri("file", path)
    if parts.scheme == "s3":
        key = unquote(parts.path).lstrip("/")
        if not parts.netloc or not key:
            raise InputRejected(field, f"S3 URI {uri!r} needs a bucket and a key: s3://bucket/key")
        return ParsedUri("s3", key, bucket=parts.netloc)
    raise InputRejected(field, f"unsupported URI scheme {parts.scheme or '(none)'!r} in {uri!r}; use file:// or s3://")


def contained_path(path: str, roots: Sequence[Path], field: str) -> Path:
    """`path` with symlinks and `..` resolved, provided it lies under one of `roots` (also resolved)."""
    resolved = Path(os.path.realpath(path))
    resolved_roots = [Path(os.path.realpath(root)) for root in roots]
    for root in resolved_roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    listing = ", ".join(str(root) for root in resolved_roots) or "(none configured)"
    raise InputRejected(
        field,
        f"{path} resolves to {resolved}, which is outside the agent's allowed roots [{listing}]; "
        "put the file under one of them or add a root with --allowed-root",
    )


def sniff_media_kind(head: bytes) -> str | None:
    """The container kind recognised from the first bytes of a file, or None."""
    if head[:4] == b"RIFF" and head[8:12] in _RIFF_KINDS:
        return _RIFF_KINDS[head[8:12]]
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return None


def check_media(path: Path, field: str) -> str:
    """Refuse a file that is not an image or video container the pipeline reads."""
    with path.open("rb") as handle:
        head = handle.read(16)
    kind = sniff_media_kind(head)
    if kind is None:
        raise InputRejected(
            field,
            f"{path} is not an image or video (unrecognised header {head[:8].hex()}); "
            "give a JPEG/PNG/BMP/WebP/TIFF image or an MP4/MOV/MKV/WebM/AVI video",
        )
    return kind


S3ClientFactory = Callable[[], Any]


def default_s3_client() -> Any:
    """A boto3 S3 client; boto3 itself honours AWS_ENDPOINT_URL and the usual credential chain."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


class InputResolver:
    """Resolves a task's URIs to local paths, within the allowed roots and the size limit."""

    def __init__(
        self,
        allowed_roots: Sequence[Path],
        max_input_bytes: int,
        s3_client_factory: S3ClientFactory = default_s3_client,
    ) -> None:
        self.allowed_roots = [Path(root) for root in allowed_roots]
        self.max_input_bytes = max_input_bytes
        self._s3_client_factory = s3_client_factory
        self._s3: Any = None

    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = self._s3_client_factory()
        return self._s3

    def _check_size(self, size: int, where: str, field: str) -> None:
        if size > self.max_input_bytes:
            raise InputRejected(
                field,
                f"{where} is {size} bytes, over the agent's limit of {self.max_input_bytes} bytes "
                "(agent.max_input_bytes); shrink the input or raise the limit",
            )

    def precheck_input(self, uri: str, field: str) -> None:
        """Cheap admission checks: scheme, containment, existence, size, media type (file:// only)."""
        parsed = parse_uri(uri, field)
        if parsed.scheme == "file":
            self._local_input(parsed, field)

    def precheck_output(self, uri: str, field: str) -> None:
        parsed = parse_uri(uri, field)
        if parsed.scheme == "file":
            contained_path(parsed.path, self.allowed_roots, field)

    def _local_input(self, parsed: ParsedUri, field: str) -> Path:
        path = contained_path(parsed.path, self.allowed_roots, field)
        if not path.is_file():
            raise InputRejected(field, f"{path} does not exist or is not a regular file")
        self._check_size(path.stat().st_size, str(path), field)
        check_media(path, field)
        return path

    def fetch_input(self, uri: str, field: str, temp_dir: Path) -> Path:
        """A local path for the input: the file itself for file://, a download into `temp_dir` for s3://."""
        parsed = parse_uri(uri, field)
        if parsed.scheme == "file":
            return self._local_input(parsed, field)
        client = self._client()
        try:
            head = client.head_object(Bucket=parsed.bucket, Key=parsed.path)
        except Exception as error:  # botocore ClientError / EndpointConnectionError
            raise InputRejected(
                field, f"cannot read {uri}: {error}; check the key and the agent's AWS access"
            ) from error
        self._check_size(int(head.get("ContentLength", 0)), uri, field)
        suffix = Path(parsed.path).suffix[:16]
        destination = temp_dir / f"{field.replace('.', '_')}{suffix}"
        try:
            client.download_file(parsed.bucket, parsed.path, str(destination))
        except Exception as error:
            raise InputRejected(field, f"download of {uri} failed: {error}") from error
        check_media(destination, field)
        return destination

    def output_path(self, uri: str, field: str, temp_dir: Path) -> Path:
        """Where the pipeline writes the output: the final path for file://, a temp file for s3://."""
        parsed = parse_uri(uri, field)
        if parsed.scheme == "file":
            path = contained_path(parsed.path, self.allowed_roots, field)
            path.parent.mkdir(parents=True, exist_ok=True)
            return path
        return temp_dir / f"output{Path(parsed.path).suffix[:16]}"

    def publish_output(self, uri: str, field: str, local_path: Path) -> None:
        """Upload the output for s3://; a file:// output is already in place."""
        parsed = parse_uri(uri, field)
        if parsed.scheme != "s3":
            return
        try:
            self._client().upload_file(str(local_path), parsed.bucket, parsed.path)
        except Exception as error:
            raise InputRejected(field, f"upload of the output to {uri} failed: {error}") from error
