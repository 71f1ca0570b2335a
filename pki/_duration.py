"""Durations as people write them (``90s``, ``5m``, ``1h30m``) and as step-ca's Go code reads them."""

from __future__ import annotations

import re
from datetime import timedelta

from strongroom.pki.errors import InvalidPkiConfig
from strongroom.reasons import Reason

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> timedelta:
    """Parses ``1h``, ``5m``, ``30s``, ``1h30m``, ``250ms`` or ``2d`` into a positive timedelta."""
    compact = text.strip()
    if not compact:
        raise InvalidPkiConfig("empty duration", reason=Reason.INVALID_DURATION)
    position = 0
    seconds = 0.0
    for match in _PART.finditer(compact):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise InvalidPkiConfig(
            f"malformed duration {text!r}: use e.g. 30s, 5m, 1h30m", reason=Reason.INVALID_DURATION
        )
    if seconds <= 0:
        raise InvalidPkiConfig(
            f"duration {text!r} must be positive", reason=Reason.INVALID_DURATION
        )
    return timedelta(seconds=seconds)


def go_duration(value: timedelta) -> str:
    """Formats a duration for step-ca (Go's ``time.ParseDuration``), in whole milliseconds."""
    millis = round(value.total_seconds() * 1000)
    if millis <= 0:
        raise InvalidPkiConfig(f"duration {value} must be positive", reason=Reason.INVALID_DURATION)
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"
