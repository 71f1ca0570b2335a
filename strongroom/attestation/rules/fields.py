"""Strict readers for the fields of a release-policy document (shared by every TEE's rules).

Each reader takes the mapping a field sits in, the key and the path of the mapping (``"tdx"``,
``"sev_snp.min_reported_tcb"``) and returns a typed value or raises :class:`PolicyInvalid` naming the
field path, what is wrong and a ``POLICY_*`` reason code. Nothing is coerced: ``"1"`` is not an
integer and ``"no"`` is not a boolean; an empty allow-list is an error, never "allow everything".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from strongroom.attestation.errors import PolicyInvalid
from strongroom.reasons import Reason

_HEX = re.compile(r"\A[0-9a-fA-F]*\Z")


def fail(where: str, what: str, reason: str) -> PolicyInvalid:
    """The load error for the field at ``where``."""
    return PolicyInvalid(f"policy {where}: {what}", reason=reason)


def mapping(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed``."""
    if not isinstance(value, dict):
        raise fail(where, "must be a mapping", Reason.POLICY_BAD_TYPE)
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise fail(where, f"unknown key(s) {unknown}", Reason.POLICY_UNKNOWN_KEY)
    return value


def boolean(section: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    """A ``true``/``false`` field."""
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise fail(f"{where}.{key}", "must be true or false", Reason.POLICY_BAD_TYPE)
    return value


def integer(section: Mapping[str, Any], key: str, default: int, where: str, hi: int) -> int:
    """An integer field in ``0..hi`` (a boolean is not an integer here)."""
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise fail(f"{where}.{key}", f"must be an integer 0..{hi}", Reason.POLICY_BAD_VALUE)
    return value


def allow_list(
    section: Mapping[str, Any], key: str, where: str, *, required: bool
) -> list[Any] | None:
    """A non-empty list, or None when an optional list is absent."""
    if key not in section:
        if required:
            raise fail(f"{where}.{key}", "is required", Reason.POLICY_MISSING_KEY)
        return None
    value = section[key]
    if not isinstance(value, list):
        raise fail(f"{where}.{key}", "must be a list", Reason.POLICY_BAD_TYPE)
    if not value:
        raise fail(
            f"{where}.{key}",
            "is an empty allow-list, which would allow nothing; remove it or list values",
            Reason.POLICY_EMPTY_ALLOW_LIST,
        )
    return value


def hex_set(
    section: Mapping[str, Any], key: str, size: int, where: str, *, required: bool = False
) -> frozenset[bytes] | None:
    """An allow-list of hex strings of exactly ``size`` bytes, or None when optional and absent."""
    items = allow_list(section, key, where, required=required)
    if items is None:
        return None
    out = set()
    for item in items:
        if not isinstance(item, str) or not _HEX.match(item) or len(item) != 2 * size:
            raise fail(
                f"{where}.{key}",
                f"entries must be {2 * size} hex characters ({size} bytes)",
                Reason.POLICY_BAD_HEX,
            )
        out.add(bytes.fromhex(item))
    return frozenset(out)


def required_hex_set(
    section: Mapping[str, Any], key: str, size: int, where: str
) -> frozenset[bytes]:
    """A required allow-list of hex strings of exactly ``size`` bytes."""
    items = hex_set(section, key, size, where, required=True)
    assert items is not None  # required=True never returns None
    return items


def choices(
    section: Mapping[str, Any],
    key: str,
    allowed: tuple[str, ...],
    default: tuple[str, ...] | None,
    where: str,
) -> frozenset[str] | None:
    """An allow-list drawn from ``allowed``; ``default`` (or None) when absent."""
    items = allow_list(section, key, where, required=False)
    if items is None:
        return frozenset(default) if default is not None else None
    for item in items:
        if item not in allowed:
            raise fail(
                f"{where}.{key}", f"{item!r} is not one of {list(allowed)}", Reason.POLICY_BAD_VALUE
            )
    return frozenset(items)
