"""The no-weights engine: dlib's 68 landmarks, a piecewise-affine warp, colour correction and a
Poisson blend (the classic landmark face swap), with landmarks smoothed over video frames.

For each selected target face: the source face is warped triangle by triangle (a Delaunay
triangulation of the source's 68 landmarks, reused for every frame so the mesh never flips) onto the
target's landmarks; a face-shaped mask is the convex hull of the target's landmarks, pulled in a
little so the seam sits on skin, less the inside of the target's mouth (its teeth and expression
stay); the warped face gets the target's LAB mean and spread inside the
mask (Reinhard colour transfer); cv2.seamlessClone blends it, and only pixels inside the mask are
taken from the result, so everything outside the face mask stays byte-identical.

The source's texture carries its identity (eyes, brows, nose, mouth shape) onto the target's pose
and expression. It does not re-render lighting or profile views as a trained swapper does; the ONNX
engine remains the production path.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from facefleet.agent.pipeline.dlib_faces import DlibFaces
from facefleet.agent.pipeline.errors import InputRejected
from facefleet.agent.pipeline.stage import Face, FrameState

# 68-point indices (iBUG 300-W layout): eye centres, nose tip, mouth corners → the 5 keypoints.
RIGHT_EYE, LEFT_EYE, NOSE_TIP, MOUTH_RIGHT, MOUTH_LEFT = slice(36, 42), slice(42, 48), 30, 48, 54
INNER_MOUTH = slice(60, 68)
MASK_SHRINK = 0.04  # of the face width: the seam stays inside the face outline


def keypoints_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """insightface's 5 points (left eye, right eye, nose, left and right mouth corner, image-wise)."""
    return np.array(
        [
            landmarks[RIGHT_EYE].mean(axis=0),
            landmarks[LEFT_EYE].mean(axis=0),
            landmarks[NOSE_TIP],
            landmarks[MOUTH_RIGHT],
            landmarks[MOUTH_LEFT],
        ],
        np.float32,
    )


def eye_distance(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[LEFT_EYE].mean(axis=0) - landmarks[RIGHT_EYE].mean(axis=0)))


class LandmarkFaceDetector:
    """dlib HOG faces with their 68 landmarks, as pipeline `Face`s."""

    def __init__(self, faces: DlibFaces):
        self.faces = faces

    def detect(self, image: np.ndarray) -> list[Face]:
        rgb = self.faces.rgb(image)
        found = []
        for box in self.faces.find(rgb):
            landmarks = self.faces.landmarks68(rgb, box)
            found.append(Face(bbox=box, kps=keypoints_from_landmarks(landmarks), score=1.0, landmarks=landmarks))
        return found


class LandmarkSmoother:
    """Temporal smoothing of landmarks in frame order (frames are processed concurrently).

    An adaptive exponential filter per face (One-Euro style): when the landmarks barely move (sensor
    noise on a still head) it averages strongly; when they move by more than `follow` x the eye
    distance per frame it follows at once, so real motion does not lag. Each frame waits for the one
    before it to be smoothed (in a FIFO worker pool that one is already running), then publishes.
    """

    def __init__(self, min_alpha: float = 0.2, follow: float = 0.08, wait_s: float = 30.0):
        self.min_alpha = min_alpha
        self.follow = follow
        self.wait_s = wait_s
        self._turn = threading.Condition()
        self._next = 0
        self._previous: list[np.ndarray] = []

    def start_at(self, index: int) -> None:
        with self._turn:
            self._next, self._previous = index, []
            self._turn.notify_all()

    def _filter(self, landmarks: np.ndarray) -> np.ndarray:
        scale = max(eye_distance(landmarks), 1.0)
        centre = landmarks.mean(axis=0)
        nearest = min(self._previous, key=lambda p: float(np.linalg.norm(p.mean(axis=0) - centre)), default=None)
        if nearest is None or np.linalg.norm(nearest.mean(axis=0) - centre) > scale:
            return landmarks  # a new face (or a cut): nothing to smooth against
        motion = float(np.abs(landmarks - nearest).mean()) / scale
        alpha = float(np.clip(motion / self.follow, self.min_alpha, 1.0))
        return (nearest + alpha * (landmarks - nearest)).astype(np.float32)

    def smooth(self, index: int, faces: list[Face]) -> None:
        with self._turn:
            in_turn = self._turn.wait_for(lambda: self._next >= index, timeout=self.wait_s)
            if not in_turn or self._next > index:  # out of sequence (a frame failed): start afresh
                self._previous = []
            for face in faces:
                assert face.landmarks is not None
                face.landmarks = self._filter(face.landmarks)
                face.kps = keypoints_from_landmarks(face.landmarks)
            self._previous = [face.landmarks for face in faces if face.landmarks is not None]
            self._next = index + 1
            self._turn.notify_all()


