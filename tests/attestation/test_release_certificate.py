"""The certificate a deploy makes over the broker's release-signing key, and when it keeps one."""

from __future__ import annotations

import datetime as dt
import errno
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom import files
from strongroom.attestation.release_certificate import (
    BACKDATE,
    MAX_DAYS,
    RENEW_WITHIN,
    certify,
    ensure,
    main,
    renew_within,
    renewal_reason,
)
from strongroom.attestation.release_keys import NOT_BEFORE_LEEWAY, load_trusted_keys
from strongroom.attestation.release_signature import signing_key_id

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_a_fresh_certificate_is_backdated_for_clock_skew() -> None:
    """Made at NOW on a machine whose clock is ahead, it is trusted by a server up to
    BACKDATE + NOT_BEFORE_LEEWAY behind, not a second more."""
    key = Ed25519PrivateKey.generate()
    (trusted,) = load_trusted_keys(certify(key, days=30, now=NOW), source="t")
    assert signing_key_id(trusted.key) == signing_key_id(key.public_key())
    assert trusted.not_before == NOW - BACKDATE
    assert trusted.not_after == NOW + dt.timedelta(days=30)
    behind = NOW - BACKDATE - NOT_BEFORE_LEEWAY
    assert trusted.refusal(behind) is None
    refused = trusted.refusal(behind - dt.timedelta(seconds=1))
    assert refused is not None and refused.reason == "RELEASE_SIGNING_KEY_NOT_YET_VALID"
    for days in (0, MAX_DAYS + 1):
        with pytest.raises(ValueError, match="1 to 36500 days"):
            certify(key, days=days, now=NOW)


def test_a_certificate_is_kept_only_while_it_does() -> None:
    key = Ed25519PrivateKey.generate()
    good = certify(key, days=365, now=NOW)
    assert renewal_reason(good, key, NOW) is None
    # Ending within RENEW_WITHIN, expired, not yet valid: made again.
    assert "within 60 days" in (renewal_reason(good, key, NOW + dt.timedelta(days=306)) or "")
    assert renewal_reason(good, key, NOW + dt.timedelta(days=365) - RENEW_WITHIN) is not None
    assert "expired" in (renewal_reason(good, key, NOW + dt.timedelta(days=366)) or "")
    assert "valid only from" in (renewal_reason(good, key, NOW - dt.timedelta(hours=1)) or "")
    # Over another key (the broker's key rotated), or not one certificate.
    other = Ed25519PrivateKey.generate()
    assert renewal_reason(good, other, NOW) == "it certifies another key"
    bare = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert renewal_reason(bare, key, NOW) == "the file is not one certificate"
    assert renewal_reason(good + good, key, NOW) == "the file is not one certificate"
    assert "no PEM public key" in (renewal_reason(b"garbage", key, NOW) or "")


def test_ensure_writes_a_public_file_once_and_keeps_it(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "release-signing-key"
    key_file.write_bytes(_pem(key))
    out = tmp_path / "pki" / "release-signing-key.crt.pem"
    assert ensure(key_file, out, days=365, now=NOW) is True
    assert out.stat().st_mode & 0o777 == 0o644
    made = out.read_bytes()
    assert b"PRIVATE" not in made
    assert ensure(key_file, out, days=365, now=NOW + dt.timedelta(days=30)) is False
    assert out.read_bytes() == made
    # The key rotated: certified again.
    key_file.write_bytes(_pem(Ed25519PrivateKey.generate()))
    assert ensure(key_file, out, days=365, now=NOW) is True
    assert out.read_bytes() != made


def test_the_command_refuses_what_it_cannot_certify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key file that is not an Ed25519 private key, or none at all: exit 1 with the reason,
    nothing written and no stack trace."""
    out = tmp_path / "release-signing-key.crt.pem"
    bad = tmp_path / "bad-key"
    bad.write_bytes(b"not a key")
    assert main(["--key", str(bad), "--out", str(out)]) == 1
    assert "RELEASE_SIGNING_KEY_INVALID" in capsys.readouterr().err
    assert main(["--key", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "No such file" in capsys.readouterr().err
    assert not out.exists()
    good = tmp_path / "key"
    good.write_bytes(_pem(Ed25519PrivateKey.generate()))
    # A validity past what a date holds (STRONGROOM_RELEASE_SIGNING_CERT_DAYS mistyped) was an
    # OverflowError's stack trace: now the usage error, as for 0.
    for days in ("3000000", "1000000000", "0"):
        with pytest.raises(SystemExit):
            main(["--key", str(good), "--out", str(out), "--days", days])
        assert "--days must be 1 to 36500" in capsys.readouterr().err
        assert not out.exists()
    assert main(["--key", str(good), "--out", str(out), "--days", "7"]) == 0
    (trusted,) = load_trusted_keys(out.read_bytes(), source="t")
    assert trusted.not_after is not None and trusted.not_before is not None
    assert trusted.not_after - trusted.not_before == dt.timedelta(days=7) + BACKDATE


@pytest.mark.parametrize("days", [7, 30, 60])
def test_a_short_lived_certificate_is_kept_until_half_its_life_is_left(
    tmp_path: Path, days: int
) -> None:
    """Renewed within a fixed 60 days, a certificate of 60 days or less was made again at every
    ``up`` (a fresh one already ends within them): its dates moved each time. It is made again
    once half its validity is left (60 days at most), not before."""
    key_file = tmp_path / "release-signing-key"
    key_file.write_bytes(_pem(Ed25519PrivateKey.generate()))
    out = tmp_path / "release-signing-key.crt.pem"
    assert ensure(key_file, out, days=days, now=NOW) is True
    made = out.read_bytes()
    half = dt.timedelta(days=days) / 2
    assert ensure(key_file, out, days=days, now=NOW + dt.timedelta(hours=1)) is False
    assert ensure(key_file, out, days=days, now=NOW + half - dt.timedelta(minutes=1)) is False
    assert out.read_bytes() == made
    assert ensure(key_file, out, days=days, now=NOW + half) is True
    assert out.read_bytes() != made


def test_the_renewal_window_is_60_days_or_half_the_validity() -> None:
    assert renew_within(365) == RENEW_WITHIN == dt.timedelta(days=60)
    assert renew_within(120) == dt.timedelta(days=60)
    assert renew_within(60) == dt.timedelta(days=30)
    assert renew_within(1) == dt.timedelta(hours=12)
    key = Ed25519PrivateKey.generate()
    reason = renewal_reason(
        certify(key, days=7, now=NOW), key, NOW + dt.timedelta(days=4), within=renew_within(7)
    )
    assert reason is not None and reason.endswith("within 3.5 days")


def test_a_directory_that_cannot_be_synced_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory's sync failing after the rename (NotDurable) carries no file name: the
    command printed "None: Input/output error". It names the certificate and its directory."""

    def failing_sync(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "fsync_dir", failing_sync)
    key_file = tmp_path / "key"
    key_file.write_bytes(_pem(Ed25519PrivateKey.generate()))
    out = tmp_path / "pki" / "release-signing-key.crt.pem"
    assert main(["--key", str(key_file), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "None" not in err
    assert f"{out}: the certificate was written" in err
    assert f"its directory {out.parent} could not be synced (Input/output error)" in err
    assert out.exists()  # in place, as the message says
