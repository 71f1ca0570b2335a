"""Syntax of model names, versions, name prefixes, digests and key ids, checked at every entry point.

A name is one or more ``/``-separated segments (``acme/fraud-detector``), each starting with a
letter or digit and continuing with letters, digits, ``.``, ``_`` or ``-``; at most
:data:`MAX_NAME_LENGTH` characters. A version starts with a letter or digit and continues with
letters, digits, ``.``, ``_``, ``+`` or ``-`` (``1.4.0+build.7``); at most
:data:`MAX_VERSION_LENGTH` characters. Everything is ASCII, so byte order equals character order
and listings sort the same way in every backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason

MAX_NAME_LENGTH = 128
MAX_VERSION_LENGTH = 64

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
#: The model-name grammar (use with ``fullmatch``); the artifact format and every service use it.
MODEL_NAME_PATTERN = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
#: The model-version grammar (use with ``fullmatch``).
MODEL_VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
#: A key broker's key id (use with ``fullmatch``): 1-63 characters of ``[a-z0-9._-]`` starting
#: with a letter or digit, so it is also a file name (its policy) and a PKCS#11 label segment. The
#: artifact format admits a wider grammar (other key managers' ids); this broker issues only these.
KEY_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: A key broker's decision id (use with ``fullmatch``): what its audit records and release answers
#: carry, 1-64 characters of ``[A-Za-z0-9._-]`` (a UUID, as the broker makes them).
DECISION_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The highest key version a broker numbers (versions start at 1; a signed 32-bit field).
MAX_KEY_VERSION = 2**31 - 1
_NAME = MODEL_NAME_PATTERN
_VERSION = MODEL_VERSION_PATTERN
_PREFIX = re.compile(r"[A-Za-z0-9._/-]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def validate_name(name: str) -> str:
    """Returns ``name`` if it is a valid model name, else raises InvalidArgument(INVALID_MODEL_NAME)."""
    if not name:
        raise InvalidArgument("model name is empty", reason=Reason.INVALID_MODEL_NAME)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"model name is longer than {MAX_NAME_LENGTH} characters",
            reason=Reason.INVALID_MODEL_NAME,
        )
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            "model name must be '/'-separated segments of letters, digits, '.', '_' or '-', "
            "each starting with a letter or digit",
            reason=Reason.INVALID_MODEL_NAME,
        )
    return name


def validate_key_version(version: object) -> int:
    """Returns ``version`` if it is a key version a broker numbers (an int in
    1..:data:`MAX_KEY_VERSION`), else raises InvalidArgument(KEY_VERSION_INVALID).

    The one rule for every entry point that takes a KEK version: the broker's key administration
    and the store's key-slot replacement (whose wire field is 32 bits unsigned, twice the range).
    """
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= MAX_KEY_VERSION
    ):
        raise InvalidArgument(
            f"a key version is an integer in 1..{MAX_KEY_VERSION}",
            reason=Reason.KEY_VERSION_INVALID,
        )
    return version


def validate_version(version: str) -> str:
    """Returns ``version`` if valid, else raises InvalidArgument(INVALID_MODEL_VERSION)."""
    if not version:
        raise InvalidArgument("model version is empty", reason=Reason.INVALID_MODEL_VERSION)
    if len(version) > MAX_VERSION_LENGTH:
        raise InvalidArgument(
            f"model version is longer than {MAX_VERSION_LENGTH} characters",
            reason=Reason.INVALID_MODEL_VERSION,
        )
    if not _VERSION.fullmatch(version):
        raise InvalidArgument(
            "model version must be letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit",
            reason=Reason.INVALID_MODEL_VERSION,
        )
    return version


def validate_prefix(prefix: str) -> str:
    """Returns ``prefix`` if it uses only name characters (it may be empty), else InvalidArgument."""
    if len(prefix) > MAX_NAME_LENGTH or not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(
            f"name prefix must be at most {MAX_NAME_LENGTH} letters, digits, '.', '_', '/' or '-'",
            reason=Reason.INVALID_NAME_PREFIX,
        )
    return prefix


def is_name_rule(rule: object) -> bool:
    """Whether ``rule`` is a model-name rule: a model name (that model), or a model name followed
    by ``/`` (every model under it). Policies and configuration use them to scope names."""
    if not isinstance(rule, str):
        return False
    name = rule[:-1] if rule.endswith("/") else rule
    return 0 < len(name) <= MAX_NAME_LENGTH and bool(_NAME.fullmatch(name))


def name_rule_problem(rules: Iterable[object]) -> str | None:
    """Why ``rules`` are not all model-name rules (naming the first that is not), else None."""
    for rule in rules:
        if not is_name_rule(rule):
            return f"{rule!r} is not a model name, or a model name followed by '/' (everything under it)"
    return None


def name_rule_matches(rule: str, name: str) -> bool:
    """Whether model ``name`` falls under ``rule`` (see :func:`is_name_rule`): ``tenant-a/``
    covers ``tenant-a/m`` and ``tenant-a/x/m``, not ``tenant-a`` nor ``tenant-ab/m``."""
    return name.startswith(rule) if rule.endswith("/") else name == rule


def is_sha256_hex(digest: object) -> bool:
    """Whether ``digest`` is 64 lower-case hex digits (a SHA-256 as Strongroom writes it)."""
    return isinstance(digest, str) and bool(_SHA256_HEX.fullmatch(digest))


def validate_sha256_hex(digest: str) -> str:
    """Returns ``digest`` if it is 64 lower-case hex digits, else InvalidArgument(INVALID_SHA256)."""
    if not _SHA256_HEX.fullmatch(digest):
        raise InvalidArgument(
            "artifact_sha256 must be 64 lower-case hexadecimal digits", reason=Reason.INVALID_SHA256
        )
    return digest
