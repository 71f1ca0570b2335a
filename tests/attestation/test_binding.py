"""REPORT_DATA binding: exact 64 bytes, domain separation, constant-time full comparison."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from strongroom.attestation import VerificationFailed
from strongroom.attestation.binding import (
    check_report_data,
    client_report_data_for,
    report_data_for,
)
from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason
from tests.keybroker.helpers import ec_spki_on_an_unsupported_curve


def spki(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


EPH = spki(rsa.generate_private_key(65537, 2048))
TLS = spki(ec.generate_private_key(ec.SECP256R1()))
TLS2 = spki(ec.generate_private_key(ec.SECP256R1()))
NONCE = bytes(range(32))


def test_report_data_is_64_bytes_and_deterministic() -> None:
    rd = report_data_for(NONCE, EPH, TLS)
    assert len(rd) == 64 and rd == report_data_for(NONCE, EPH, TLS)
    check_report_data(rd, report_data_for(NONCE, EPH, TLS))


def test_every_field_and_the_label_matter() -> None:
    base = report_data_for(NONCE, EPH, TLS)
    assert base != report_data_for(bytes(32), EPH, TLS)
    assert base != report_data_for(NONCE, EPH, TLS2)
    assert base != report_data_for(NONCE, TLS, EPH)
    assert base != client_report_data_for(NONCE, TLS)
    assert client_report_data_for(NONCE, TLS) != client_report_data_for(NONCE, TLS2)


def test_bound_to_another_key_is_rejected() -> None:
    with pytest.raises(VerificationFailed) as err:
        check_report_data(report_data_for(NONCE, EPH, TLS2), report_data_for(NONCE, EPH, TLS))
    assert err.value.reason == Reason.REPORT_DATA_MISMATCH


@pytest.mark.parametrize("claimed", [b"", bytes(32), bytes(63), bytes(65)])
def test_no_padding_or_truncation(claimed: bytes) -> None:
    expected = report_data_for(NONCE, EPH, TLS)
    with pytest.raises(VerificationFailed):
        check_report_data(claimed + expected[len(claimed) :][:0], expected)
    with pytest.raises(VerificationFailed):
        check_report_data(expected[:32] + bytes(32), expected)
    with pytest.raises(VerificationFailed):
        check_report_data(expected + b"\0", expected)


def test_expected_value_is_required() -> None:
    with pytest.raises(InvalidArgument):
        check_report_data(bytes(64), b"")
    with pytest.raises(InvalidArgument):
        check_report_data(bytes(64), hashlib.sha256(b"x").digest())


def test_inputs_are_validated() -> None:
    with pytest.raises(InvalidArgument):
        report_data_for(b"short", EPH, TLS)
    with pytest.raises(InvalidArgument):
        report_data_for(NONCE, b"not a key", TLS)
    # cryptography raises UnsupportedAlgorithm (not a ValueError) for an EC key on a curve it
    # cannot load: a caller-chosen ephemeral key like that escaped as an untyped error.
    with pytest.raises(InvalidArgument):
        report_data_for(NONCE, ec_spki_on_an_unsupported_curve(), TLS)
    with pytest.raises(InvalidArgument):
        client_report_data_for(NONCE, b"")
