"""The release-signing keys an inference server trusts, and what it makes of an answer's signature.

(The exchange itself, over real mTLS against a real broker and an impersonating one, is
tests/e2e/test_release_signature.py's.)"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from strongroom.attestation.release_keys import NOT_BEFORE_LEEWAY, load_trusted_keys
from strongroom.attestation.release_signature import (
    ReleaseSigner,
    ReleaseStatement,
    ReleaseVerifier,
    load_signing_key,
    signing_key_id,
)
from strongroom.errors import StrongroomError
from tests.certs import oddly_dated_pem, self_signed_pem

STATEMENT = ReleaseStatement(
    nonce=b"n" * 89,
    ephemeral_public_key_der=b"spki",
    key_id="models-kek",
    key_version=3,
    request_wrapped_key=b"slot",
    mechanism=2,
    released_wrapped_key=b"wrapped",
    decision_id="d" * 32,
    policy_version="p1",
)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_each_field_is_length_prefixed_under_its_own_label() -> None:
    message = STATEMENT.message()
    assert message.startswith(b"strongroom/keybroker/release-response/v1\x00")
    # Moving a byte from one field to the next changes the message (no ambiguous boundary).
    shifted = ReleaseStatement(
        **{**vars(STATEMENT), "key_id": "models-ke", "policy_version": "tp1"}
    )
    assert shifted.message() != message


def test_a_bundle_of_keys_and_certificates_is_read_whole(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    bundle = tmp_path / "keys.pem"
    bundle.write_bytes(_pem(old) + self_signed_pem(new, "release-signing"))
    verifier = ReleaseVerifier.from_files([bundle])
    assert verifier.key_ids == (
        signing_key_id(old.public_key()),
        signing_key_id(new.public_key()),
    )
    for key in (old, new):
        signed = ReleaseSigner(key).sign(STATEMENT)
        assert verifier.verify(STATEMENT, signed.signature, signed.key_id)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a key",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
)
def test_anything_but_ed25519_public_keys_is_refused(pem: bytes) -> None:
    with pytest.raises(StrongroomError) as info:
        load_trusted_keys(pem, source="keys.pem")
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert "keys.pem" in info.value.message


def _csr(key: Ed25519PrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "release-signing")])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, None)
    return request.public_bytes(serialization.Encoding.PEM)


def _private_pems(key: Ed25519PrivateKey) -> list[bytes]:
    """The key as PKCS#8, and an EC key in OpenSSL's traditional form (another label)."""
    return [
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    ]


@pytest.mark.parametrize("after", [False, True])
def test_a_private_key_beside_a_certificate_is_refused_and_never_shown(
    tmp_path: Path, after: bool
) -> None:
    """A block of another type beside a key or certificate was passed over in silence: an
    operator who pasted the broker's private key into the inference servers' trust file (which
    anyone who reads it could then sign answers with) heard nothing."""
    key = Ed25519PrivateKey.generate()
    for private in _private_pems(key):
        blocks = [self_signed_pem(key, "release-signing"), private]
        bundle = tmp_path / "keys.pem"
        bundle.write_bytes(b"".join(reversed(blocks) if after else blocks))
        with pytest.raises(StrongroomError) as info:
            ReleaseVerifier.from_files([bundle])
        refused = info.value
        assert refused.reason == "RELEASE_SIGNING_KEY_INVALID"
        assert str(bundle) in refused.message and "is a private key" in refused.message
        assert f"PEM block {1 if after else 2}" in refused.message
        for line in private.splitlines()[1:-1]:  # nothing of the key's body
            assert line.decode() not in refused.message and line.decode() not in repr(refused)


