"""Whatever a parser of untrusted evidence raises, the caller gets MalformedEvidence, never the
library's own exception (which the release path would answer with INTERNAL).

The verifiers check lengths before they unpack, so these exceptions are not reachable with the
parsers as they are; the safety net is what keeps a future parser's oversight a clean refusal.
"""

from __future__ import annotations

import binascii
import struct
from datetime import UTC, datetime

import pytest

from strongroom.attestation import verify as verifiers
from strongroom.attestation.errors import MalformedEvidence
from strongroom.attestation.evidence import Evidence, TeeType
from strongroom.attestation.trust import TrustStore
from strongroom.reasons import Reason


def _struct_error() -> Exception:
    try:
        struct.unpack("<I", b"\0")
    except struct.error as exc:
        return exc
    raise AssertionError("struct.unpack accepted one byte as a u32")


@pytest.mark.parametrize(
    "raised",
    [
        _struct_error(),
        IndexError("index out of range"),
        KeyError("x"),
        OverflowError("int too large"),
        ZeroDivisionError("division by zero"),
        binascii.Error("bad base64"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        TypeError("unexpected type"),
        RecursionError("maximum recursion depth exceeded"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_a_parser_failure_is_malformed_evidence(
    raised: Exception, production: TrustStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def verifier(*args: object, **kwargs: object) -> object:
        raise raised

    monkeypatch.setattr(verifiers, "_verifier", lambda tee_type: verifier)
    with pytest.raises(MalformedEvidence) as caught:
        verifiers.verify_evidence(
            Evidence(TeeType.SEV_SNP, b"\0" * 1184), trust=production, now=datetime.now(UTC)
        )
    assert caught.value.reason == Reason.UNPARSEABLE_INPUT
    assert type(raised).__name__ in caught.value.message


def test_a_bug_outside_parsing_is_not_disguised(
    production: TrustStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error no parser raises (here a missing attribute) stays what it is: a server fault.
    def verifier(*args: object, **kwargs: object) -> object:
        raise AttributeError("no such attribute")

    monkeypatch.setattr(verifiers, "_verifier", lambda tee_type: verifier)
    with pytest.raises(AttributeError):
        verifiers.verify_evidence(
            Evidence(TeeType.SEV_SNP, b"\0" * 1184), trust=production, now=datetime.now(UTC)
        )
