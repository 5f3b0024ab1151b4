"""Manifest, verification before sessions, routing by signature, execution providers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from facefleet.agent.models.manifest import ModelRole, load_manifest
from facefleet.agent.models.routing import ModelSignature, TensorSignature, UnroutableModel, route_model
from facefleet.agent.models.sessions import resolve_providers
from facefleet.agent.models.tiny import TinyModelSet
from facefleet.agent.models.verify import file_sha256, read_signature, verify_model
from facefleet.agent.pipeline.errors import ModelVerificationFailed, ProviderUnavailable
from facefleet.agent.pipeline.runner import SwapPipeline

REPO = Path(__file__).resolve().parents[2]


def test_tiny_models_verify_and_route_to_their_roles(tiny_models: TinyModelSet) -> None:
    manifest = load_manifest(tiny_models.models_dir)
    roles = {}
    for entry in manifest.model:
        verified = verify_model(tiny_models.models_dir, entry)
        roles[entry.name] = route_model(verified.signature)
    assert roles == {
        "det_tiny": ModelRole.DETECTOR,
        "arcface_tiny": ModelRole.RECOGNIZER,
        "inswapper_tiny": ModelRole.SWAPPER,
        "gfpgan_tiny": ModelRole.ENHANCER,
    }
    detector = read_signature(tiny_models.files["det_tiny"])
    assert len(detector.outputs) == 9
    swapper = read_signature(tiny_models.files["inswapper_tiny"])
    assert [t.name for t in swapper.inputs] == ["target", "source"]
    assert swapper.last_initializer_shape == (512, 512)


def test_tampered_model_names_expected_and_actual_sha256(models_copy: Path) -> None:
    path = models_copy / "inswapper_tiny.onnx"
    expected = file_sha256(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = file_sha256(path)
    with pytest.raises(ModelVerificationFailed) as caught:
        SwapPipeline.load(models_copy)
    message = caught.value.message
    assert f"expected {expected}" in message and f"actual {actual}" in message
    assert caught.value.reason_code == "MODEL_VERIFICATION_FAILED"


def test_signature_mismatch_is_refused_before_a_session(models_copy: Path) -> None:
    manifest = models_copy / "manifest.toml"
    text = manifest.read_text().replace("shape = [1, 512] }]\noutputs", "shape = [1, 256] }]\noutputs", 1)
    manifest.write_text(text)
    with pytest.raises(ModelVerificationFailed, match=r"inputs do not match the manifest.*expected .*256"):
        SwapPipeline.load(models_copy)


def test_role_that_disagrees_with_the_signature_is_refused(models_copy: Path) -> None:
    manifest = models_copy / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('role = "enhancer"', 'role = "recognizer"'))
    with pytest.raises(ModelVerificationFailed, match="signature is that of a enhancer"):
        SwapPipeline.load(models_copy)


def test_missing_model_file_says_where_to_put_it(models_copy: Path) -> None:
    (models_copy / "det_tiny.onnx").unlink()
    with pytest.raises(ModelVerificationFailed, match=r"det_tiny.onnx is missing"):
        SwapPipeline.load(models_copy)


def test_routing_refuses_landmark_models() -> None:
    landmark = ModelSignature((TensorSignature("data", (1, 3, 192, 192)),), (TensorSignature("fc1", (1, 212)),), None)
    with pytest.raises(UnroutableModel, match="landmark"):
        route_model(landmark)


def test_requested_missing_provider_names_the_fix() -> None:
    with pytest.raises(ProviderUnavailable) as caught:
        resolve_providers(["cuda"], available=["CPUExecutionProvider"])
    assert "onnxruntime-gpu" in caught.value.message and "facefleet[gpu]" in caught.value.message
    assert caught.value.reason_code == "PROVIDER_UNAVAILABLE"


def test_provider_order_prefers_tensorrt_then_cuda_then_cpu() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert resolve_providers(None, available) == available[::-1]
    assert resolve_providers(["cuda"], available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_pipeline_load_with_missing_provider_fails_clearly(tiny_models: TinyModelSet) -> None:
    with pytest.raises(ProviderUnavailable, match="tensorrt"):
        SwapPipeline.load(tiny_models.models_dir, providers=["tensorrt"])


def test_shipped_manifest_parses_and_activates_no_placeholder(tmp_path: Path) -> None:
    shipped = REPO / "models" / "manifest.toml"
    data = tomllib.loads(shipped.read_text())
    assert data.get("model", []) == []  # real entries are documented but commented out
    text = shipped.read_text()
    for name in ("inswapper_128.onnx", "det_10g.onnx", "w600k_r50.onnx", "GFPGANv1.4.onnx"):
        assert name in text
    # Uncommenting an entry without a real hash fails verification with a clear message.
    uncommented = "\n".join(re.sub(r"^# ?", "", line) for line in text.splitlines() if line.startswith("# "))
    block = uncommented[uncommented.index("[[model]]") :]
    (tmp_path / "manifest.toml").write_text(block)
    (tmp_path / "inswapper_128.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelVerificationFailed, match="sha256"):
        SwapPipeline.load(tmp_path)
