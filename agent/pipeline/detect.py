"""Face detection with an SCRFD-style ONNX model (9 outputs: score, bbox, kps for strides 8/16/32).

Same decoding as insightface's scrfd.py: letterbox into the model's input size, anchor centres on a
stride grid (2 anchors per cell), distances * stride → boxes and landmarks, threshold, NMS.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort

from facefleet.agent.pipeline.stage import Face, FrameState

DEFAULT_INPUT_SIZE = (640, 640)
STRIDES = (8, 16, 32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= iou_threshold]
    return keep


class FaceDetector:
    def __init__(self, session: ort.InferenceSession, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        shape = session.get_inputs()[0].shape
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.input_size = (int(shape[3]), int(shape[2])) if fixed else DEFAULT_INPUT_SIZE  # (w, h)
        outputs = session.get_outputs()
        self.batched = len(outputs[0].shape) == 3
        self.heads = len(outputs) // 3
        self.anchors_per_cell = 2
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self._anchor_cache: dict[tuple[int, int, int], np.ndarray] = {}

    def _anchors(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._anchor_cache:
            grid = np.stack(list(np.mgrid[:height, :width][::-1]), axis=-1).astype(np.float32)
            centers = (grid * stride).reshape(-1, 2)
            self._anchor_cache[key] = np.repeat(centers, self.anchors_per_cell, axis=0)
        return self._anchor_cache[key]

    def blob(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The model input for `image` (letterboxed into the input size) and the scale applied."""
        in_w, in_h = self.input_size
        img_h, img_w = image.shape[:2]
        # The reference's letterbox: fit the limiting side exactly, truncate the other, and take the
        # scale from the heights (so boxes map back exactly as insightface's SCRFD.detect maps them).
        if img_h / img_w > in_h / in_w:
            new_h = in_h
            new_w = max(1, int(new_h / (img_h / img_w)))
        else:
            new_w = in_w
            new_h = max(1, int(new_w * (img_h / img_w)))
        scale = new_h / img_h
        canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h)) if (new_w, new_h) != (img_w, img_h) else image
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128.0, (in_w, in_h), (127.5, 127.5, 127.5), swapRB=True)
        return blob, scale

    def detect(self, image: np.ndarray) -> list[Face]:
        in_w, in_h = self.input_size
        blob, scale = self.blob(image)
        outs = self.session.run(None, {self.input_name: blob})
        if self.batched:
            outs = [o[0] for o in outs]
        boxes_all, scores_all, kps_all = [], [], []
        for index, stride in enumerate(STRIDES[: self.heads]):
            scores = outs[index].reshape(-1)
            distances = outs[index + self.heads] * stride
            kps_distances = outs[index + 2 * self.heads] * stride
            anchors = self._anchors(in_h // stride, in_w // stride, stride)
            positive = np.where(scores >= self.score_threshold)[0]
            if positive.size == 0:
                continue
            centers = anchors[positive]
            d = distances[positive]
            boxes_all.append(
                np.stack(
                    [
                        centers[:, 0] - d[:, 0],
                        centers[:, 1] - d[:, 1],
                        centers[:, 0] + d[:, 2],
                        centers[:, 1] + d[:, 3],
                    ],
                    axis=-1,
                )
            )
            k = kps_distances[positive].reshape(-1, 5, 2)
            kps_all.append(centers[:, None, :] + k)
            scores_all.append(scores[positive])
        if not boxes_all:
            return []
        boxes = np.concatenate(boxes_all) / scale
        kps = np.concatenate(kps_all) / scale
        scores = np.concatenate(scores_all)
        keep = nms(boxes, scores, self.nms_threshold)
        return [
            Face(bbox=boxes[i].astype(np.float32), kps=kps[i].astype(np.float32), score=float(scores[i])) for i in keep
        ]


class DetectStage:
    name = "detect"

    def __init__(self, detector: FaceDetector):
        self.detector = detector

    def process(self, state: FrameState) -> FrameState:
        state.faces = self.detector.detect(state.frame)
        return state