class LandmarkDetectStage:
    name = "detect"

    def __init__(self, detector: LandmarkFaceDetector, smoother: LandmarkSmoother | None):
        self.detector = detector
        self.smoother = smoother

    def start_at(self, index: int) -> None:
        if self.smoother is not None:
            self.smoother.start_at(index)

    def process(self, state: FrameState) -> FrameState:
        state.faces = self.detector.detect(state.frame)
        if self.smoother is not None:
            self.smoother.smooth(state.index, state.faces)
        return state


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles over `points`, as rows of 3 point indices."""
    x, y, w, h = cv2.boundingRect(points.astype(np.float32))
    subdiv = cv2.Subdiv2D((x - 1, y - 1, w + 2, h + 2))
    for point in points:
        subdiv.insert((float(point[0]), float(point[1])))
    lookup = {(round(float(p[0]), 3), round(float(p[1]), 3)): i for i, p in enumerate(points)}
    triangles = []
    for tri in np.asarray(subdiv.getTriangleList()).reshape(-1, 3, 2):
        indices = [lookup.get((round(float(px), 3), round(float(py), 3))) for px, py in tri]
        if None not in indices and len(set(indices)) == 3:
            triangles.append(indices)
    return np.array(triangles, np.int32)


def warp_triangles(
    source: np.ndarray, source_points: np.ndarray, target_points: np.ndarray, triangles: np.ndarray, shape: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """The source image warped piecewise-affinely so `source_points` land on `target_points`, and the
    uint8 mask of the pixels some triangle covered (a fold in the target mesh can leave gaps)."""
    out = np.zeros(shape, np.uint8)
    covered = np.zeros(shape[:2], np.uint8)
    height, width = shape[:2]
    for tri in triangles:
        src, dst = source_points[tri].astype(np.float32), target_points[tri].astype(np.float32)
        x, y, w, h = cv2.boundingRect(dst)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
        if x1 <= x0 or y1 <= y0:
            continue
        local = dst - np.array([x0, y0], np.float32)
        matrix = cv2.getAffineTransform(src, local)
        patch = cv2.warpAffine(source, matrix, (x1 - x0, y1 - y0), borderMode=cv2.BORDER_REFLECT)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(mask, np.round(local).astype(np.int32), 255, cv2.LINE_8)
        region = out[y0:y1, x0:x1]
        region[mask > 0] = patch[mask > 0]
        covered[y0:y1, x0:x1] |= mask
    return out, covered


def face_mask(landmarks: np.ndarray, shape: tuple) -> np.ndarray:
    """uint8 0/255: the landmarks' convex hull, shrunk by MASK_SHRINK of the face width, off the border,
    without the inside of the target's mouth (its teeth and expression stay; empty when it is closed)."""
    height, width = shape[:2]
    mask = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(landmarks).astype(np.int32)), 255)
    cv2.fillPoly(mask, [np.round(landmarks[INNER_MOUTH]).astype(np.int32)], 0)
    face_width = float(np.ptp(landmarks[:, 0]))
    shrink = max(1, round(face_width * MASK_SHRINK))
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * shrink + 1, 2 * shrink + 1)))
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 0, 0, 0, 0  # seamlessClone needs a margin
    return mask


def match_colour(face: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`face` with the LAB mean and standard deviation of `target`, both measured inside `mask`."""
    inside = mask > 0
    face_lab = cv2.cvtColor(face, cv2.COLOR_BGR2LAB).astype(np.float32)
    target_lab = cv2.cvtColor(target, cv2.COLOR_BGR2LAB).astype(np.float32)
    face_mean, face_std = face_lab[inside].mean(axis=0), face_lab[inside].std(axis=0) + 1e-6
    target_mean, target_std = target_lab[inside].mean(axis=0), target_lab[inside].std(axis=0)
    matched = (face_lab - face_mean) / face_std * target_std + target_mean
    return cv2.cvtColor(np.clip(matched, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)


class LandmarkSwapStage:
    """Swap + mask + paste for the landmark engine (one stage: the warp defines its own mask)."""

    name = "swap"

    def __init__(self, source: np.ndarray, source_face: Face, blend: float):
        if source_face.landmarks is None:
            raise ValueError("the landmark swap needs the source face's 68 landmarks")
        self.source = source
        self.source_points = source_face.landmarks
        self.triangles = triangulate(self.source_points)
        if len(self.triangles) < 50:
            raise InputRejected("the source face's landmarks are degenerate; use a clear, frontal face photo")
        self.blend = blend

    def swap_face(self, frame: np.ndarray, face: Face) -> bool:
        assert face.landmarks is not None
        warped, covered = warp_triangles(self.source, self.source_points, face.landmarks, self.triangles, frame.shape)
        mask = face_mask(face.landmarks, frame.shape) & covered
        if cv2.countNonZero(mask) < 64:
            return False
        warped = match_colour(warped, frame, mask)
        x, y, w, h = cv2.boundingRect(mask)
        # seamlessClone erodes the mask it is given in place: hand it a copy, composite with the original
        cloned = cv2.seamlessClone(warped, frame, mask.copy(), (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
        inside = mask > 0
        if self.blend < 1.0:
            mixed = cloned[inside].astype(np.float32) * self.blend + frame[inside].astype(np.float32) * (1 - self.blend)
            frame[inside] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        else:
            frame[inside] = cloned[inside]
        return True

    def process(self, state: FrameState) -> FrameState:
        state.swapped = [face for face in state.selected if self.swap_face(state.frame, face)]
        state.faces_swapped = len(state.swapped)
        return state
