"""`facefleet swap`: run the agent's swap pipeline locally, without a scheduler (headless run)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import typer
from rich.table import Table

from facefleet.cli.output import JSON_OPTION, console, fail, line, print_json, styled
from facefleet.structured_logs import configure_logging


def register(app: typer.Typer) -> None:
    @app.command("swap")
    def swap_cmd(
        source: Path = typer.Option(..., "--source", "-s", help="Image with the face to put in."),
        target: Path = typer.Option(..., "--target", "-t", help="Image or video to change."),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the result (.png/.jpg/.mp4)."),
        models: Path = typer.Option(Path("models"), "--models", help="Directory with manifest.toml and weights."),
        face_selector: str = typer.Option("largest", "--face-selector", help="all | largest | reference"),
        reference: Path | None = typer.Option(
            None, "--reference", help="Reference face for --face-selector reference."
        ),
        blend: float = typer.Option(1.0, "--blend", min=0.0, max=1.0, help="Paste-back blend ratio 0..1."),
        mask: str = typer.Option("inswapper", "--mask", help="inswapper (the reference's) | box | ellipse"),
        enhance: bool = typer.Option(False, "--enhance", help="Run the enhancer model when installed."),
        min_id_similarity: float | None = typer.Option(
            None,
            "--min-id-similarity",
            min=0.0,
            max=1.0,
            help="Quality gate: fail when the worst face's ID similarity to the source is below this "
            "(dlib, 1 - distance; 0.4: same person).",
        ),
        provider: list[str] = typer.Option([], "--provider", help="tensorrt | cuda | cpu (repeatable; default: best)."),
        checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Video checkpoints (resumable)."),
        c2pa_cert: Path | None = typer.Option(
            None, "--c2pa-cert", help="C2PA signer cert chain PEM: sign the output's manifest (with --c2pa-key)."
        ),
        c2pa_key: Path | None = typer.Option(None, "--c2pa-key", help="C2PA signer EC P-256 private key PEM."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Swap a face into an image or video on this machine and report engine, frames, fps and ID similarity."""
        from facefleet.agent.pipeline.errors import PipelineError
        from facefleet.agent.pipeline.provenance import C2paSigningKey
        from facefleet.agent.pipeline.quality import QualityBelowThreshold
        from facefleet.agent.pipeline.runner import ProgressUpdate, SwapJob, SwapPipeline

        job = SwapJob(
            task_id=f"local-{uuid.uuid4().hex[:8]}",
            source_path=source,
            target_path=target,
            output_path=output,
            checkpoint_dir=checkpoint_dir or output.with_name(output.name + ".checkpoints"),
            face_selector=face_selector,
            reference_face_path=reference,
            blend=blend,
            mask=mask,
            enhance=enhance,
            min_id_similarity=min_id_similarity,
        )
        configure_logging("warning", "console")  # logs to stderr; stdout stays clean for --json

        def show(update: ProgressUpdate) -> None:
            if not as_json and update.stage in ("checkpoint", "done"):
                done = f"{update.stage}: {update.frames_done}/{update.frames_total} frames, {update.fps:.1f} fps"
                console.print(styled(done, "dim"))

        try:
            signer = C2paSigningKey.from_config(c2pa_cert, c2pa_key)
            pipeline = SwapPipeline.load(models, providers=provider or None, provenance_signer=signer)
            started = time.perf_counter()
            result = pipeline.run(job, show, threading.Event())
        except QualityBelowThreshold as exc:
            fail(
                f"{exc.reason_code}: {exc.message}",
                hint="use a sharper, frontal source photo, install the ONNX models, or lower --min-id-similarity",
            )
        except PipelineError as exc:
            fail(f"{exc.reason_code}: {exc.message}")
        elapsed = time.perf_counter() - started
        fps = result.frames_processed / elapsed if elapsed > 0 else 0.0
        report = {
            "output": str(result.output_path),
            "engine": result.engine,
            "engine_note": result.engine_note,
            "execution_providers": pipeline.execution_providers,
            "frames": result.frames,
            "frames_processed": result.frames_processed,
            "seconds": round(elapsed, 3),
            "fps": round(fps, 2),
            "faces_swapped": result.quality.faces_swapped,
            "id_similarity_mean": result.quality.id_similarity_mean,
            "id_similarity_min": result.quality.id_similarity_min,
            "stage_seconds": {k: round(v, 4) for k, v in result.stage_seconds.items()},
            "provenance": str(result.sidecar_path) if result.sidecar_path else None,
            "models": [m.__dict__ for m in pipeline.models],
        }
        if as_json:
            print_json(report)
            return
        table = Table(show_header=False)
        for key in (
            "output",
            "engine",
            "execution_providers",
            "frames",
            "fps",
            "faces_swapped",
            "id_similarity_mean",
            "id_similarity_min",
            "provenance",
        ):
            value = report[key]
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
        console.print(table)
        if result.engine != "onnx":
            console.print(line(styled("note:", "yellow"), f" {result.engine_note}"))
