"""`models/manifest.toml`: which model files an agent may load, their sha256 and ONNX signature.

Example entry::

    [[model]]
    name = "inswapper_128"
    role = "swapper"
    file = "inswapper_128.onnx"
    sha256 = "<64 hex digits>"
    inputs = [{ name = "target", shape = [1, 3, 128, 128] }, { name = "source", shape = [1, 512] }]
    outputs = [{ shape = [1, 3, 128, 128] }]

A shape dimension may be an integer or "?" (any size, e.g. a dynamic detector input). An omitted
tensor `name` matches any name.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from facefleet.agent.pipeline.errors import ModelVerificationFailed

MANIFEST_FILE = "manifest.toml"
ANY_DIM = "?"


class ModelRole(StrEnum):
    DETECTOR = "detector"
    RECOGNIZER = "recognizer"
    SWAPPER = "swapper"
    ENHANCER = "enhancer"


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    shape: list[int | str]

    @field_validator("shape")
    @classmethod
    def _dims_are_ints_or_any(cls, shape: list[int | str]) -> list[int | str]:
        for dim in shape:
            if isinstance(dim, str) and dim != ANY_DIM:
                raise ValueError(f'a dimension is an integer or "{ANY_DIM}", got {dim!r}')
        return shape

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.name or '*'}[{dims}]"


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: ModelRole
    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    description: str = ""

    @field_validator("file")
    @classmethod
    def _file_stays_in_models_dir(cls, file: str) -> str:
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ValueError(f"file {file!r} must be a path relative to the models directory")
        return file

    @field_validator("sha256")
    @classmethod
    def _lowercase(cls, value: str) -> str:
        return value.strip().lower()


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: list[ModelEntry] = Field(default_factory=list)

    def by_role(self, role: ModelRole) -> list[ModelEntry]:
        return [entry for entry in self.model if entry.role == role]


def load_manifest(models_dir: Path) -> Manifest:
    """Parse `<models_dir>/manifest.toml`; a missing file is an empty manifest (classical engine)."""
    path = models_dir / MANIFEST_FILE
    if not path.exists():
        return Manifest()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ModelVerificationFailed(f"{path}: not valid TOML ({exc}); fix the syntax") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ModelVerificationFailed(f"{path}: invalid manifest: {problems}") from exc
    names = [entry.name for entry in manifest.model]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelVerificationFailed(f"{path}: model names must be unique, repeated: {duplicates}")
    return manifest
