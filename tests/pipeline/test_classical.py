"""The no-weights classical engine on a real photograph (scikit-image's astronaut)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.agent.pipeline.classical import HaarFaceDetector
from facefleet.agent.pipeline.runner import SwapJob, SwapPipeline

skimage_data = pytest.importorskip("skimage.data")


def test_classical_engine_swaps_a_real_photograph_only_around_the_face(tmp_path: Path) -> None:
    astronaut = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    # Second face: the same photo mirrored and colour-shifted (a different face crop and tone).
    source = cv2.flip(astronaut, 1)
    source = cv2.convertScaleAbs(source, alpha=0.8, beta=25)
    cv2.imwrite(str(tmp_path / "target.png"), astronaut)
    cv2.imwrite(str(tmp_path / "source.png"), source)
    faces = HaarFaceDetector().detect(astronaut)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].bbox.astype(int)

    pipeline = SwapPipeline.load(tmp_path / "no-models")  # no manifest: classical engine
    assert pipeline.engine == "classical" and "production path" in pipeline.engine_note
    job = SwapJob(
        task_id="classic",
        source_path=tmp_path / "source.png",
        target_path=tmp_path / "target.png",
        output_path=tmp_path / "out.png",
        checkpoint_dir=tmp_path / "ckpt",
    )
    result = pipeline.run(job, lambda u: None, threading.Event())
    assert result.engine == "classical" and result.quality.faces_swapped == 1
    assert result.quality.id_similarity_mean is None  # no recognizer without models
    out = cv2.imread(str(result.output_path)).astype(int)
    diff = np.abs(out - astronaut.astype(int)).sum(axis=2)
    assert diff[y1:y2, x1:x2].mean() > 15  # the face changed visibly
    outside = np.ones(diff.shape, bool)
    mx, my = (x2 - x1) // 4, (y2 - y1) // 4
    outside[y1 - my : y2 + my, x1 - mx : x2 + mx] = False
    assert diff[outside].max() == 0  # nothing else changed
    assert json.loads(result.sidecar_path.read_text())["engine"] == "classical"  # type: ignore[union-attr]