def _one_line(private: bytes, begin_closed_by: bytes) -> bytes:
    """``private`` as one line (its line ends lost), its BEGIN line closed by ``begin_closed_by``."""
    body = b"".join(private.splitlines()[1:-1])
    return b"-----BEGIN PRIVATE KEY" + begin_closed_by + body + b"-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda pem: _one_line(pem, b""), id="begin-dashes-lost-one-line"),
        pytest.param(lambda pem: _one_line(pem, b"----"), id="begin-dash-lost-one-line"),
        pytest.param(lambda pem: pem.replace(b"KEY-----\n", b"KEY----\n", 1), id="begin-dash-lost"),
        pytest.param(
            lambda pem: pem.replace(b"BEGIN PRIVATE", b"BEGIN RSA-PSS PRIVATE"), id="hyphen-label"
        ),
        pytest.param(
            lambda pem: pem.replace(b"BEGIN PRIVATE KEY", b"BEGIN Private Key"), id="lower"
        ),
    ],
)
def test_a_private_key_with_a_damaged_begin_line_is_refused_and_never_shown(
    damage: Callable[[bytes], bytes],
) -> None:
    """Its type was read as everything up to the first "-----" without a hyphen: a BEGIN line
    that lost its closing dashes, on a key pasted as one line, ran on into the key's body, which
    the refusal then quoted as its type (an Ed25519 key's 64 characters fit); one that lost a
    dash, or a label with a hyphen (RFC 7468 allows them), was passed over in silence."""
    key = Ed25519PrivateKey.generate()
    private = _private_pems(key)[0]  # PKCS#8
    body = b"".join(private.splitlines()[1:-1]).decode()
    with pytest.raises(StrongroomError) as info:
        load_trusted_keys(_pem(key) + damage(private), source="keys.pem")
    refused = info.value
    assert refused.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert refused.message.startswith("keys.pem: PEM block 2 is a private key (")
    said = refused.message + repr(refused)
    assert not [body[i : i + 12] for i in range(len(body) - 12) if body[i : i + 12] in said]


def test_a_public_key_whose_begin_line_lost_a_dash_is_refused() -> None:
    """Beside a key that parses, it was passed over in silence: the operator believed it trusted."""
    key = Ed25519PrivateKey.generate()
    damaged = _pem(Ed25519PrivateKey.generate()).replace(b"KEY-----\n", b"KEY----\n", 1)
    with pytest.raises(StrongroomError) as info:
        load_trusted_keys(_pem(key) + damaged, source="keys.pem")
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert info.value.message.startswith("keys.pem: PEM block 2 has its BEGIN line damaged")


def test_a_block_of_another_type_beside_a_key_is_refused_naming_it() -> None:
    """A certificate signing request (pasted for the certificate it was meant to become) beside
    a public key: refused, naming its type and the file, not passed over."""
    key = Ed25519PrivateKey.generate()
    with pytest.raises(StrongroomError) as info:
        load_trusted_keys(_pem(key) + _csr(key), source="keys.pem")
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert info.value.message.startswith("keys.pem: PEM block 2 is of type 'CERTIFICATE REQUEST'")


def test_a_certificate_cut_short_beside_a_key_is_refused() -> None:
    """Its END line lost (a paste cut short): it was passed over as if it were not there."""
    key = Ed25519PrivateKey.generate()
    cut = self_signed_pem(key, "release-signing").rsplit(b"-----END", 1)[0]
    with pytest.raises(StrongroomError) as info:
        load_trusted_keys(cut + _pem(key), source="keys.pem")
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert "PEM block 1 ('CERTIFICATE') does not parse" in info.value.message


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda pem: pem.replace(b"\n", b" \n"), id="trailing-spaces"),
        pytest.param(lambda pem: pem.replace(b"\n", b"\n  "), id="indented"),
    ],
)
def test_a_key_with_blanks_on_its_lines_is_refused_saying_so(
    damage: Callable[[bytes], bytes],
) -> None:
    """openssl reads a block whose lines carry spaces, so its base64 looks right to whoever
    checks it: "its body holds something other than base64" sent them looking for what was not
    there. Beside a key that parses, it used to be passed over; it is refused naming the blanks."""
    key = Ed25519PrivateKey.generate()
    with pytest.raises(StrongroomError) as info:
        load_trusted_keys(_pem(key) + damage(_pem(Ed25519PrivateKey.generate())), source="k")
    assert info.value.message.startswith("k: PEM block 2 ('PUBLIC KEY') does not parse")
    assert "spaces or tabs before or after it" in info.value.message


def test_text_between_blocks_is_still_allowed() -> None:
    """Bundles made by ``openssl x509 -text`` or annotated by hand keep their comments."""
    key = Ed25519PrivateKey.generate()
    pem = b"# the broker's key\n" + _pem(key) + b"subject=CN=release-signing\n"
    assert [k.source for k in load_trusted_keys(pem, source="keys.pem")] == ["keys.pem"]


