"""Optional face restoration with a GFPGAN-style model (1x3xSxS RGB in [-1, 1] → same)."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort

from facefleet.agent.pipeline.stage import FrameState


class FaceEnhancer:
    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.size = int(session.get_inputs()[0].shape[2])

    def enhance(self, crop_bgr: np.ndarray) -> np.ndarray:
        resized = cv2.resize(crop_bgr, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        blob = cv2.dnn.blobFromImage(resized, 1.0 / 127.5, (self.size, self.size), (127.5, 127.5, 127.5), swapRB=True)
        pred = self.session.run(None, {self.input_name: blob})[0][0]
        rgb = np.clip((pred.transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb[:, :, ::-1])


class EnhanceStage:
    """Restores each swapped crop at the enhancer's resolution; the affine is rescaled to match."""

    name = "enhance"

    def __init__(self, enhancer: FaceEnhancer):
        self.enhancer = enhancer

    def process(self, state: FrameState) -> FrameState:
        for patch in state.patches:
            factor = self.enhancer.size / patch.crop.shape[0]
            patch.crop = self.enhancer.enhance(patch.crop)
            patch.matrix = (patch.matrix * factor).astype(np.float32)
        return state
