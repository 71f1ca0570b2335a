"""Structured logging: one JSON object a line, or plain text for people."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from strongroom.runtime.config import LoggingConfig

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
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _current_trace_id() -> str | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


# Libraries that log credentials at DEBUG: botocore writes each request's Authorization header
# (the S3 access key id and the request's signature), its string to sign and, with temporary
# credentials, the session token; urllib3 and s3transfer log the requests around it. They stay
# at INFO whatever the service's level, so DEBUG can be turned on in production without leaking.
QUIET_LIBRARIES = ("boto3", "botocore", "s3transfer", "urllib3")


def configure_logging(config: LoggingConfig, service: str) -> None:
    """Sends the root logger to stderr in the configured format and level (the libraries in
    :data:`QUIET_LIBRARIES` never below INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    quiet = max(logging.INFO, root.level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