def test_a_missing_file_and_an_empty_list_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StrongroomError) as info:
        ReleaseVerifier.from_files([tmp_path / "absent.pem"])
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    with pytest.raises(StrongroomError) as info:
        ReleaseVerifier([])
    assert info.value.reason == "RELEASE_SIGNING_KEY_MISSING"


def test_the_signing_key_is_ed25519_only() -> None:
    key = Ed25519PrivateKey.generate()
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert signing_key_id(load_signing_key(pkcs8).public_key()) == signing_key_id(key.public_key())
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for raw in (other, b"short", b""):
        with pytest.raises(StrongroomError) as info:
            load_signing_key(raw)
        assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert "key_id=" in repr(ReleaseSigner(key)) and "PRIVATE" not in repr(ReleaseSigner(key))


def test_unsigned_answers_pass_only_when_allowed() -> None:
    key = Ed25519PrivateKey.generate()
    strict = ReleaseVerifier([key.public_key()])
    with pytest.raises(StrongroomError) as info:
        strict.verify(STATEMENT, b"", b"")
    assert (info.value.reason, info.value.status_name) == ("RELEASE_UNSIGNED", "UNAUTHENTICATED")
    assert ReleaseVerifier([], allow_unsigned=True).verify(STATEMENT, b"", b"") is False
    # Allowed unsigned or not, a signature that is there is judged.
    lenient = ReleaseVerifier([key.public_key()], allow_unsigned=True)
    signed = ReleaseSigner(key).sign(STATEMENT)
    with pytest.raises(StrongroomError) as info:
        lenient.verify(STATEMENT, signed.signature[:-1], signed.key_id)
    assert info.value.reason == "RELEASE_SIGNATURE_INVALID"


def test_a_statement_differing_in_any_field_fails() -> None:
    key = Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    verifier = ReleaseVerifier([key.public_key()])
    for name, value in vars(STATEMENT).items():
        changed = (value + 1) if isinstance(value, int) else value + value[:1]
        altered = ReleaseStatement(**{**vars(STATEMENT), name: changed})
        with pytest.raises(StrongroomError) as info:
            verifier.verify(altered, signed.signature, signed.key_id)
        assert info.value.reason == "RELEASE_SIGNATURE_INVALID", name


# A key given as a certificate is trusted only within the certificate's validity; before, only
# its public key was read and a retired or stolen key stayed trusted for ever.
ISSUED = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
ENDS = dt.datetime(2030, 7, 1, tzinfo=dt.UTC)


