"""Pipeline errors with a machine-readable reason (an `ErrorReason` name from types.proto)."""

from __future__ import annotations


class PipelineError(Exception):
    """A swap job could not run; `reason_code` is an ErrorReason name the agent reports."""

    reason_code = "INTERNAL"

    def __init__(self, message: str, reason_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason_code is not None:
            self.reason_code = reason_code


class InputRejected(PipelineError):
    """Corrupt, oversized, or wrong-type source/target media."""

    reason_code = "INPUT_REJECTED"


class ModelVerificationFailed(PipelineError):
    """A model file is missing, tampered (sha256) or does not match its manifest signature."""

    reason_code = "MODEL_VERIFICATION_FAILED"


class ProviderUnavailable(PipelineError):
    """A requested ONNX Runtime execution provider is not available on this machine."""

    reason_code = "PROVIDER_UNAVAILABLE"


class ToolMissing(PipelineError):
    """A program the job needs (ffmpeg, ffprobe) is not installed on this agent: the agent's fault,
    not the input's, and not a crash; the task fails with this reason and may run on another agent."""

    reason_code = "PROVIDER_UNAVAILABLE"


class Cancelled(PipelineError):
    """The job was cancelled; completed checkpoint segments are kept for a resume."""

    reason_code = "CANCELLED"

    def __init__(self, message: str, checkpoint_frame: int = 0) -> None:
        super().__init__(message)
        self.checkpoint_frame = checkpoint_frame  # frames safely checkpointed; a resume starts here
