"""Label every output as AI-generated: embedded metadata plus a sidecar JSON next to the file.

Images: PNG tEXt chunks (`AI-Generated`, `Comment`) or JPEG COM segment + EXIF ImageDescription.
Videos: the container `comment` tag (set by media.mux_segments). The sidecar `<output>.provenance.json`
records engine, models (name + sha256), input/output hashes and time. C2PA manifests are not signed
yet (needs the key material from the security area); the sidecar says so.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from agent.models.verify import file_sha256
from agent.pipeline.errors import InputRejected

EXIF_IMAGE_DESCRIPTION = 0x010E
SIDECAR_SUFFIX = ".provenance.json"


@dataclass(frozen=True)
class ProvenanceRecord:
    task_id: str
    engine: str
    models: list[dict[str, str]] = field(default_factory=list)

    def label(self) -> str:
        return (
            f"AI-generated: face swapped by facefleet (engine={self.engine}, task={self.task_id}). "
            "This image or video was synthetically altered."
        )


def write_labelled_image(image_bgr: np.ndarray, path: Path, record: ProvenanceRecord) -> None:
    """Write `image_bgr` to `path` (format from the suffix) with the AI-generated label embedded."""
    suffix = path.suffix.lower()
    pil = Image.fromarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    label = record.label()
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text("AI-Generated", "true")
        info.add_text("Comment", label)
        info.add_text("Software", "facefleet")
        pil.save(path, format="PNG", pnginfo=info)
    elif suffix in (".jpg", ".jpeg", ".webp"):
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = label
        if suffix == ".webp":
            pil.save(path, format="WEBP", exif=exif.tobytes(), quality=95)
        else:
            pil.save(path, format="JPEG", exif=exif.tobytes(), comment=label.encode(), quality=95)
    else:
        raise InputRejected(f"output {path}: unsupported image type {suffix!r}; use .png, .jpg or .webp")


def read_image_label(path: Path) -> str | None:
    """The embedded AI-generated label of an image written by `write_labelled_image`, if any."""
    with Image.open(path) as img:
        if img.format == "PNG":
            return img.info.get("Comment")  # type: ignore[no-any-return]
        description = img.getexif().get(EXIF_IMAGE_DESCRIPTION)
        return str(description) if description else None


def write_sidecar(
    output: Path, record: ProvenanceRecord, source: Path, target: Path, extra: dict[str, object] | None = None
) -> Path:
    sidecar = output.with_name(output.name + SIDECAR_SUFFIX)
    payload: dict[str, object] = {
        "ai_generated": True,
        "label": record.label(),
        "generator": "facefleet",
        "task_id": record.task_id,
        "engine": record.engine,
        "models": record.models,
        "source_sha256": file_sha256(source),
        "target_sha256": file_sha256(target),
        "output_sha256": file_sha256(output),
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "c2pa": "not signed: no C2PA signing key configured",
    }
    payload.update(extra or {})
    sidecar.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return sidecar