class Clock:
    """The verifier's clock, set by the test."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def _certified(tmp_path: Path, key: Ed25519PrivateKey, clock: Clock) -> ReleaseVerifier:
    bundle = tmp_path / "release-keys.pem"
    bundle.write_bytes(
        self_signed_pem(key, "release-signing 2030", not_before=ISSUED, not_after=ENDS)
    )
    return ReleaseVerifier.from_files([bundle], clock=clock, warn_within=dt.timedelta(days=30))


def test_a_certified_key_is_trusted_only_within_its_certificates_validity(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    clock = Clock(ISSUED + dt.timedelta(days=1))
    verifier = _certified(tmp_path, key, clock)
    assert verifier.verify(STATEMENT, signed.signature, signed.key_id)
    clock.now = ENDS  # notAfter is the last instant of the validity
    assert verifier.verify(STATEMENT, signed.signature, signed.key_id)

    clock.now = ENDS + dt.timedelta(seconds=1)
    with pytest.raises(StrongroomError) as info:
        verifier.verify(STATEMENT, signed.signature, signed.key_id)
    assert (info.value.status_name, info.value.reason) == (
        "UNAUTHENTICATED",
        "RELEASE_SIGNING_KEY_EXPIRED",
    )
    # It names the key (its file and certificate) and when and why.
    assert "release-keys.pem" in info.value.message
    assert "CN=release-signing 2030" in info.value.message
    assert "expired at 2030-07-01T00:00:00+00:00" in info.value.message
    # The file and the subject are the operator's: LoadModel's remote caller (the error mapping
    # answers ``answer()``) was told this server's key file's path; it hears the dates and the fix.
    assert info.value.answer() == (
        "RELEASE_SIGNING_KEY_EXPIRED: the key broker's release answer is signed with a key whose "
        "certificate expired at 2030-07-01T00:00:00+00:00 (now 2030-07-01T00:00:01+00:00): "
        "rotate the broker's release-signing key (deploy/README.md, 'Rotating the "
        "release-signing key')"
    )

    clock.now = ISSUED - NOT_BEFORE_LEEWAY  # a certificate made moments ago on a clock ahead
    assert verifier.verify(STATEMENT, signed.signature, signed.key_id)
    clock.now = ISSUED - NOT_BEFORE_LEEWAY - dt.timedelta(seconds=1)
    with pytest.raises(StrongroomError) as info:
        verifier.verify(STATEMENT, signed.signature, signed.key_id)
    assert info.value.reason == "RELEASE_SIGNING_KEY_NOT_YET_VALID"
    assert "valid only from 2030-01-01T00:00:00+00:00" in info.value.message
    assert "release-keys.pem" in info.value.message
    for part in (str(tmp_path), "release-keys.pem", "CN="):
        assert part not in info.value.answer(), info.value.answer()
    assert "valid only from 2030-01-01T00:00:00+00:00" in info.value.answer()


def test_a_bad_signature_by_an_expired_key_is_refused_for_its_signature(tmp_path: Path) -> None:
    """The dates are judged after the signature: an expired-key refusal means the key's holder
    signed this very answer."""
    key = Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    verifier = _certified(tmp_path, key, Clock(ENDS + dt.timedelta(days=1)))
    with pytest.raises(StrongroomError) as info:
        verifier.verify(STATEMENT, bytes(64), signed.key_id)
    assert info.value.reason == "RELEASE_SIGNATURE_INVALID"


def test_a_bare_public_key_has_no_end_and_a_renewed_certificate_extends_the_key(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    long_after = Clock(ENDS + dt.timedelta(days=3650))
    bare = tmp_path / "bare.pem"
    bare.write_bytes(_pem(key))
    assert ReleaseVerifier.from_files([bare], clock=long_after).verify(
        STATEMENT, signed.signature, signed.key_id
    )
    # The same key in an expired certificate and in its renewal: the renewal's validity counts.
    both = tmp_path / "both.pem"
    both.write_bytes(
        self_signed_pem(key, "old", not_before=ISSUED, not_after=ENDS)
        + self_signed_pem(key, "renewed", not_before=ENDS, not_after=ENDS + dt.timedelta(days=3650))
    )
    verifier = ReleaseVerifier.from_files([both], clock=long_after)
    assert verifier.key_ids == (signed.key_id,)
    assert verifier.verify(STATEMENT, signed.signature, signed.key_id)


def test_keys_expired_or_ending_soon_are_warned_of_at_start_and_daily_in_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, expired = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    bundle = tmp_path / "release-keys.pem"
    bundle.write_bytes(
        self_signed_pem(key, "current", not_before=ISSUED, not_after=ENDS)
        + self_signed_pem(expired, "retired", not_before=ISSUED, not_after=ISSUED)
        + _pem(Ed25519PrivateKey.generate())
    )
    clock = Clock(ENDS - dt.timedelta(days=10))
    verifier = ReleaseVerifier.from_files([bundle], clock=clock, warn_within=dt.timedelta(days=30))
    logger = "strongroom.attestation.release_signature"
    with caplog.at_level(logging.WARNING, logger=logger):
        verifier.warn_about_expiry()
    notes = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger]
    assert len(notes) == 2  # the bare key is never warned of
    (level, expiring), (expired_level, retired) = notes
    assert level == logging.WARNING and "expires at 2030-07-01T00:00:00+00:00" in expiring
    assert "release-keys.pem key 1, certificate 'CN=current'" in expiring
    assert expired_level == logging.ERROR and "CN=retired" in retired and "expired" in retired

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger):
        for hours in (0, 1, 23):
            clock.now = ENDS - dt.timedelta(days=10) + dt.timedelta(hours=hours)
            assert verifier.verify(STATEMENT, signed.signature, signed.key_id)
        clock.now = ENDS - dt.timedelta(days=8)
        assert verifier.verify(STATEMENT, signed.signature, signed.key_id)
    warned = [r for r in caplog.records if r.name == logger]
    assert [r.levelno for r in warned] == [logging.WARNING, logging.WARNING]  # once a day
    assert all("CN=current" in r.getMessage() for r in warned)


def test_no_valid_key_at_start_is_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = _certified(tmp_path, Ed25519PrivateKey.generate(), Clock(ENDS + dt.timedelta(1)))
    logger = "strongroom.attestation.release_signature"
    with caplog.at_level(logging.WARNING, logger=logger):
        verifier.warn_about_expiry()
    assert any(
        r.levelno == logging.ERROR and "every key release will be refused" in r.getMessage()
        for r in caplog.records
        if r.name == logger
    )


def test_certificates_dated_at_the_ends_of_time_are_judged_not_crashed_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate valid from year 1 to year 9999 (GeneralizedTime admits both) is valid now.
    notBefore less the leeway was computed, past the first datetime: OverflowError at start
    (the start-up notes) and at every verification, a traceback instead of a judgement."""
    key = Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    bundle = tmp_path / "release-keys.pem"
    bundle.write_bytes(oddly_dated_pem(key, b"00010101000000Z", b"99991231235959Z"))
    verifier = ReleaseVerifier.from_files([bundle])
    with caplog.at_level(logging.WARNING, logger="strongroom.attestation.release_signature"):
        verifier.warn_about_expiry()
    assert not caplog.records
    assert verifier.verify(STATEMENT, signed.signature, signed.key_id)


