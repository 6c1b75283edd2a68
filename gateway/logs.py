"""Structured JSON logs (structlog) and the audit log: one line per request.

Log events are names with key-value fields (`log.info("policy_reloaded", file=...)`), never
%-formatted strings. The audit line holds prompt text only when `--audit-prompts` asks for it
(redacted or raw); the logs never do."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import orjson
import structlog


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """JSON lines to stderr (or `stream`) for our loggers and the libraries' stdlib loggers."""
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer(_dumps)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(_dumps), foreign_pre_chain=shared
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # litellm logs request bodies at DEBUG/INFO: keep it quiet so prompts never reach the logs.
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore", "presidio-analyzer", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Stderr:
    """sys.stderr as it is when a line is written (a test runner swaps it per command)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def logs_to_stderr() -> None:
    """structlog's lines on stderr, for a CLI command that prints data on stdout: unconfigured,
    structlog prints on stdout. Only the stream changes; `serve` configures the rest."""
    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _Stderr())))


class AuditLog:
    """One JSON line per request: who, which rule and target, fallbacks, entity counts, latency
    (and the messages, redacted or raw, when `audit_prompts` says so)."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._fh: TextIO | None = None
        if path and path != "-":
            self._fh = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the app

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._path is None:
            return
        line = _dumps(record) + "\n"
        if self._fh is not None:
            self._fh.write(line)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
