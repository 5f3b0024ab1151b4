"""structlog set-up: JSON lines for machines (default), console rendering for people."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class StderrLogger:
    """Writes each rendered event to whatever `sys.stderr` is at that moment.

    Resolving the stream per call (rather than binding it at configuration time) keeps logging
    working when the stream is swapped, as test runners and daemonising wrappers do.
    """

    def msg(self, message: str) -> None:
        stream = sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except (ValueError, OSError):  # closed or broken stream: logging must never take a server down
            pass

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger_factory(*_args: Any) -> StderrLogger:
    return StderrLogger()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
