"""Run insightface's own classes on the parity inputs; executed by the isolated reference venv.

Usage: python run_insightface.py MODELS_DIR OUT.npz DET_THRESHOLD LANDMARKS.npy TARGET SOURCE

It must import nothing from facefleet: it is the reference side of the differential test. Stages:
detection (SCRFD via model_zoo routing), face_align.estimate_norm/norm_crop for 112 and 128 (on the
detected landmarks and on LANDMARKS.npy), ArcFaceONNX embeddings, INSwapper input/latent/output
with paste_back False and True.
"""

import sys
from pathlib import Path

import cv2
import insightface
import numpy as np
from insightface.app.common import Face
from insightface.model_zoo import get_model
from insightface.utils import face_align


def main() -> None:
    models_dir, out_path, threshold, landmarks_path, target_path, source_path = sys.argv[1:7]
    providers = ["CPUExecutionProvider"]
    routed = {p.stem: get_model(str(p), providers=providers) for p in sorted(Path(models_dir).glob("*.onnx"))}
    detector = next(m for m in routed.values() if m.taskname == "detection")
    recognizer = next(m for m in routed.values() if type(m).__name__ == "ArcFaceONNX")
    swapper = next(m for m in routed.values() if type(m).__name__ == "INSwapper")
    detector.prepare(-1, det_thresh=float(threshold), input_size=detector.input_size)
    result: dict[str, np.ndarray] = {"version": np.array(insightface.__version__)}
    result["routing"] = np.array([f"{name}:{type(model).__name__}" for name, model in routed.items()])
    faces = {}
    for label, path in (("target", target_path), ("source", source_path)):
        image = cv2.imread(path)
        det, kpss = detector.detect(image)
        result[f"{label}_det"], result[f"{label}_kps"] = det, kpss
        face = Face(bbox=det[0, :4], kps=kpss[0], det_score=det[0, 4])
        recognizer.get(image, face)
        result[f"{label}_embedding"] = face.normed_embedding
        faces[label] = (image, face)
        for size in (112, 128):
            crop, matrix = face_align.norm_crop2(image, face.kps, size)
            result[f"{label}_matrix_{size}"], result[f"{label}_crop_{size}"] = matrix, crop
    landmarks = np.load(landmarks_path)
    for size in (112, 128):
        result[f"landmark_matrices_{size}"] = np.stack([face_align.estimate_norm(k, size) for k in landmarks])
    target_image, target_face = faces["target"]
    _, source_face = faces["source"]
    aimg, _ = face_align.norm_crop2(target_image, target_face.kps, swapper.input_size[0])
    result["swap_input"] = cv2.dnn.blobFromImage(
        aimg, 1.0 / swapper.input_std, swapper.input_size, (swapper.input_mean,) * 3, swapRB=True
    )
    latent = np.dot(source_face.normed_embedding.reshape((1, -1)), swapper.emap)
    result["swap_latent"] = latent / np.linalg.norm(latent)
    result["swap_output"], result["swap_matrix"] = swapper.get(target_image, target_face, source_face, paste_back=False)
    result["pasted"] = swapper.get(target_image.copy(), target_face, source_face, paste_back=True)
    np.savez(out_path, **result)


if __name__ == "__main__":
    main()
