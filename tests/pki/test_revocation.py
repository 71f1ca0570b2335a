"""A certificate an identity replaced with a new key is revoked at step-ca: nobody renews it again."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from strongroom.cli.main import main
from strongroom.pki import Credentials, RenewalPolicy, StepCa, WorkloadIdentity
from strongroom.pki._jose import unverified_claims
from strongroom.pki._state import save_superseded
from strongroom.pki.client import CaClient, ClientCertificate
from strongroom.pki.errors import CaRejected, CaUnavailable, InvalidPkiConfig
from strongroom.pki.token import mint_revoke_token
from tests.pki.helpers import enrol, rotate_intermediate, sid, token_for


def _presented(credentials: Credentials) -> ClientCertificate:
    return ClientCertificate(credentials.key_pem, credentials.chain_pem)


def _refused_renewal(ca: StepCa, stolen: ClientCertificate) -> None:
    with pytest.raises(CaRejected, match=r"/1\.0/renew \(HTTP 401\)"):
        ca.client().renew(stolen)


def test_after_a_rekey_the_old_certificate_can_no_longer_be_renewed(ca: StepCa) -> None:
    with enrol(ca, "inference", auto_renew=False) as identity:
        old = identity.credentials
        stolen = _presented(old)  # a copy of the state file, taken before the rotation
        new = identity.renew_now()
        assert new.public_key_der != old.public_key_der
        _refused_renewal(ca, stolen)
        assert identity.status().unrevoked_serials == ()
        # The new certificate renews, by re-keying and by plain renewal.
        assert ca.client().renew(_presented(new))[0].serial_number != new.serial
        newer = identity.renew_now()
        _refused_renewal(ca, _presented(new))
        assert ca.client().renew(_presented(newer))
        # Revoking twice is not an error (a retry after a lost answer).
        assert ca.client().revoke(old.serial, certificate=stolen) is False


def test_plain_renewal_keeps_the_key_and_revokes_nothing(ca: StepCa) -> None:
    policy = RenewalPolicy(rekey=False)
    with enrol(ca, "inference", policy=policy, auto_renew=False) as identity:
        old = identity.credentials
        identity.renew_now()
        assert ca.client().renew(_presented(old))  # same key: revoking it would protect nothing


def test_enrolling_over_a_live_persisted_identity_revokes_it(ca: StepCa, tmp_path: Path) -> None:
    with enrol(ca, "inference", state_dir=tmp_path, auto_renew=False) as first:
        stolen = _presented(first.credentials)
    with enrol(ca, "inference", state_dir=tmp_path, auto_renew=False) as second:
        _refused_renewal(ca, stolen)
        assert second.status().unrevoked_serials == ()
        assert ca.client().renew(_presented(second.credentials))


class _FlakyRevocations(CaClient):
    """A real CaClient whose revocations fail while ``failing`` is set (the CA unreachable)."""

    failing = True
    attempts = 0

    def revoke(
        self,
        serial: int,
        *,
        reason_code: int = 0,
        comment: str = "",
        certificate: ClientCertificate | None = None,
        token: str | None = None,
    ) -> bool:
        self.attempts += 1
        if self.failing:
            raise CaUnavailable("cannot reach the CA at https://ca/1.0/revoke: connection refused")
        return super().revoke(
            serial, reason_code=reason_code, comment=comment, certificate=certificate, token=token
        )


def test_a_failed_revocation_keeps_the_new_identity_and_is_retried(
    ca: StepCa, caplog: pytest.LogCaptureFixture
) -> None:
    client = _FlakyRevocations(ca.url, ca.root_pem)
    policy = RenewalPolicy(backoff_initial=0.2, backoff_max=0.4)
    identity = WorkloadIdentity.enrol(client, token_for(ca, "inference"), policy=policy)
    try:
        old = identity.credentials
        stolen = _presented(old)
        with caplog.at_level(logging.INFO, logger="strongroom.pki.identity"):
            new = identity.renew_now()  # does not raise: the new identity is in use
            assert identity.credentials.serial == new.serial != old.serial
            status = identity.status()
            assert status.healthy and status.unrevoked_serials == (old.serial,)
            assert ca.client().renew(stolen)  # still renewable, which is why it is retried

            deadline = time.monotonic() + 10
            while client.attempts < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.attempts >= 3  # the renewal thread retries with back-off
            client.failing = False
            while identity.status().unrevoked_serials and time.monotonic() < deadline:
                time.sleep(0.05)
            assert identity.status().unrevoked_serials == ()
        _refused_renewal(ca, stolen)

        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors, "each failed revocation is logged at ERROR"
        first = errors[0].getMessage()
        assert f"0x{old.serial:x}" in first and f"decimal {old.serial}" in first
        assert "strongroom pki revoke --serial" in first and "connection refused" in first
        logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
        for secret in (old.key_pem, new.key_pem):
            body = secret.decode().splitlines()[1]
            assert body not in logged
        assert "PRIVATE KEY" not in logged
        assert "revoked superseded certificate" in logged
    finally:
        identity.close()


@pytest.mark.parametrize("auto_renew", [True, False], ids=["renewal-thread", "at-resume"])
def test_a_revocation_cut_short_by_a_restart_is_resumed_from_the_state_directory(
    ca: StepCa, tmp_path: Path, auto_renew: bool
) -> None:
    """The CA is down when the identity re-keys, and the process stops before it comes back: the
    superseded certificate, kept in the state directory, is revoked by the next start (it used to
    be forgotten, renewable for ever by whoever copied its key)."""
    state = tmp_path / "state"
    flaky = _FlakyRevocations(ca.url, ca.root_pem)
    first = WorkloadIdentity.enrol(
        flaky, token_for(ca, "inference"), state_dir=state, auto_renew=False
    )
    try:
        old = first.credentials
        stolen = _presented(old)
        new = first.renew_now()
        assert first.status().unrevoked_serials == (old.serial,)
        kept = list(state.glob("superseded-*.pem"))
        assert [p.name for p in kept] == [f"superseded-{old.serial:x}.pem"]
        assert kept[0].stat().st_mode & 0o777 == 0o600
    finally:
        first.close()
    assert ca.client().renew(stolen)  # not revoked yet
    with WorkloadIdentity.resume(ca.client(), state, auto_renew=auto_renew) as second:
        assert second.credentials.serial == new.serial
        deadline = time.monotonic() + 10
        while second.status().unrevoked_serials and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.status().unrevoked_serials == ()
        _refused_renewal(ca, stolen)
        assert list(state.glob("superseded-*.pem")) == []
        assert ca.client().renew(_presented(second.credentials))


def test_an_enrolment_over_a_live_identity_keeps_it_once_until_revoked(
    ca: StepCa, tmp_path: Path
) -> None:
    with enrol(ca, "inference", state_dir=tmp_path, auto_renew=False) as first:
        stolen = _presented(first.credentials)
        old_serial = first.credentials.serial
    flaky = _FlakyRevocations(ca.url, ca.root_pem)
    with WorkloadIdentity.enrol(
        flaky, token_for(ca, "inference"), state_dir=tmp_path, auto_renew=False
    ) as second:
        assert second.status().unrevoked_serials == (old_serial,)
        assert flaky.attempts == 1
        assert len(list(tmp_path.glob("superseded-*.pem"))) == 1
        flaky.failing = False
        assert second.revoke_superseded() == ()
        assert list(tmp_path.glob("superseded-*.pem")) == []
    _refused_renewal(ca, stolen)


def test_a_kept_copy_of_the_current_certificate_is_dropped_not_revoked(
    ca: StepCa, tmp_path: Path
) -> None:
    """A run that stopped between keeping the old certificate and replacing it left a superseded
    file naming the certificate still in use: resuming removes it and revokes nothing."""
    with enrol(ca, "inference", state_dir=tmp_path, auto_renew=False) as first:
        current = first.credentials
        save_superseded(tmp_path, current)
    with WorkloadIdentity.resume(ca.client(), tmp_path, auto_renew=False) as second:
        assert second.credentials.serial == current.serial
        assert second.status().unrevoked_serials == ()
    assert list(tmp_path.glob("superseded-*.pem")) == []
    assert ca.client().renew(_presented(current))


def test_an_unreadable_kept_certificate_is_reported_and_left_for_an_operator(
    ca: StepCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with enrol(ca, "inference", state_dir=tmp_path, auto_renew=False) as first:
        serial = first.credentials.serial
    damaged = tmp_path / "superseded-abc.pem"
    damaged.write_bytes(b"not a key")
    damaged.chmod(0o600)
    with (
        caplog.at_level(logging.ERROR, logger="strongroom.pki.identity"),
        WorkloadIdentity.resume(ca.client(), tmp_path, auto_renew=False) as second,
    ):
        assert second.credentials.serial == serial
    assert damaged.exists()
    assert any(str(damaged) in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_revoke_refuses_a_certificate_revoking_another_serial(ca: StepCa) -> None:
    with enrol(ca, "inference", auto_renew=False) as identity:
        credentials = identity.credentials
        with pytest.raises(InvalidPkiConfig, match="can revoke only itself"):
            ca.client().revoke(credentials.serial + 1, certificate=_presented(credentials))
        assert ca.client().renew(_presented(credentials))


# ----------------------------------------------------------------- strongroom pki revoke


def test_operator_revokes_by_serial_or_certificate_file(
    ca: StepCa, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = str(ca.layout.directory)
    with enrol(ca, "inference", auto_renew=False) as first:
        stolen = _presented(first.credentials)
        serial = first.credentials.serial
        argv = ["pki", "revoke", "--dir", directory, "--serial", f"0x{serial:x}"]
        assert (
            main([*argv, "--reason-code", "key-compromise", "--reason", "state file copied"]) == 0
        )
        assert capsys.readouterr().out == f"revoked: serial 0x{serial:x} (decimal {serial})\n"
        _refused_renewal(ca, stolen)
        assert main([*argv[:-1], str(serial)]) == 0  # decimal, as step-ca logs it
        assert capsys.readouterr().out.startswith("already revoked: ")

    with enrol(ca, "keybroker", ["keybroker"], auto_renew=False) as second:
        cert = tmp_path / "cert.pem"
        cert.write_bytes(second.chain_pem())
        assert main(["pki", "revoke", "--dir", directory, "--cert", str(cert)]) == 0
        out = capsys.readouterr().out
        assert f"0x{second.credentials.serial:x}" in out and sid("keybroker") in out
        _refused_renewal(ca, _presented(second.credentials))


@pytest.mark.parametrize("serial", ["95922cfe", "0xzz", "-5", "0"])
def test_operator_revoke_refuses_an_ambiguous_serial(
    ca: StepCa, serial: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pki", "revoke", "--dir", str(ca.layout.directory), f"--serial={serial}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "serial" in err and "Traceback" not in err


def test_revoke_token_cannot_sign_and_is_single_use(ca: StepCa) -> None:
    with enrol(ca, "inference", auto_renew=False) as identity:
        serial = identity.credentials.serial
        token = mint_revoke_token(ca.layout.provisioner(), ca_url=ca.url, serial=serial)
        assert unverified_claims(token)["aud"] == ca.url + "/1.0/revoke"
        client = ca.client()
        assert client.revoke(serial, token=token) is True
        with pytest.raises(CaRejected, match="HTTP 401"):
            client.revoke(serial + 1, token=token)  # the token was used once already


def test_a_certificate_superseded_across_an_intermediate_rotation_is_revoked(
    own_ca: StepCa,
) -> None:
    """The CA's intermediate was renewed (same root, same database) between two re-keys: the
    identity took the certificate from the old intermediate for one of another CA (as after a root
    rotation) and left it unrevoked, renewable by whoever copied its key until it expired. The
    CA that issued it is the one that renews it: it is revoked there."""
    with enrol(own_ca, "inference", auto_renew=False) as identity:
        old = identity.credentials
        stolen = _presented(old)
        new_intermediate = rotate_intermediate(own_ca)
        new = identity.renew_now()
        assert new.chain[1] == new_intermediate != old.chain[1]
        assert identity.status().unrevoked_serials == ()
        _refused_renewal(own_ca, stolen)
        assert own_ca.client().renew(_presented(new))
