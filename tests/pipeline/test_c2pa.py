"""C2PA manifests on swapped outputs, signed with the demo PKI's c2pa-signer and read back by c2pa.Reader."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import c2pa
import cv2
import pytest

from facefleet.agent.models.tiny import TinyModelSet
from facefleet.agent.pipeline.provenance import (
    FACE_SWAP_SOURCE_TYPE,
    FACEFLEET_ASSERTION,
    C2paSigningKey,
    ProvenanceSigningFailed,
    read_c2pa_label,
    read_image_label,
)
from facefleet.agent.pipeline.runner import SwapJob, SwapPipeline, SwapResult
from facefleet.security.certs import init_demo_pki

from .conftest import GeneratedVideo, Scene

MIME = {".jpg": "image/jpeg", ".mp4": "video/mp4"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_demo_pki(directory)
    return directory


@pytest.fixture(scope="module")
def signing_key(pki: Path) -> C2paSigningKey:
    return C2paSigningKey.load(pki / "c2pa-signer.pem", pki / "c2pa-signer-key.pem")


@pytest.fixture(scope="module")
def signing_pipeline(tiny_models: TinyModelSet, signing_key: C2paSigningKey) -> SwapPipeline:
    return SwapPipeline.load(tiny_models.models_dir, workers=2, provenance_signer=signing_key)


def _run(pipeline: SwapPipeline, tmp_path: Path, source: Path, target: Path, output: str) -> SwapResult:
    job = SwapJob(
        task_id=f"t-c2pa-{Path(output).stem}",
        source_path=source,
        target_path=target,
        output_path=tmp_path / output,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every_frames=12,
    )
    return pipeline.run(job, lambda _update: None, threading.Event())


def _read(path: Path) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    with path.open("rb") as stream, c2pa.Reader(MIME[path.suffix], stream) as reader:
        manifest = reader.get_active_manifest()
        assert manifest is not None
        return manifest, reader.get_validation_state(), reader.get_validation_results() or {}


def _codes(results: dict[str, Any], kind: str) -> set[str]:
    return {entry["code"] for entry in results.get("activeManifest", {}).get(kind, [])}


def _assert_signed_face_swap(result: SwapResult, task_id: str) -> dict[str, Any]:
    manifest, state, results = _read(result.output_path)
    assert state == "Valid"  # signature and content hashes intact; the demo CA is just not on a trust list
    assert {"claimSignature.validated"} <= _codes(results, "success")
    assert _codes(results, "failure") <= {"signingCredential.untrusted"}
    assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
    actions = assertions["c2pa.actions.v2"]["actions"]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == FACE_SWAP_SOURCE_TYPE
    assert FACE_SWAP_SOURCE_TYPE.endswith("/compositeWithTrainedAlgorithmicMedia")
    swap = assertions[FACEFLEET_ASSERTION]
    assert swap["task_id"] == task_id and swap["engine"] == result.engine
    assert swap["models"] and all(len(m["sha256"]) == 64 for m in swap["models"])
    assert manifest["claim_generator_info"][0]["name"] == "facefleet"
    assert manifest["signature_info"]["common_name"] == "c2pa-signer"
    assert [i["relationship"] for i in manifest["ingredients"]] == ["parentOf"]
    assert "thumbnail" not in manifest["ingredients"][0]  # the original face is not embedded
    assert result.sidecar_path is not None
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["c2pa"] == "signed" and sidecar["c2pa_manifest"] == manifest["label"]
    return manifest


def test_swapped_jpeg_carries_a_valid_c2pa_manifest_and_breaks_when_a_byte_flips(
    signing_pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    target = tmp_path / "target.jpg"
    cv2.imwrite(str(target), target_scene.image)
    result = _run(signing_pipeline, tmp_path, source_scene.path, target, "out.jpg")
    _assert_signed_face_swap(result, "t-c2pa-out")
    assert read_image_label(result.output_path) is not None  # the plain label survives signing

    data = bytearray(result.output_path.read_bytes())
    data[-20] ^= 0xFF  # inside the entropy-coded scan, just before EOI: pixels, not the manifest
    tampered = tmp_path / "tampered.jpg"
    tampered.write_bytes(bytes(data))
    _manifest, state, results = _read(tampered)
    assert state == "Invalid"
    assert "assertion.dataHash.mismatch" in _codes(results, "failure")


def test_swapped_mp4_carries_a_valid_c2pa_manifest(
    signing_pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, test_video: GeneratedVideo
) -> None:
    result = _run(signing_pipeline, tmp_path, source_scene.path, test_video.path, "out.mp4")
    manifest = _assert_signed_face_swap(result, "t-c2pa-out")
    assert manifest["ingredients"][0]["format"] == "video/mp4"
    assert result.frames == test_video.frames


def test_without_a_key_outputs_carry_no_manifest_and_the_sidecar_says_why(
    tiny_models: TinyModelSet, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    pipeline = SwapPipeline.load(tiny_models.models_dir)
    result = _run(pipeline, tmp_path, source_scene.path, target_scene.path, "out.jpg")
    assert read_c2pa_label(result.output_path) is None
    assert result.sidecar_path is not None
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["c2pa"].startswith("not signed") and "c2pa_manifest" not in sidecar


def test_unusable_key_material_is_a_clear_error(pki: Path, tmp_path: Path) -> None:
    cert, key = pki / "c2pa-signer.pem", pki / "c2pa-signer-key.pem"
    with pytest.raises(ProvenanceSigningFailed, match=r"missing-cert\.pem"):
        C2paSigningKey.load(tmp_path / "missing-cert.pem", key)
    with pytest.raises(ProvenanceSigningFailed, match=r"missing-key\.pem.*certs init"):
        C2paSigningKey.load(cert, tmp_path / "missing-key.pem")
    with pytest.raises(ProvenanceSigningFailed, match=r"does not belong to the first certificate"):
        C2paSigningKey.load(cert, pki / "agent-key.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ProvenanceSigningFailed, match=r"garbage\.pem is not an unencrypted PEM private key"):
        C2paSigningKey.load(cert, garbage)
    with pytest.raises(ProvenanceSigningFailed, match=r"c2pa_key \(--c2pa-key\) is not set"):
        C2paSigningKey.from_config(cert, None)
    assert C2paSigningKey.from_config(None, None) is None


def test_signing_configured_without_c2pa_python_fails_at_load_with_the_install_command(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("facefleet.agent.pipeline.provenance.c2pa_available", lambda: False)
    with pytest.raises(ProvenanceSigningFailed, match=r"pip install 'facefleet\[provenance\]'.*unset agent\.c2pa_cert"):
        C2paSigningKey.load(pki / "c2pa-signer.pem", pki / "c2pa-signer-key.pem")


def test_unsignable_output_type_fails_the_task_instead_of_writing_it_unsigned(
    signing_pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    target = tmp_path / "target.bmp"
    cv2.imwrite(str(target), target_scene.image)
    with pytest.raises(ProvenanceSigningFailed, match=r"target\.bmp.*does not support '\.bmp'"):
        _run(signing_pipeline, tmp_path, source_scene.path, target, "out.png")
    assert not (tmp_path / "out.png").exists()


def test_a_signing_failure_removes_the_unsigned_output(
    tiny_models: TinyModelSet, pki: Path, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    # a valid pair whose cert lacks the C2PA signing usages: c2pa refuses it at signing time
    pipeline = SwapPipeline.load(
        tiny_models.models_dir, provenance_signer=C2paSigningKey.load(pki / "admin.pem", pki / "admin-key.pem")
    )
    with pytest.raises(ProvenanceSigningFailed, match=r"C2PA signing of .*out\.png with .*admin\.pem failed"):
        _run(pipeline, tmp_path, source_scene.path, target_scene.path, "out.png")
    assert not (tmp_path / "out.png").exists()
