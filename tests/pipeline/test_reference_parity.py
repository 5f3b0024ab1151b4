"""Differential test: facefleet's ONNX engine against insightface's own code, stage by stage.

insightface installs opencv-python next to the product's headless build (two cv2 wheels overwrite
each other), so it never enters the product's venv: the `insightface_python` fixture builds an
isolated venv once (cached under ~/.cache/facefleet, or FACEFLEET_REFERENCE_VENV) with insightface
and the SAME numpy / onnxruntime / OpenCV versions as ours, so any difference is the code's. The
reference side (reference/run_insightface.py) runs SCRFD, face_align, ArcFaceONNX and INSwapper on
the tiny models (real insightface signatures, routed by insightface's model_zoo) and two real
photographs: the astronaut (target) and Grace Hopper (source) shipped in demo_assets.

The tiny detector scores skin colour, so on photographs its scores are small: both sides detect at
the same low threshold, which exercises the letterbox, anchor decoding and NMS all the same.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from facefleet.agent.models.tiny import TinyModelSet
from facefleet.agent.pipeline.align import estimate_norm, norm_crop
from facefleet.agent.pipeline.engine import OnnxEngine, load_engine
from facefleet.agent.pipeline.mask import MaskKind, MaskStage
from facefleet.agent.pipeline.paste import PasteStage
from facefleet.agent.pipeline.stage import FrameState, SwapPatch

INSIGHTFACE_VERSION = "2.1"
DETECTION_THRESHOLD = 1e-4
REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "run_insightface.py"
ASSETS = Path(__file__).resolve().parents[2] / "facefleet" / "demo_assets"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _pins() -> list[str]:
    """The reference venv's requirements: insightface plus our exact numeric stack."""
    return [
        f"insightface=={INSIGHTFACE_VERSION}",
        f"numpy=={version('numpy')}",
        f"onnxruntime=={version('onnxruntime')}",
        f"opencv-python=={version('opencv-python-headless')}",
    ]


