"""Verify a model file before any inference session exists (GUIDE invariant 5).

Order: the file exists → its sha256 equals the manifest's → the ONNX graph signature (read with the
`onnx` package, weights not executed) matches the manifest → the signature routes to the manifest's
role. Any failure raises `ModelVerificationFailed` saying what was expected and what was found.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facefleet.agent.models.manifest import ANY_DIM, ModelEntry, ModelRole, TensorSpec, load_manifest
from facefleet.agent.models.routing import ModelSignature, TensorSignature, UnroutableModel, route_model
from facefleet.agent.pipeline.errors import ModelVerificationFailed

if TYPE_CHECKING:
    import onnx

HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class VerifiedModel:
    entry: ModelEntry
    path: Path
    signature: ModelSignature


@dataclass(frozen=True)
class ModelStatus:
    """What an agent reports about each manifest entry (Describe, `facefleet swap --json`)."""

    name: str
    role: str
    sha256: str
    verified: bool
    error: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or ANY_DIM)
    return tuple(dims)


def read_signature(path: Path) -> ModelSignature:
    """Read graph inputs/outputs (initializers excluded) without creating a session."""
    import onnx  # here, not at module level: it costs seconds to import, and an agent starts without it

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
        raise ModelVerificationFailed(f"{path}: not a readable ONNX model ({exc})") from exc
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = tuple(TensorSignature(vi.name, _dims(vi)) for vi in graph.input if vi.name not in initializer_names)
    outputs = tuple(TensorSignature(vi.name, _dims(vi)) for vi in graph.output)
    last = tuple(int(d) for d in graph.initializer[-1].dims) if graph.initializer else None
    return ModelSignature(inputs=inputs, outputs=outputs, last_initializer_shape=last)


def _tensor_matches(spec: TensorSpec, actual: TensorSignature) -> bool:
    if spec.name is not None and spec.name != actual.name:
        return False
    if len(spec.shape) != len(actual.shape):
        return False
    for want, have in zip(spec.shape, actual.shape, strict=True):
        if want == ANY_DIM:
            continue
        if want != have:
            return False
    return True


def _describe(tensors: tuple[TensorSignature, ...]) -> str:
    return ", ".join(f"{t.name}[{'x'.join(str(d) for d in t.shape)}]" for t in tensors)


def check_signature(entry: ModelEntry, signature: ModelSignature, path: Path) -> None:
    for kind, specs, actual in (
        ("inputs", entry.inputs, signature.inputs),
        ("outputs", entry.outputs, signature.outputs),
    ):
        ok = len(specs) == len(actual) and all(
            _tensor_matches(spec, tensor) for spec, tensor in zip(specs, actual, strict=False)
        )
        if not ok:
            raise ModelVerificationFailed(
                f"model {entry.name!r} ({path}): {kind} do not match the manifest: expected "
                f"{', '.join(s.describe() for s in specs)}; actual {_describe(actual)}. "
                "The file is not the model the manifest describes: replace it or fix the manifest entry."
            )
    try:
        routed = route_model(signature)
    except UnroutableModel as exc:
        raise ModelVerificationFailed(f"model {entry.name!r} ({path}): {exc}") from exc
    if routed != entry.role:
        raise ModelVerificationFailed(
            f"model {entry.name!r} ({path}): the manifest says role {entry.role.value!r} but the "
            f"signature is that of a {routed.value}; fix the manifest role or the file"
        )
    if entry.role == ModelRole.SWAPPER:
        latent = signature.inputs[1].shape[-1]
        if signature.last_initializer_shape != (latent, latent):
            raise ModelVerificationFailed(
                f"model {entry.name!r} ({path}): an inswapper-style swapper keeps its emap "
                f"({latent}x{latent}) as the last graph initializer; found "
                f"{signature.last_initializer_shape}"
            )


def verify_model(models_dir: Path, entry: ModelEntry) -> VerifiedModel:
    path = models_dir / entry.file
    if not path.is_file():
        raise ModelVerificationFailed(
            f"model {entry.name!r}: file {path} is missing; drop the file there or remove its manifest entry"
        )
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise ModelVerificationFailed(
            f"model {entry.name!r} ({path}): sha256 mismatch: expected {entry.sha256}, actual {actual}. "
            "The file is tampered, truncated or a different release; replace it with the published "
            "file, or update the manifest only if you trust this file."
        )
    signature = read_signature(path)
    check_signature(entry, signature, path)
    return VerifiedModel(entry=entry, path=path, signature=signature)


@dataclass(frozen=True)
class ManifestCheck:
    """Every manifest entry checked: what verified (first per role) and each entry's status."""

    statuses: list[ModelStatus]
    verified: dict[ModelRole, VerifiedModel]

    @property
    def failures(self) -> list[str]:
        return [status.error for status in self.statuses if not status.verified]


def verify_manifest(models_dir: Path) -> ManifestCheck:
    """Verify every entry of `<models_dir>/manifest.toml`; a failing entry is recorded, not raised."""
    statuses: list[ModelStatus] = []
    verified: dict[ModelRole, VerifiedModel] = {}
    for entry in load_manifest(models_dir).model:
        try:
            model = verify_model(models_dir, entry)
        except ModelVerificationFailed as exc:
            statuses.append(ModelStatus(entry.name, entry.role.value, entry.sha256, False, exc.message))
            continue
        statuses.append(ModelStatus(entry.name, entry.role.value, entry.sha256, True))
        verified.setdefault(entry.role, model)
    return ManifestCheck(statuses, verified)