@pytest.mark.parametrize(
    ("not_before", "not_after", "said"),
    [
        # Year 0: no datetime holds it; it escaped as ValueError, a traceback at start.
        (b"00000101000000Z", b"99991231235959Z", "cannot be read"),
        (b"20300101000000Z", b"00000101000000Z", "cannot be read"),
        # Ending before it begins: no instant is within it, yet with notBefore's leeway it was
        # trusted from 5 minutes before notBefore to notAfter (here 3 minutes of them).
        (b"20300101000200Z", b"20300101000000Z", "ends before it begins"),
    ],
    ids=["not-before-year-0", "not-after-year-0", "ends-before-it-begins"],
)
def test_a_certificate_with_impossible_dates_is_refused_when_read(
    tmp_path: Path, not_before: bytes, not_after: bytes, said: str
) -> None:
    key = Ed25519PrivateKey.generate()
    bundle = tmp_path / "release-keys.pem"
    bundle.write_bytes(
        _pem(Ed25519PrivateKey.generate()) + oddly_dated_pem(key, not_before, not_after)
    )
    with pytest.raises(StrongroomError) as info:
        ReleaseVerifier.from_files([bundle])
    assert (info.value.status_name, info.value.reason) == (
        "INVALID_ARGUMENT",
        "RELEASE_SIGNING_KEY_INVALID",
    )
    assert "release-keys.pem key 2" in info.value.message and said in info.value.message


def test_start_up_notes_judge_each_key_not_each_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Verification trusts a key while any of its entries is valid (a renewed certificate beside
    the old, or the key also listed bare); the start-up notes judged entries one by one: the old
    certificate of a renewed key was an ERROR saying answers signed with it are refused, which
    they are not, and a key listed bare beside its certificate (compose publishes the bare
    release-signing-key.pub.pem at every up) was silently unbounded by that certificate."""
    renewed, doubled = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    bundle = tmp_path / "release-keys.pem"
    bundle.write_bytes(
        self_signed_pem(renewed, "old", not_before=ISSUED, not_after=ENDS)
        + self_signed_pem(
            renewed, "renewed", not_before=ENDS, not_after=ENDS + dt.timedelta(days=365)
        )
    )
    bare = tmp_path / "release-signing-key.pub.pem"
    bare.write_bytes(_pem(doubled))
    certified = tmp_path / "release-signing-key.crt.pem"
    certified.write_bytes(self_signed_pem(doubled, "bounded", not_before=ISSUED, not_after=ENDS))
    clock = Clock(ENDS + dt.timedelta(days=1))
    verifier = ReleaseVerifier.from_files([bundle, bare, certified], clock=clock)
    logger = "strongroom.attestation.release_signature"
    with caplog.at_level(logging.WARNING, logger=logger):
        verifier.warn_about_expiry()
    notes = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger]
    assert [level for level, _ in notes] == [logging.WARNING]
    ((_, unbounded),) = notes
    assert str(bare) in unbounded and "CN=bounded" in unbounded and "bare" in unbounded
    for key in (renewed, doubled):
        signed = ReleaseSigner(key).sign(STATEMENT)
        assert verifier.verify(STATEMENT, signed.signature, signed.key_id)