@pytest.fixture(scope="session")
def insightface_python() -> Path:
    """Python of the isolated reference venv, created on first use (about 2-3 minutes) and reused."""
    pins = _pins()
    key = hashlib.sha256(" ".join([sys.version, *pins]).encode()).hexdigest()[:12]
    default_root = Path.home() / ".cache" / "facefleet" / f"insightface-{INSIGHTFACE_VERSION}-{key}"
    venv = Path(os.environ.get("FACEFLEET_REFERENCE_VENV", default_root))
    python = venv / "bin" / "python"
    if python.exists():
        return python
    building = venv.with_name(venv.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    install = subprocess.run(
        [str(building / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", *pins],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.fail(f"could not build the insightface reference venv ({' '.join(pins)}):\n{install.stderr[-3000:]}")
    building.rename(venv)  # atomic: a half-built venv is never mistaken for a ready one
    print(f"reference venv built in {time.monotonic() - started:.0f} s: {venv}")
    return python


# A smiling face and a mouth opening step by step (with noise): where a robust fit drops the mouth
# corners, the least-squares fit keeps them, so these landmarks tell the two fits apart.
def _landmark_cases() -> np.ndarray:
    rng = np.random.default_rng(5)
    base = np.array([[180, 200], [260, 198], [220, 250], [190, 300], [250, 300]], np.float32)
    cases = [base]
    for step in range(1, 6):
        moved = base.copy()
        moved[3:, 1] += 6 * step  # the mouth opens...
        moved[3, 0] -= 5 * step  # ...and widens into a smile
        moved[4, 0] += 5 * step
        cases.append(moved + rng.normal(0, 2, (5, 2)).astype(np.float32))
    return np.stack(cases)


class Ours:
    """The same stages through facefleet's engine."""

    def __init__(self, engine: OnnxEngine):
        self.engine = engine
        engine.detector.score_threshold = DETECTION_THRESHOLD

    def run(self, target: np.ndarray, source: np.ndarray, landmarks: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        faces = {}
        for label, image in (("target", target), ("source", source)):
            found = self.engine.detector.detect(image)
            out[f"{label}_det"] = np.array([[*f.bbox, f.score] for f in found], np.float32)
            out[f"{label}_kps"] = np.stack([f.kps for f in found])
            face = found[0]
            out[f"{label}_embedding"] = self.engine.recognizer.embed_face(image, face)
            faces[label] = face
            for size in (112, 128):
                out[f"{label}_crop_{size}"], out[f"{label}_matrix_{size}"] = norm_crop(image, face.kps, size)
        for size in (112, 128):
            out[f"landmark_matrices_{size}"] = np.stack([estimate_norm(k, size) for k in landmarks])
        swapper = self.engine.swapper
        crop, matrix = norm_crop(target, faces["target"].kps, swapper.crop_size)
        latent = swapper.latent(out["source_embedding"])
        out["swap_input"], out["swap_latent"] = swapper.blob(crop), latent
        out["swap_output"], out["swap_matrix"] = swapper.swap_crop(crop, latent), matrix
        state = FrameState(frame=target.copy())
        state.patches = [SwapPatch(face=faces["target"], matrix=matrix, crop=out["swap_output"])]
        PasteStage(1.0).process(MaskStage(MaskKind.INSWAPPER).process(state))
        out["pasted"] = state.frame
        return out


@pytest.fixture(scope="module")
def compared(
    insightface_python: Path, tiny_models: TinyModelSet, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    work = tmp_path_factory.mktemp("parity")
    target = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    source = cv2.imread(str(ASSETS / "grace_hopper.jpg"))
    assert source is not None, "facefleet/demo_assets/grace_hopper.jpg is missing"
    cv2.imwrite(str(work / "target.png"), target)
    cv2.imwrite(str(work / "source.png"), source)
    landmarks = _landmark_cases()
    np.save(work / "landmarks.npy", landmarks)
    reference_models = work / "models"  # only the three routed models, as insightface's folder layout
    reference_models.mkdir()
    for name in ("det_tiny", "arcface_tiny", "inswapper_tiny"):
        shutil.copy(tiny_models.files[name], reference_models)
    run = subprocess.run(
        [
            str(insightface_python),
            str(REFERENCE_SCRIPT),
            str(reference_models),
            str(work / "reference.npz"),
            str(DETECTION_THRESHOLD),
            str(work / "landmarks.npy"),
            str(work / "target.png"),
            str(work / "source.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reference = dict(np.load(work / "reference.npz"))
    engine = load_engine(tiny_models.models_dir, ["CPUExecutionProvider"]).engine
    assert isinstance(engine, OnnxEngine)
    return reference, Ours(engine).run(target, source, landmarks)


def test_reference_is_insightface_routing_our_models(compared: tuple[dict, dict]) -> None:
    reference, _ = compared
    assert str(reference["version"]) == INSIGHTFACE_VERSION
    assert sorted(reference["routing"]) == ["arcface_tiny:ArcFaceONNX", "det_tiny:SCRFD", "inswapper_tiny:INSwapper"]


@pytest.mark.parametrize("label", ["target", "source"])
def test_detection_matches(compared: tuple[dict, dict], label: str) -> None:
    reference, ours = compared
    assert ours[f"{label}_det"].shape == reference[f"{label}_det"].shape  # same faces survive NMS
    np.testing.assert_allclose(ours[f"{label}_det"], reference[f"{label}_det"], atol=1e-3)  # px, score
    np.testing.assert_allclose(ours[f"{label}_kps"], reference[f"{label}_kps"], atol=1e-3)


def test_alignment_matrices_match_for_112_and_128(compared: tuple[dict, dict]) -> None:
    reference, ours = compared
    for size in (112, 128):
        np.testing.assert_allclose(ours[f"landmark_matrices_{size}"], reference[f"landmark_matrices_{size}"], atol=1e-9)
        for label in ("target", "source"):
            np.testing.assert_allclose(ours[f"{label}_matrix_{size}"], reference[f"{label}_matrix_{size}"], atol=1e-9)


def test_aligned_crops_match(compared: tuple[dict, dict]) -> None:
    reference, ours = compared
    for size in (112, 128):
        for label in ("target", "source"):
            np.testing.assert_array_equal(ours[f"{label}_crop_{size}"], reference[f"{label}_crop_{size}"])


def test_embeddings_match(compared: tuple[dict, dict]) -> None:
    reference, ours = compared
    for label in ("target", "source"):
        np.testing.assert_allclose(ours[f"{label}_embedding"], reference[f"{label}_embedding"], atol=1e-5)


def test_swapper_input_and_output_match(compared: tuple[dict, dict]) -> None:
    reference, ours = compared
    np.testing.assert_allclose(ours["swap_matrix"], reference["swap_matrix"], atol=1e-9)
    np.testing.assert_allclose(ours["swap_input"], reference["swap_input"], atol=1e-6)
    np.testing.assert_allclose(ours["swap_latent"], reference["swap_latent"], atol=1e-5)
    diff = np.abs(ours["swap_output"].astype(int) - reference["swap_output"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding at the uint8 cut only


def test_paste_back_matches(compared: tuple[dict, dict]) -> None:
    """The default (inswapper) mask and blend give insightface's paste_back=True image."""
    reference, ours = compared
    diff = np.abs(ours["pasted"].astype(int) - reference["pasted"].astype(int))
    changed = np.abs(reference["pasted"].astype(int) - cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)).max(
        axis=2
    )
    assert (changed > 0).sum() > 1000  # the reference really pasted a face
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # at most one level, on rare pixels
