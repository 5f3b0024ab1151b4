"""Label every output as AI-generated: embedded metadata plus a sidecar JSON next to the file.

Images: PNG tEXt chunks (`AI-Generated`, `Comment`) or JPEG COM segment + EXIF ImageDescription.
Videos: the container `comment` tag (set by media.mux_segments). The sidecar `<output>.provenance.json`
records engine, models (name + sha256), input/output hashes and time, and whether a C2PA manifest
was signed.

C2PA: with a signing cert + key configured (`agent.c2pa_cert` / `agent.c2pa_key`, e.g. the demo PKI's
`c2pa-signer.pem` / `c2pa-signer-key.pem`) the output is signed in place with a manifest (c2pa-python):
the target is the parent ingredient (`c2pa.opened`), then a `c2pa.edited` action whose
digitalSourceType is IPTC `compositeWithTrainedAlgorithmicMedia` — a face swap keeps the real photo
or video and composites a trained-model face into it, which is exactly that term; the bare
`trainedAlgorithmicMedia` would claim the whole asset was generated. A `org.facefleet.swap`
assertion carries task id, engine and models (name + sha256). Thumbnails are off: an ingredient
thumbnail would embed the original, un-swapped face in the output.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from facefleet.agent.models.verify import file_sha256
from facefleet.agent.pipeline.errors import InputRejected, PipelineError

EXIF_IMAGE_DESCRIPTION = 0x010E
SIDECAR_SUFFIX = ".provenance.json"
NOT_SIGNED = "not signed: no C2PA signing key configured"
IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
FACE_SWAP_SOURCE_TYPE = IPTC_SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"
FACEFLEET_ASSERTION = "org.facefleet.swap"
C2PA_MIME_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".avi": "video/x-msvideo",
}
# No thumbnails: an ingredient thumbnail of the target would carry the original face.
C2PA_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}

try:
    FACEFLEET_VERSION = version("facefleet")
except PackageNotFoundError:  # running from a source tree without an install
    FACEFLEET_VERSION = "0+unknown"


class ProvenanceSigningFailed(PipelineError):
    """C2PA signing is configured but the key material is unusable or signing an output failed."""

    reason_code = "INTERNAL"


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
    """Write `<output>.provenance.json`; `extra` may override `c2pa` (see `c2pa_sidecar_fields`)."""
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
        "c2pa": NOT_SIGNED,
    }
    payload.update(extra or {})
    sidecar.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return sidecar


def c2pa_sidecar_fields(manifest_label: str | None) -> dict[str, object]:
    """What the sidecar says about C2PA: signed with which manifest, or why not."""
    if manifest_label is None:
        return {"c2pa": NOT_SIGNED}
    return {"c2pa": "signed", "c2pa_manifest": manifest_label}


@dataclass(frozen=True)
class C2paSigningKey:
    """A C2PA signing certificate chain (leaf first, PEM) and its EC P-256 private key (ES256)."""

    cert_path: Path
    key_path: Path
    chain_pem: bytes
    key_pem: bytes

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> C2paSigningKey:
        """Read and check the pair: both files exist, parse, are P-256, and the key matches the cert.
        Also that c2pa-python is installed: better at start-up than in every task."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        fix = (
            "point agent.c2pa_cert / agent.c2pa_key (--c2pa-cert/--c2pa-key) at the files `facefleet certs init` writes"
        )
        if not c2pa_available():
            raise ProvenanceSigningFailed(
                "C2PA signing is configured but c2pa-python is not installed: pip install 'facefleet[provenance]' "
                "(from a checkout: pip install -e '.[provenance]'), or unset agent.c2pa_cert/agent.c2pa_key "
                "for labelled, unsigned outputs"
            )
        try:
            chain_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        except OSError as error:
            raise ProvenanceSigningFailed(f"C2PA signing material unreadable: {error}; {fix}") from None
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as error:
            raise ProvenanceSigningFailed(
                f"C2PA cert {cert_path} is not a PEM certificate chain ({error}); {fix}"
            ) from None
        try:
            key = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as error:
            raise ProvenanceSigningFailed(
                f"C2PA key {key_path} is not an unencrypted PEM private key ({error}); {fix}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ProvenanceSigningFailed(f"C2PA key {key_path} must be an EC P-256 key (ES256 signing); {fix}")
        if certs[0].public_key() != key.public_key():
            raise ProvenanceSigningFailed(
                f"C2PA key {key_path} does not belong to the first certificate in {cert_path}; "
                "the cert file must start with the signer's own certificate, then its CA chain"
            )
        return cls(cert_path, key_path, chain_pem, key_pem)

    @classmethod
    def from_config(cls, cert_path: Path | None, key_path: Path | None) -> C2paSigningKey | None:
        """None when neither is set (unsigned outputs); an error when only one of the two is."""
        if cert_path is None and key_path is None:
            return None
        if cert_path is None or key_path is None:
            missing = "agent.c2pa_cert (--c2pa-cert)" if cert_path is None else "agent.c2pa_key (--c2pa-key)"
            raise ProvenanceSigningFailed(f"C2PA signing needs both a cert and a key; {missing} is not set")
        return cls.load(cert_path, key_path)


def c2pa_available() -> bool:
    """c2pa-python (the `provenance` extra) is installed."""
    return importlib.util.find_spec("c2pa") is not None


def c2pa_manifest_definition(record: ProvenanceRecord, title: str, parent_title: str) -> dict[str, Any]:
    """The manifest for a swapped output: parent opened, then edited with AI-composited content. Pure."""
    agent = {"name": "facefleet", "version": FACEFLEET_VERSION}
    return {
        "claim_generator_info": [agent],
        "title": title,
        "ingredients": [],  # the parent is added from its file by `sign_c2pa`
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}},
                        {
                            "action": "c2pa.edited",
                            "digitalSourceType": FACE_SWAP_SOURCE_TYPE,
                            "softwareAgent": agent,
                            "description": f"face swapped into {parent_title} by a trained model",
                        },
                    ]
                },
            },
            {
                "label": FACEFLEET_ASSERTION,
                "data": {
                    "task_id": record.task_id,
                    "engine": record.engine,
                    "models": record.models,
                    "label": record.label(),
                },
            },
        ],
    }


