"""Decide what a model is from its ONNX signature alone, as insightface's `model_zoo.get_model` does.

Rules, first match wins:
- 5 or more outputs: a face detector (SCRFD / RetinaFace: score, bbox[, kps] per stride).
- two inputs, the first an image 128x128: an inswapper-style swapper (`target` + `source` latent).
- one square image input and an output with the same 4-d shape: an image-to-image enhancer (GFPGAN).
- one square image input >= 112, a multiple of 16, and a 2-d output: an ArcFace-style recognizer.
Landmark (192x192) and attribute (96x96) models are recognised and refused: the pipeline has no use
for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from facefleet.agent.models.manifest import ModelRole


@dataclass(frozen=True)
class TensorSignature:
    name: str
    shape: tuple[int | str, ...]  # str = symbolic/dynamic dimension


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    last_initializer_shape: tuple[int, ...] | None  # inswapper keeps its emap here


class UnroutableModel(ValueError):
    """The signature matches no role the pipeline knows."""


def _spatial(shape: tuple[int | str, ...]) -> tuple[int | str, int | str] | None:
    return (shape[2], shape[3]) if len(shape) == 4 else None


def route_model(signature: ModelSignature) -> ModelRole:
    if not signature.inputs or not signature.outputs:
        raise UnroutableModel("model has no inputs or no outputs")
    first_input = signature.inputs[0].shape
    spatial = _spatial(first_input)
    if len(signature.outputs) >= 5:
        return ModelRole.DETECTOR
    if spatial == (192, 192):
        raise UnroutableModel("192x192 input: a landmark model, which the pipeline does not use")
    if spatial == (96, 96):
        raise UnroutableModel("96x96 input: an attribute (gender/age) model, which the pipeline does not use")
    if len(signature.inputs) == 2 and spatial == (128, 128):
        return ModelRole.SWAPPER
    if len(signature.inputs) == 1 and spatial is not None and spatial[0] == spatial[1]:
        side = spatial[0]
        output_shape = signature.outputs[0].shape
        if len(output_shape) == 4 and output_shape[1:] == first_input[1:]:
            return ModelRole.ENHANCER
        if isinstance(side, int) and side >= 112 and side % 16 == 0 and len(output_shape) == 2:
            return ModelRole.RECOGNIZER
    raise UnroutableModel(
        f"no role fits inputs {[t.shape for t in signature.inputs]} / outputs {[t.shape for t in signature.outputs]}"
    )
