"""Structured logging: one JSON object a line, or plain text for people.

:func:`configure_logging` sends the root logger to stderr through the service's handler
(:class:`~strongroom.runtime.log_writer.ServiceLog`: no thread that logs waits for the log's
destination), its refusal lines within a budget
(:class:`~strongroom.runtime.log_refusals.RefusalLines`); :func:`configured` does it for a
service's run, and gives the process its logging back when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from strongroom.runtime.config import LoggingConfig
from strongroom.runtime.log_writer import ServiceLog

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON with its ``extra`` fields and the active trace id, if any."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = _current_trace_id()
        if trace_id:
            out["trace_id"] = trace_id
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _fields(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The record's own fields (its ``extra``), but those whose name starts with ``_``."""
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            yield key, value


class TextFormatter(logging.Formatter):
    """Formats a record as one line for people: time, level, service, logger and message, with
    every non-printable character of the message shown as its escape, then each of its fields as
    ``name=<JSON>`` (the message alone said nothing of them: not how many refused calls a
    summary counted, nor why a call failed). Callers choose text lines carry (an RPC's method
    name reaches the authoriser's ``denied RPC`` with any character in it): written as it came,
    a newline forged a line of its own and an escape sequence drove the reader's terminal. A
    traceback (``exc_info``) keeps its lines, after the message."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line but a traceback: its message escaped, then its fields (see the class)."""
        record.message = _printable(record.message)
        line = super().formatMessage(record)
        fields = [f"{key}={json.dumps(value, default=str)}" for key, value in _fields(record)]
        return " ".join([line, *fields])


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _current_trace_id() -> str | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


# Libraries that log credentials at DEBUG: botocore writes each request's Authorization header
# (the S3 access key id and the request's signature), its string to sign and, with temporary
# credentials, the session token; urllib3 and s3transfer log the requests around it. They stay
# at INFO whatever the service's level, so DEBUG can be turned on in production without leaking.
QUIET_LIBRARIES = ("boto3", "botocore", "s3transfer", "urllib3")


def configure_logging(
    config: LoggingConfig, service: str, *, clock: Callable[[], float] = time.monotonic
) -> ServiceLog:
    """Sends the root logger to stderr in the configured format and level (the libraries in
    :data:`QUIET_LIBRARIES` never below INFO), refusal lines within their budget (paced by
    ``clock``); returns the handler."""
    handler = ServiceLog(sys.stderr, clock=clock)
    if config.format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    quiet = max(logging.INFO, root.level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    return handler


class _RootLogging:
    """What :func:`configure_logging` changes, as it was: the root logger's handlers and level,
    and the levels of :data:`QUIET_LIBRARIES`."""

    def __init__(self) -> None:
        root = logging.getLogger()
        self._handlers = root.handlers[:]
        self._level = root.level
        self._levels = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}

    def put_back(self) -> None:
        """Closes each root handler added since (a :class:`ServiceLog` writes what it queued
        and ends its writer thread), then puts the handlers and levels back. Closed first,
        while it is still the root's: a line logged during the close is still the service's,
        and none it queued is left to a writer that outlives it. Put back however the closes
        end: a close waits up to FLUSH_SECONDS for a slow destination, and a Ctrl-C there
        (KeyboardInterrupt) left the process the stopped service's handler and levels for good."""
        root = logging.getLogger()
        try:
            for handler in root.handlers[:]:
                if handler not in self._handlers:
                    handler.close()
        finally:
            root.handlers[:] = self._handlers
            root.setLevel(self._level)
            for name, level in self._levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def restoring() -> Iterator[None]:
    """Puts the root logger back as it was when this began, when it ends: each handler added
    closed, the handlers and levels :func:`configure_logging` changes as they were."""
    saved = _RootLogging()
    try:
        yield
    finally:
        saved.put_back()


@contextlib.contextmanager
def configured(config: LoggingConfig, service: str, *, keep: bool = False) -> Iterator[ServiceLog]:
    """:func:`configure_logging` for a service's run; when it ends (however it ends), the
    service's handler is closed (its queue written, its writer ended) and the root logger is as
    it was (:func:`restoring`), unless ``keep``: a process that ends with its service (its run
    inside :func:`~strongroom.runtime.lifetime.ends_with_the_process`) writes its last lines,
    the command line's error line among them, through it. Kept, a process that ran a service and went on logged to the stopped service's handler
    and level for good, its own handlers gone."""
    saved = _RootLogging()
    try:
        yield configure_logging(config, service)
    finally:
        if not keep:
            saved.put_back()
