"""URI resolution: allowed roots, traversal, media sniffing, size limit, S3 through moto."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from facefleet.agent.inputs import InputRejected, InputResolver, contained_path, parse_uri, sniff_media_kind
from tests.agent.conftest import write_image


def test_parse_uri_accepts_file_and_s3_only() -> None:
    assert parse_uri("file:///data/a%20b.png", "f").path == "/data/a b.png"
    assert parse_uri("file://localhost/data/a.png", "f").path == "/data/a.png"
    parsed = parse_uri("s3://bucket/dir/key.mp4", "f")
    assert (parsed.scheme, parsed.bucket, parsed.path) == ("s3", "bucket", "dir/key.mp4")
    for bad, words in [
        ("", "is empty"),
        ("http://x/y.png", "unsupported URI scheme 'http'"),
        ("/data/a.png", r"unsupported URI scheme '\(none\)'"),
        ("file://otherhost/a.png", "names host 'otherhost'"),
        ("s3://bucket", "needs a bucket and a key"),
        ("file:///a%00b", "NUL"),
    ]:
        with pytest.raises(InputRejected, match=words) as caught:
            parse_uri(bad, "task.source_uri")
        assert caught.value.field == "task.source_uri"
        assert caught.value.message.startswith("task.source_uri: ")


def test_contained_path_resolves_dotdot_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "sub" / "inside.png").write_bytes(b"x")
    assert contained_path(str(root / "sub" / ".." / "sub" / "inside.png"), [root], "f") == root / "sub" / "inside.png"
    for escaping in (f"{root}/sub/../../outside.png", str(root / "link.png"), f"{root}-sibling/x.png"):
        with pytest.raises(InputRejected, match=r"outside the agent's allowed roots \[") as caught:
            contained_path(escaping, [root, tmp_path / "other"], "task.target_uri")
        assert str(root) in caught.value.message and str(tmp_path / "other") in caught.value.message
    with pytest.raises(InputRejected, match=r"\(none configured\)"):
        contained_path(str(root / "sub" / "inside.png"), [], "f")


def test_sniff_media_kind() -> None:
    assert sniff_media_kind(b"\xff\xd8\xff\xe0" + b"\0" * 12) == "jpeg"
    assert sniff_media_kind(b"\x89PNG\r\n\x1a\n" + b"\0" * 8) == "png"
    assert sniff_media_kind(b"\0\0\0\x20ftypisom" + b"\0" * 4) == "mp4/mov"
    assert sniff_media_kind(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_media_kind(b"RIFF\0\0\0\0AVI LIST") == "avi"
    assert sniff_media_kind(b"RIFF\0\0\0\0WAVEfmt ") is None
    assert sniff_media_kind(b"hello world, text") is None
    assert sniff_media_kind(b"") is None


def test_local_files_used_in_place_and_checked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image = write_image(root / "face.png")
    resolver = InputResolver([root], max_input_bytes=image.stat().st_size)
    assert resolver.fetch_input(image.as_uri(), "task.source_uri", tmp_path) == image
    with pytest.raises(InputRejected, match="does not exist"):
        resolver.fetch_input((root / "missing.png").as_uri(), "task.source_uri", tmp_path)
    small = InputResolver([root], max_input_bytes=image.stat().st_size - 1)
    with pytest.raises(InputRejected, match="max_input_bytes"):
        small.precheck_input(image.as_uri(), "task.source_uri")
    out = resolver.output_path((root / "new" / "out.png").as_uri(), "task.output_uri", tmp_path)
    assert out == root / "new" / "out.png" and out.parent.is_dir()


@mock_aws
def test_s3_inputs_download_and_outputs_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="faces")
    image = write_image(tmp_path / "src.png")
    s3.upload_file(str(image), "faces", "in/face.png")
    s3.put_object(Bucket="faces", Key="in/notes.png", Body=b"plain text, not an image")
    resolver = InputResolver([tmp_path / "data"], max_input_bytes=10_000_000)
    temp = tmp_path / "task"
    temp.mkdir()
    local = resolver.fetch_input("s3://faces/in/face.png", "task.source_uri", temp)
    assert local.parent == temp and local.read_bytes() == image.read_bytes()
    with pytest.raises(InputRejected, match="not an image or video"):
        resolver.fetch_input("s3://faces/in/notes.png", "task.target_uri", temp)
    with pytest.raises(InputRejected, match=r"cannot read s3://faces/in/missing\.png"):
        resolver.fetch_input("s3://faces/in/missing.png", "task.target_uri", temp)
    tiny = InputResolver([], max_input_bytes=10)
    with pytest.raises(InputRejected, match="over the agent's limit of 10 bytes"):
        tiny.fetch_input("s3://faces/in/face.png", "task.source_uri", temp)
    output = resolver.output_path("s3://faces/out/result.png", "task.output_uri", temp)
    assert output.parent == temp and output.suffix == ".png"
    output.write_bytes(b"result")
    resolver.publish_output("s3://faces/out/result.png", "task.output_uri", output)
    assert s3.get_object(Bucket="faces", Key="out/result.png")["Body"].read() == b"result"


@mock_aws
def test_agent_runs_a_task_with_s3_inputs_and_output(make_agent, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from facefleet.v1 import types_pb2

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="public-work")
    env = make_agent(trust_zone="cloud", pool="aws-spot")
    source = write_image(env.data / "s.png", 3)
    target = write_image(env.data / "t.png", 4)
    s3.upload_file(str(source), "public-work", "s.png")
    s3.upload_file(str(target), "public-work", "t.png")
    task = env.task(
        "t-s3",
        source_uri="s3://public-work/s.png",
        target_uri="s3://public-work/t.png",
        output_uri="s3://public-work/out/t.png",
    )
    final = env.run(task)[-1]
    assert final.state == types_pb2.TASK_STATE_SUCCEEDED, final.error
    assert s3.get_object(Bucket="public-work", Key="out/t.png")["Body"].read() == target.read_bytes()
    assert list((env.work_dir / "tasks").iterdir()) == []  # downloads deleted
