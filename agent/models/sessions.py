"""ONNX Runtime sessions on the best execution providers available: TensorRT → CUDA → CPU.

Sessions are created only from a `VerifiedModel`, so no unverified file ever reaches onnxruntime.
"""

from __future__ import annotations

import onnxruntime as ort

from facefleet.agent.models.verify import VerifiedModel
from facefleet.agent.pipeline.errors import ProviderUnavailable

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_FIX = (
    "install the GPU runtime: `pip uninstall -y onnxruntime && pip install 'facefleet[gpu]'` "
    "(onnxruntime-gpu; never both packages together), plus the CUDA/TensorRT libraries it needs"
)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_providers(requested: list[str] | None, available: list[str] | None = None) -> list[str]:
    """Requested providers (short or full names) in order, or the best available ones.

    A requested provider that onnxruntime does not offer is an error naming the fix; CPU is always
    appended as the last resort so an op a GPU provider cannot place still runs.
    """
    have = available if available is not None else available_providers()
    if not requested:
        chosen = [p for p in PROVIDER_ORDER if p in have]
    else:
        chosen = []
        for name in requested:
            full = SHORT_NAMES.get(name.strip().lower(), name.strip())
            if full not in PROVIDER_ORDER:
                raise ProviderUnavailable(f"unknown execution provider {name!r}; use one of tensorrt, cuda, cpu")
            if full not in have:
                fix = GPU_FIX if full != "CPUExecutionProvider" else "reinstall onnxruntime"
                raise ProviderUnavailable(
                    f"execution provider {name!r} ({full}) was requested but this onnxruntime build "
                    f"offers only {have}; {fix}, or drop the provider setting to use the best available"
                )
            if full not in chosen:
                chosen.append(full)
    if "CPUExecutionProvider" in have and "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def create_session(model: VerifiedModel, providers: list[str], intra_op_threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(model.path), sess_options=options, providers=providers)
