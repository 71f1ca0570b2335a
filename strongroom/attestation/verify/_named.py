"""Certificates supplied with evidence, split and named once per distinct bytes.

Every release request carries the same VCEK/VLEK certificate (or PEM bundle) for as long as the
platform's TCB is unchanged; splitting a bundle, parsing each certificate (under the loader's
global warnings lock) and reading its CN cost more than the report's own parse. Both are pure
functions of the bytes, so the result is memoised by those bytes. Only the *structure* is cached
here: the chain is still checked (or found in the trust store's validity-aware cache) per request.
Malformed bytes raise as before and are never cached.
"""

from __future__ import annotations

import functools

from strongroom.attestation.abi.certs import certificates_from_bytes, common_name, load_certificate

__all__ = ["named_certificates"]


@functools.lru_cache(maxsize=128)
def _named(blob: bytes) -> tuple[tuple[bytes, str], ...]:
    return tuple((der, common_name(load_certificate(der))) for der in certificates_from_bytes(blob))


def named_certificates(blob: bytes | bytearray | memoryview) -> tuple[tuple[bytes, str], ...]:
    """``(DER, subject CN)`` for each certificate in one DER certificate or PEM bundle."""
    return _named(bytes(blob))
