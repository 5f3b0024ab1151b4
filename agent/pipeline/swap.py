"""Inswapper-style face swap: aligned 128x128 target crop + source latent (embedding @ emap)."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort

from facefleet.agent.models.verify import VerifiedModel
from facefleet.agent.pipeline.embed import normalize
from facefleet.agent.pipeline.stage import FrameState


class FaceSwapper:
    def __init__(self, session: ort.InferenceSession, model: VerifiedModel):
        import onnx  # lazily, as in models.verify: seconds to import
        from onnx import numpy_helper

        self.session = session
        graph = onnx.load(str(model.path), load_external_data=False).graph
        self.emap = numpy_helper.to_array(graph.initializer[-1]).astype(np.float32)  # checked in verify
        inputs = session.get_inputs()
        self.target_name, self.source_name = inputs[0].name, inputs[1].name
        self.crop_size = int(inputs[0].shape[2])

    def latent(self, source_embedding: np.ndarray) -> np.ndarray:
        return normalize(normalize(source_embedding).reshape(1, -1) @ self.emap).reshape(1, -1)

    def blob(self, crop_bgr: np.ndarray) -> np.ndarray:
        return cv2.dnn.blobFromImage(
            crop_bgr, 1.0 / 255.0, (self.crop_size, self.crop_size), (0.0, 0.0, 0.0), swapRB=True
        )

    def swap_crop(self, crop_bgr: np.ndarray, latent: np.ndarray) -> np.ndarray:
        pred = self.session.run(None, {self.target_name: self.blob(crop_bgr), self.source_name: latent})[0]
        rgb = np.clip(pred[0].transpose(1, 2, 0) * 255.0, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb[:, :, ::-1])


class SwapStage:
    name = "swap"

    def __init__(self, swapper: FaceSwapper, source_embedding: np.ndarray):
        self.swapper = swapper
        self.latent = swapper.latent(source_embedding)

    def process(self, state: FrameState) -> FrameState:
        for patch in state.patches:
            patch.crop = self.swapper.swap_crop(patch.crop, self.latent)
        return state
