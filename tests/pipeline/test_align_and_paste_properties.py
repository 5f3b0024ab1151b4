"""Invariants of the alignment fit and the paste-back, for any input (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.agent.pipeline.align import estimate_norm, template_for, umeyama_similarity
from facefleet.agent.pipeline.mask import MaskKind, MaskStage
from facefleet.agent.pipeline.paste import PasteStage
from facefleet.agent.pipeline.stage import Face, FrameState, SwapPatch


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0.2, 5.0),
    angle=st.floats(-math.pi, math.pi),
    shift=st.tuples(st.floats(-300, 300), st.floats(-300, 300)),
    seed=st.integers(0, 2**31 - 1),
)
def test_least_squares_fit_recovers_any_exact_similarity(
    scale: float, angle: float, shift: tuple[float, float], seed: int
) -> None:
    points = np.random.default_rng(seed).uniform(0, 200, (5, 2))
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = points @ rotation.T + np.array(shift)
    fitted = umeyama_similarity(points, moved)
    np.testing.assert_allclose(fitted[:2, :2], rotation, atol=1e-6 * scale)
    np.testing.assert_allclose(fitted[:2, 2], shift, atol=1e-5 * max(1.0, scale) * 300)


@settings(max_examples=40, deadline=None)
@given(noise=st.lists(st.floats(-6, 6), min_size=10, max_size=10), size=st.sampled_from([112, 128, 224, 256]))
def test_every_landmark_counts_the_fit_minimises_squared_error(noise: list[float], size: int) -> None:
    """No other similarity (the fit nudged in scale, angle or shift) puts the points closer."""
    landmarks = (template_for(112) * 2 + 40 + np.array(noise, np.float32).reshape(5, 2)).astype(np.float32)
    matrix = estimate_norm(landmarks, size)
    homogeneous = np.hstack([landmarks, np.ones((5, 1))])

    def error(m: np.ndarray) -> float:
        return float(((homogeneous @ m.T - template_for(size)) ** 2).sum())

    best = error(matrix)
    for nudge in (np.diag([1.001, 1.001]), np.array([[1, -0.001], [0.001, 1]])):
        assert best <= error(np.hstack([nudge @ matrix[:, :2], matrix[:, 2:]])) + 1e-6
    for delta in ((0.05, 0), (0, 0.05)):
        assert best <= error(matrix + np.array([[0, 0, delta[0]], [0, 0, delta[1]]])) + 1e-6


@settings(max_examples=30, deadline=None)
@given(
    center=st.tuples(st.floats(0, 200), st.floats(0, 150)),
    eye_gap=st.floats(8, 80),
    blend=st.floats(0.0, 1.0),
    kind=st.sampled_from(list(MaskKind)),
)
def test_paste_touches_nothing_outside_the_crops_footprint(
    center: tuple[float, float], eye_gap: float, blend: float, kind: MaskKind
) -> None:
    """Wherever the face is (even across the frame edge), pixels outside the warped crop stay as they were."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (150, 200, 3)).astype(np.uint8)
    unit = (template_for(112) - template_for(112).mean(axis=0)) / 35.0
    landmarks = (unit * eye_gap + np.array(center)).astype(np.float32)
    matrix = estimate_norm(landmarks, 128)
    crop = rng.integers(0, 255, (128, 128, 3)).astype(np.uint8)
    state = FrameState(frame=frame.copy())
    face = Face(bbox=np.zeros(4, np.float32), kps=landmarks, score=1.0)
    state.patches = [SwapPatch(face=face, matrix=matrix, crop=crop)]
    PasteStage(blend).process(MaskStage(kind).process(state))
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    corners = np.array([[0, 0, 1], [128, 0, 1], [0, 128, 1], [128, 128, 1]], np.float64) @ inverse.T
    (x1, y1), (x2, y2) = np.floor(corners.min(axis=0)) - 1, np.ceil(corners.max(axis=0)) + 1
    outside = np.ones(frame.shape[:2], bool)
    outside[max(0, int(y1)) : max(0, int(y2)), max(0, int(x1)) : max(0, int(x2))] = False
    assert np.array_equal(state.frame[outside], frame[outside])
    if blend == 0.0:
        assert np.array_equal(state.frame, frame)
