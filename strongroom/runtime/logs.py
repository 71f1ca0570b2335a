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
    ``clock``); returns the handler. Each change it makes, it reports to every open
    :func:`restoring` (through :func:`_set_handlers` and :func:`_set_level`), which gives it
    back: a change made any other way would outlive the service's run."""
    handler = ServiceLog(sys.stderr, clock=clock)
    if config.format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(TextFormatter(service))
    root = logging.getLogger()
    _set_handlers(root, [handler])
    _set_level(root, config.level)
    quiet = max(logging.INFO, root.level)
    for name in QUIET_LIBRARIES:
        _set_level(logging.getLogger(name), quiet)
    return handler


class Changed:
    """What :func:`configure_logging` changed while one :func:`restoring` was open, each as it
    was before the first change: loggers' handlers and levels. Reported by the change itself,
    not listed beside it: the list kept by hand could miss what a later change added."""

    def __init__(self) -> None:
        self.handlers: dict[logging.Logger, list[logging.Handler]] = {}
        self.levels: dict[logging.Logger, int] = {}

    def put_back(self) -> None:
        """Closes each handler added since to a logger whose handlers changed (a
        :class:`ServiceLog` writes what it queued and ends its writer thread), then puts the
        handlers and levels back. Closed first, while it is still the logger's: a line logged
        during the close is still the service's, and none it queued is left to a writer that
        outlives it. Put back however the closes end: a close waits up to FLUSH_SECONDS for a
        slow destination, and a Ctrl-C there (KeyboardInterrupt) left the process the stopped
        service's handler and levels for good."""
        try:
            for logger, before in self.handlers.items():
                for handler in logger.handlers[:]:
                    if handler not in before:
                        handler.close()
        finally:
            for logger, before in self.handlers.items():
                logger.handlers[:] = before
            for logger, level in self.levels.items():
                logger.setLevel(level)


class _Open:
    """The :func:`restoring` scopes open now (the innermost last)."""

    scopes: list[Changed] = []


def _set_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    """Makes ``handlers`` ``logger``'s, reported to each open :func:`restoring`."""
    for changed in _Open.scopes:
        changed.handlers.setdefault(logger, logger.handlers[:])
    logger.handlers[:] = handlers


def _set_level(logger: logging.Logger, level: int | str) -> None:
    """Sets ``logger``'s level, reported to each open :func:`restoring`."""
    for changed in _Open.scopes:
        changed.levels.setdefault(logger, logger.level)
    logger.setLevel(level)


@contextlib.contextmanager
def restoring(*, keep: bool = False) -> Iterator[Changed]:
    """Puts back, when it ends (however it ends), what :func:`configure_logging` changed in it
    (:meth:`Changed.put_back`: each handler added closed, the handlers and levels as they
    were); unless ``keep``. Yields what it records."""
    changed = Changed()
    _Open.scopes.append(changed)
    try:
        yield changed
    finally:
        _Open.scopes.remove(changed)  # by identity: Changed has no equality of its own
        if not keep:
            changed.put_back()


@contextlib.contextmanager
def configured(config: LoggingConfig, service: str, *, keep: bool = False) -> Iterator[ServiceLog]:
    """:func:`configure_logging` for a service's run; when it ends (however it ends), the
    service's handler is closed (its queue written, its writer ended) and the loggers are as
    they were (:func:`restoring`), unless ``keep``: a process that ends with its service (its
    run inside :func:`~strongroom.runtime.lifetime.ends_with_the_process`) writes its last
    lines, the command line's error line among them, through it. Kept, a process that ran a
    service and went on logged to the stopped service's handler and level for good, its own
    handlers gone."""
    with restoring(keep=keep):
        yield configure_logging(config, service)