def c2pa_mime_type(path: Path) -> str:
    mime = C2PA_MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ProvenanceSigningFailed(
            f"cannot C2PA-sign with {path}: C2PA does not support {path.suffix!r} files "
            f"({', '.join(sorted(C2PA_MIME_TYPES))} work); convert the target / pick the output type, "
            "or unset agent.c2pa_cert/agent.c2pa_key"
        )
    return mime


def sign_c2pa(output: Path, record: ProvenanceRecord, parent: Path, key: C2paSigningKey) -> str:
    """Embed a signed C2PA manifest in `output` (temp file, then atomic rename); returns its label."""
    import c2pa

    mime = c2pa_mime_type(output)
    c2pa_mime_type(parent)  # fail before any work when the target cannot be the parent ingredient
    definition = c2pa_manifest_definition(record, output.name, parent.name)
    handle, staging_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".c2pa", dir=output.parent)
    os.close(handle)
    staging = Path(staging_name)
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, key.chain_pem, key.key_pem, None))
        with c2pa.Builder(definition, c2pa.Context.from_dict(C2PA_SETTINGS)) as builder, signer:
            with parent.open("rb") as parent_stream:
                builder.add_ingredient(
                    {"title": parent.name, "relationship": "parentOf", "label": "parent"},
                    c2pa_mime_type(parent),
                    parent_stream,
                )
            with output.open("rb") as source, staging.open("w+b") as destination:
                builder.sign(signer, mime, source, destination)
        os.replace(staging, output)
    except c2pa.C2paError as error:
        staging.unlink(missing_ok=True)
        raise ProvenanceSigningFailed(
            f"C2PA signing of {output} with {key.cert_path} failed: {error}; "
            "check the cert has the emailProtection/documentSigning usage (`facefleet certs init` issues one) "
            "or unset agent.c2pa_cert/agent.c2pa_key to write unsigned, labelled outputs"
        ) from error
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return read_c2pa_label(output) or ""


def read_c2pa_label(path: Path) -> str | None:
    """The active manifest label embedded in `path`, or None when it carries no C2PA manifest."""
    import c2pa

    try:
        with (
            path.open("rb") as stream,
            c2pa.Reader(C2PA_MIME_TYPES.get(path.suffix.lower(), path.suffix), stream) as reader,
        ):
            manifest = reader.get_active_manifest()
    except c2pa.C2paError:
        return None
    return str(manifest["label"]) if manifest and "label" in manifest else None
