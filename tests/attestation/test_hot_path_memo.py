"""The release path's memos: supplied certificates and public keys parsed once per distinct bytes.

Each memo must give exactly what the uncached functions give, accept any bytes-like input, and
never remember a failure: malformed input is refused every time, even right after good input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from strongroom.attestation import binding
from strongroom.attestation.abi.certs import certificates_from_bytes, common_name, load_certificate
from strongroom.attestation.binding import report_data_for
from strongroom.attestation.errors import MalformedEvidence
from strongroom.attestation.verify._named import named_certificates
from strongroom.errors import InvalidArgument

NONCE = bytes(range(32))


def _spki() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    "name", ["milan_v2_virtee_vcek.der", "milan_v2_azure_trustee_vcek_chain.pem"]
)
def test_named_certificates_match_the_uncached_parse(vectors: Path, name: str) -> None:
    blob = (vectors / "snp" / name).read_bytes()
    expected = tuple(
        (der, common_name(load_certificate(der))) for der in certificates_from_bytes(blob)
    )
    assert named_certificates(blob) == expected
    assert named_certificates(bytearray(blob)) == expected
    assert named_certificates(memoryview(blob)) is named_certificates(blob)
    assert expected[0][1] == "SEV-VCEK"


def test_malformed_certificates_are_refused_every_time(vectors: Path) -> None:
    good = (vectors / "snp" / "milan_v2_virtee_vcek.der").read_bytes()
    bad = good[:-7]
    for _ in range(2):
        named_certificates(good)
        with pytest.raises(MalformedEvidence):
            named_certificates(bad)
    with pytest.raises(MalformedEvidence):
        named_certificates(b"-----BEGIN NOTHING-----\n")


def test_report_data_checks_every_key_even_after_a_good_one_was_seen() -> None:
    eph, tls = _spki(), _spki()
    first = report_data_for(NONCE, eph, tls)
    assert report_data_for(NONCE, bytes(bytearray(eph)), tls) == first
    for bad in (tls[:-1], tls + b"\x00", b"\x30\x00"):
        for _ in range(2):
            with pytest.raises(InvalidArgument) as info:
                report_data_for(NONCE, eph, bad)
            assert info.value.reason == "BAD_PUBLIC_KEY"
    assert report_data_for(NONCE, eph, tls) == first


def test_the_key_memo_stays_small_as_keys_come_and_go() -> None:
    # Every certificate renewal brings a caller a new TLS key and every production release a new
    # ephemeral key: a memo of 256 keys (~0.25 KiB each) would fill with keys that never return
    # for ~10 minutes of renewals at 60 s certificates, which a soak reads as growth.
    for _ in range(40):
        report_data_for(NONCE, _spki(), _spki())
    assert binding._parses_as_spki.cache_info().currsize <= 32
