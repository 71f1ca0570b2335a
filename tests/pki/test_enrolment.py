"""Enrolment, renewal, re-keying and persistence against a real step-ca."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from strongroom.cli.client import Client, ClientConfig
from strongroom.dev.devstack.stack import free_port
from strongroom.errors import FailedPrecondition
from strongroom.pki import (
    Credentials,
    RenewalPolicy,
    SpiffeId,
    StepCa,
    WorkloadIdentity,
    init_ca,
    mint_token,
)
from strongroom.pki._jose import b64url_decode, thumbprint
from strongroom.pki._state import STATE_FILE
from strongroom.pki._x509 import build_csr, generate_key, verify_chain
from strongroom.pki.client import ClientCertificate
from strongroom.pki.errors import CaRejected, NoIdentity
from strongroom.pki.layout import Provisioner
from strongroom.pki.token import _signed, sign_audience
from strongroom.reasons import Reason
from strongroom.runtime.bootstrap import open_identity
from strongroom.runtime.config import IdentityConfig
from strongroom.spiffe import identity_dns_name
from tests.pki.helpers import enrol, sid, token_for


def test_enrolment_issues_an_svid_with_exactly_the_token_sans(ca: StepCa) -> None:
    with enrol(
        ca, "keybroker", ["keybroker"], lifetime=timedelta(minutes=7), auto_renew=False
    ) as identity:
        credentials = identity.credentials
        leaf = credentials.leaf
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid("keybroker")]
        # The name derived from its SPIFFE ID (which channels expecting it check), then its own.
        derived = identity_dns_name(sid("keybroker"))
        assert san.get_values_for_type(x509.DNSName) == [derived, "keybroker"]
        assert identity.spiffe_id == SpiffeId.parse(sid("keybroker"))
        assert identity.trust_domain == "strongroom.test"
        public = leaf.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
        # The requested lifetime, counted from issuance (step-ca backdates notBefore by 1 minute).
        assert abs(credentials.lifetime - timedelta(minutes=7)) < timedelta(seconds=5)
        assert leaf.not_valid_before_utc <= datetime.now(UTC) - timedelta(seconds=50)
        root = x509.load_pem_x509_certificate(ca.root_pem)
        verify_chain(credentials.chain, root)
        assert identity.public_key_der() == credentials.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert identity.certificate_pem().startswith(b"-----BEGIN CERTIFICATE-----")
        assert "PRIVATE" not in repr(credentials) and "PRIVATE" not in repr(identity)
        assert identity.healthy()


def test_token_is_an_es256_jwt_as_step_ca_expects(ca: StepCa) -> None:
    provisioner = ca.layout.provisioner()
    token = mint_token(
        provisioner, ca_url=ca.url, subject=sid("x"), sans=[sid("x"), "x"], root_pem=ca.root_pem
    )
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(b64url_decode(header_b64))
    claims = json.loads(b64url_decode(payload_b64))
    assert header == {"alg": "ES256", "kid": thumbprint(provisioner.key.public_key()), "typ": "JWT"}
    assert claims["iss"] == "strongroom"
    assert claims["aud"] == f"{ca.url}/1.0/sign"
    assert claims["sub"] == sid("x")
    assert claims["sans"] == [sid("x"), identity_dns_name(sid("x")), "x"]
    assert claims["nbf"] == claims["iat"] and 0 < claims["exp"] - claims["iat"] <= 300
    assert len(claims["jti"]) == 64
    signature = b64url_decode(signature_b64)
    assert len(signature) == 64
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    provisioner.key.public_key().verify(
        der, f"{header_b64}.{payload_b64}".encode(), ec.ECDSA(hashes.SHA256())
    )


def test_csr_with_sans_other_than_the_tokens_is_rejected_by_step_ca(ca: StepCa) -> None:
    token = token_for(ca, "inference")
    key = generate_key()
    with pytest.raises(CaRejected) as caught:
        ca.client().sign(build_csr(key, [sid("keybroker")]), token)
    assert "403" in caught.value.message
    token = token_for(ca, "inference")
    with pytest.raises(CaRejected):
        ca.client().sign(build_csr(key, [sid("inference"), "evil.example"]), token)


def test_token_can_be_used_only_once(ca: StepCa) -> None:
    token = token_for(ca, "inference")
    enrol_with = ca.client()
    WorkloadIdentity.enrol(enrol_with, token, auto_renew=False).close()
    with pytest.raises(CaRejected):
        WorkloadIdentity.enrol(enrol_with, token, auto_renew=False)


def test_token_from_an_unknown_provisioner_key_is_rejected(ca: StepCa) -> None:
    impostor = Provisioner(ca.layout.provisioner_name, ec.generate_private_key(ec.SECP256R1()))
    token = mint_token(impostor, ca_url=ca.url, subject=sid("inference"), sans=[sid("inference")])
    with pytest.raises(CaRejected):
        WorkloadIdentity.enrol(ca.client(), token, auto_renew=False)


def test_token_for_another_audience_is_rejected(ca: StepCa) -> None:
    token = mint_token(
        ca.layout.provisioner(),
        ca_url="https://ca.elsewhere.example:9000",
        subject=sid("inference"),
        sans=[sid("inference")],
    )
    with pytest.raises(CaRejected):
        WorkloadIdentity.enrol(ca.client(), token, auto_renew=False)


def test_lifetime_beyond_the_provisioner_maximum_is_rejected(ca: StepCa) -> None:
    with pytest.raises(CaRejected):
        enrol(ca, "inference", lifetime=timedelta(hours=25), auto_renew=False)


def test_renewal_keeps_the_key_and_identity(ca: StepCa) -> None:
    policy = RenewalPolicy(rekey=False)
    with enrol(ca, "modelstore", ["modelstore"], policy=policy, auto_renew=False) as identity:
        before = identity.credentials
        seen: list[Credentials] = []
        identity.add_rotation_listener(seen.append)
        after = identity.renew_now()
        assert after.serial != before.serial
        assert after.public_key_der == before.public_key_der
        assert after.sans == before.sans and after.spiffe_id == before.spiffe_id
        assert after.generation == before.generation + 1 == identity.generation
        assert seen == [after]
        verify_chain(after.chain, x509.load_pem_x509_certificate(ca.root_pem))


def test_rekey_moves_to_a_fresh_key(ca: StepCa) -> None:
    with enrol(ca, "modelstore", ["modelstore"], auto_renew=False) as identity:
        before = identity.credentials
        after = identity.renew_now()
        assert after.public_key_der != before.public_key_der
        assert identity.public_key_der() == after.public_key_der
        assert after.sans == before.sans
        assert abs(after.lifetime - before.lifetime) < timedelta(seconds=5)


def test_state_dir_survives_a_restart_with_private_permissions(ca: StepCa, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with enrol(ca, "inference", state_dir=state, auto_renew=False) as identity:
        first = identity.credentials
    mode = stat.S_IMODE((state / STATE_FILE).stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    with WorkloadIdentity.start(ca.client(), state_dir=state, auto_renew=False) as resumed:
        assert resumed.credentials.serial == first.serial
        assert resumed.public_key_der() == first.public_key_der
        renewed = resumed.renew_now()
    # The renewal was persisted too.
    with WorkloadIdentity.resume(ca.client(), state, auto_renew=False) as again:
        assert again.credentials.serial == renewed.serial


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the directory to another user")
def test_a_state_directory_another_user_owns_is_refused(ca: StepCa, tmp_path: Path) -> None:
    """An existing state directory was chmod'ed to 0700 and used whoever owned it: as root (the
    chmod succeeds) a directory another user prepared received the service's key, and its owner
    can chmod it back and read it."""
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o777)
    os.chown(planted, 4242, 4242)
    with pytest.raises(PermissionError, match="belongs to uid 4242"):
        enrol(ca, "inference", state_dir=planted, auto_renew=False)
    assert not any(planted.iterdir())


def test_resume_refuses_missing_or_world_readable_state(ca: StepCa, tmp_path: Path) -> None:
    with pytest.raises(NoIdentity):
        WorkloadIdentity.start(ca.client(), state_dir=tmp_path / "empty")
    state = tmp_path / "state"
    enrol(ca, "inference", state_dir=state, auto_renew=False).close()
    (state / STATE_FILE).chmod(0o644)
    with pytest.raises(NoIdentity, match="group or others"):
        WorkloadIdentity.resume(ca.client(), state)


def test_resume_refuses_a_state_key_on_a_curve_it_cannot_load(ca: StepCa, tmp_path: Path) -> None:
    """cryptography raises UnsupportedAlgorithm (not a ValueError) for an EC key on a curve it does
    not support; such a state file escaped ``resume`` as an untyped error instead of NoIdentity
    (which makes a service enrol afresh)."""
    state = tmp_path / "state"
    enrol(ca, "inference", state_dir=state, auto_renew=False).close()
    path = state / STATE_FILE
    text = path.read_bytes()
    start = text.index(b"-----BEGIN PRIVATE KEY-----")
    end = text.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----")
    der = bytearray(base64.b64decode(b"".join(text[start:end].splitlines()[1:-1])))
    prime256v1, secp112r1 = bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06052b81040006")
    assert der.count(prime256v1) == 1 and der[1] == 0x81
    at = der.index(prime256v1)
    der[at : at + len(prime256v1)] = secp112r1
    der[2] -= 3  # the PrivateKeyInfo SEQUENCE (long form, one length byte)
    der[7] -= 3  # its AlgorithmIdentifier (after the version INTEGER)
    body = base64.encodebytes(bytes(der))
    key_pem = b"-----BEGIN PRIVATE KEY-----\n" + body + b"-----END PRIVATE KEY-----"
    path.write_bytes(text[:start] + key_pem + text[end:])
    with pytest.raises(NoIdentity, match="unusable"):
        WorkloadIdentity.resume(ca.client(), state)


def test_a_token_minted_before_the_ca_started_enrols_and_stays_single_use(
    step_ca_binary: Path, tmp_path: Path
) -> None:
    """The compose bootstrap mints every token before step-ca starts, and a Helm pod's init
    container may mint its token before the CA's pod is up (the service container then restarts
    on the same token, the init container does not run again). step-ca refused every token issued
    before its process started, so no service could ever enrol. The CA always has a database, which
    remembers used tokens across restarts: that is what keeps a token single-use."""
    layout = init_ca(
        tmp_path / "ca",
        trust_domain="strongroom.test",
        dns_names=["127.0.0.1"],
        address=f"127.0.0.1:{free_port()}",
    )
    # A second before now, so it is before the CA's start whatever the clock's sub-second part.
    minted = time.time() - 1
    token = mint_token(
        layout.provisioner(),
        ca_url=layout.url,
        subject=sid("inference"),
        sans=[sid("inference")],
        now=minted,
    )
    ca = StepCa(layout, binary=step_ca_binary)
    with ca:
        WorkloadIdentity.enrol(ca.client(), token, auto_renew=False).close()
    with ca:  # restarted: the used token is still refused
        with pytest.raises(CaRejected) as caught:
            WorkloadIdentity.enrol(ca.client(), token, auto_renew=False)
        assert "HTTP 401" in caught.value.message
        # step-ca tells only its log why: the token is known as used (not too old).
        refusals = [line for line in layout.log_path.read_text().splitlines() if "error=" in line]
        assert "token already used" in refusals[-1], refusals[-1]


def test_a_service_refuses_an_enrolment_token_others_may_read(ca: StepCa, tmp_path: Path) -> None:
    """The token is a bearer credential for the service's identity until it is used: anyone who
    can read it may enrol first and hold a certificate for that SPIFFE ID. A service read it from
    a file of any mode (its PINs and keys must be 0600)."""
    token_file = tmp_path / "keybroker.token"
    token_file.write_text(token_for(ca, "keybroker", ["keybroker"]))
    token_file.chmod(0o644)
    config = IdentityConfig(
        trust_domain="strongroom.test",
        spiffe_id=sid("keybroker"),
        ca_url=ca.url,
        ca_root_file=ca.layout.root_cert_path,
        token_file=token_file,
        state_dir=tmp_path / "state",
    )
    with pytest.raises(FailedPrecondition) as refused:
        open_identity(config)
    assert refused.value.reason == Reason.SECRET_FILE_PERMISSIONS
    assert str(token_file) in refused.value.message and "644" in refused.value.message
    assert not (tmp_path / "state").exists()  # nothing enrolled: the token is still unused
    token_file.chmod(0o600)
    with open_identity(config) as identity:
        assert str(identity.spiffe_id) == sid("keybroker")


def _token_without_the_derived_name(ca: StepCa, name: str, *dns: str) -> str:
    """``name``'s enrolment token as an earlier version minted it: its SPIFFE ID and ``dns``,
    without the DNS name derived from the ID."""
    return _signed(
        ca.layout.provisioner(),
        subject=sid(name),
        audience=sign_audience(ca.url),
        lifetime=timedelta(minutes=5),
        now=None,
        extra={"sans": [sid(name), *dns]},
    )


def test_a_certificate_without_the_derived_name_is_named_and_replaced_by_a_fresh_token(
    ca: StepCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A service resuming a certificate issued before workload certificates carried the name
    derived from their SPIFFE ID (renewals copy it) says so at start, with what to do; a fresh
    token (which asks for the name) replaces that certificate."""
    state = tmp_path / "state"
    old_token = _token_without_the_derived_name(ca, "keybroker", "keybroker")
    with WorkloadIdentity.start(ca.client(), token=old_token, state_dir=state, auto_renew=False):
        pass
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    config = IdentityConfig(
        trust_domain="strongroom.test",
        spiffe_id=sid("keybroker"),
        ca_url=ca.url,
        ca_root_file=root,
        state_dir=state,
    )
    derived = identity_dns_name(sid("keybroker"))
    with (
        caplog.at_level("WARNING", logger="strongroom.runtime.bootstrap"),
        open_identity(config) as resumed,
    ):
        assert derived not in resumed.credentials.sans
    assert derived in caplog.text and "fresh token" in caplog.text
    caplog.clear()
    token_file = tmp_path / "token"
    token_file.write_text(token_for(ca, "keybroker", ["keybroker"]))
    token_file.chmod(0o600)
    with (
        caplog.at_level("WARNING", logger="strongroom.runtime.bootstrap"),
        open_identity(replace(config, token_file=token_file)) as renewed,
    ):
        assert derived in renewed.credentials.sans
    assert not [r for r in caplog.records if r.name == "strongroom.runtime.bootstrap"]


def test_a_replacing_token_already_taken_says_so_and_keeps_the_persisted_identity(
    ca: StepCa, tmp_path: Path
) -> None:
    """A service restarted on the token of a replacing enrolment that failed (step-ca takes the
    token even when a provisioner not yet updated refuses the certificate) met step-ca's bare
    401 at every start; the refusal now says the token was taken and the persisted identity is
    left in place."""
    state = tmp_path / "state"
    old_token = _token_without_the_derived_name(ca, "keybroker", "keybroker")
    with WorkloadIdentity.start(ca.client(), token=old_token, state_dir=state, auto_renew=False):
        pass
    persisted = (state / STATE_FILE).read_bytes()
    token = token_for(ca, "keybroker", ["keybroker"])  # asks for the derived name too
    WorkloadIdentity.enrol(ca.client(), token, auto_renew=False).close()  # the CA takes it
    with pytest.raises(CaRejected) as refused:
        WorkloadIdentity.start(ca.client(), token=token, state_dir=state, auto_renew=False)
    message = refused.value.message
    assert "HTTP 401" in message and "already taken" in message and "fresh one" in message
    assert str(state) in message and "left in place" in message
    assert (state / STATE_FILE).read_bytes() == persisted


def test_a_client_certificate_without_the_derived_name_is_not_warned_about(
    ca: StepCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's tool (the CLI) resuming a certificate issued before the upgrade: no server
    checks a client's derived name, yet every command warned that clients "refuse this service
    until it enrols again" (a rehearsed upgrade's admin and publisher printed it on every call
    until their next token). The CLI's client opens its identity as a client: no warning."""
    state = tmp_path / "state"
    old_token = _token_without_the_derived_name(ca, "admin")
    with WorkloadIdentity.start(ca.client(), token=old_token, state_dir=state, auto_renew=False):
        pass
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    identity = IdentityConfig(
        trust_domain="strongroom.test",
        spiffe_id=sid("admin"),
        ca_url=ca.url,
        ca_root_file=root,
        state_dir=state,
    )
    with (
        caplog.at_level("WARNING", logger="strongroom.runtime.bootstrap"),
        Client(ClientConfig(identity=identity)) as client,
    ):
        assert identity_dns_name(sid("admin")) not in client.identity.credentials.sans
    assert not [r for r in caplog.records if r.name == "strongroom.runtime.bootstrap"]


def test_a_fresh_token_for_other_names_replaces_the_persisted_identity(
    ca: StepCa, tmp_path: Path
) -> None:
    """The operator gives a service another DNS name (or SPIFFE ID) and a fresh token for it (the
    compose bootstrap mints one from the service's configuration at every `up`). The service
    resumed its persisted certificate and ignored the token: renewals copy the old names, so it
    kept them for ever (a new SPIFFE ID failed the start until the state was wiped by hand). A
    token asking for other SANs than the persisted identity's now enrols, and the replaced
    certificate is revoked; the token already used, or an expired one, changes nothing."""
    state = tmp_path / "state"
    first_token = token_for(ca, "keybroker", ["keybroker"])
    with WorkloadIdentity.start(
        ca.client(), token=first_token, state_dir=state, auto_renew=False
    ) as first:
        old = first.credentials
    renamed_token = token_for(ca, "keybroker", ["keybroker", "keybroker.strongroom.test"])
    with WorkloadIdentity.start(
        ca.client(), token=renamed_token, state_dir=state, auto_renew=False
    ) as second:
        assert second.credentials.sans == {
            sid("keybroker"),
            identity_dns_name(sid("keybroker")),
            "keybroker",
            "keybroker.strongroom.test",
        }
        assert second.status().unrevoked_serials == ()
        renamed = second.credentials
    with pytest.raises(CaRejected, match=r"HTTP 401"):
        ca.client().renew(ClientCertificate(old.key_pem, old.chain_pem))
    # Restarted with the same (used) token: resumed, not enrolled again.
    with WorkloadIdentity.start(
        ca.client(), token=renamed_token, state_dir=state, auto_renew=False
    ) as third:
        assert third.credentials.serial == renamed.serial
    # A token for other names that has expired cannot enrol anything: resumed too.
    expired = mint_token(
        ca.layout.provisioner(),
        ca_url=ca.url,
        subject=sid("keybroker"),
        sans=[sid("keybroker")],
        now=time.time() - 3600,
    )
    with WorkloadIdentity.start(
        ca.client(), token=expired, state_dir=state, auto_renew=False
    ) as fourth:
        assert fourth.credentials.serial == renamed.serial


def test_a_damaged_state_file_is_named_when_the_used_token_cannot_replace_it(
    ca: StepCa, tmp_path: Path
) -> None:
    """The persisted identity is damaged (here cut in half) and the token beside it was used for
    it long ago: the start failed with only the CA's "HTTP 401 ... lacked necessary
    authorization", the state file's problem logged at INFO before it. The refusal now says why
    the service had to enrol at all."""
    state = tmp_path / "state"
    token = token_for(ca, "inference")
    WorkloadIdentity.start(ca.client(), token=token, state_dir=state, auto_renew=False).close()
    persisted = state / STATE_FILE
    persisted.write_bytes(persisted.read_bytes()[: len(persisted.read_bytes()) // 2])
    with pytest.raises(CaRejected) as refused:
        WorkloadIdentity.start(ca.client(), token=token, state_dir=state, auto_renew=False)
    message = refused.value.message
    assert "HTTP 401" in message
    assert str(state) in message and "unusable" in message


def test_a_refused_state_directory_does_not_use_up_the_token(ca: StepCa, tmp_path: Path) -> None:
    """The state directory was checked only when the new identity was saved, after step-ca had
    taken the one-time token: a service whose identity volume belonged to another user (a volume
    created by root) burned its token, and after the operator fixed the owner it could not enrol
    until a new token was minted. The directory is checked before the token is presented."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 4242, 4242)
    token = token_for(ca, "inference")
    with pytest.raises(PermissionError, match="belongs to uid 4242"):
        WorkloadIdentity.enrol(ca.client(), token, state_dir=state, auto_renew=False)
    os.chown(state, os.geteuid(), os.getegid())
    with WorkloadIdentity.enrol(ca.client(), token, state_dir=state, auto_renew=False) as identity:
        assert str(identity.spiffe_id) == sid("inference")


def test_a_token_for_another_identity_is_refused_before_it_replaces_ours(
    ca: StepCa, tmp_path: Path
) -> None:
    """The token file holds a fresh token for another workload (a secret mounted into the wrong
    pod, or a token file an attacker could write). The start enrolled with it because it asked
    for other SANs than the persisted identity's: it took the token, wrote the other workload's
    key and certificate over the service's own, revoked the service's live certificate, and only
    then refused IDENTITY_MISMATCH; every later start resumed the other identity and failed the
    same way, until an operator minted a token for the right name. The configured SPIFFE ID is
    now checked against the token before it is presented: the state, the live certificate and
    the token stay as they were."""
    state = tmp_path / "state"
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    token_file = tmp_path / "inference.token"
    token_file.touch(mode=0o600)
    config = IdentityConfig(
        trust_domain="strongroom.test",
        spiffe_id=sid("inference"),
        ca_url=ca.url,
        ca_root_file=root,
        token_file=token_file,
        state_dir=state,
    )
    foreign = token_for(ca, "modelstore")
    token_file.write_text(foreign)
    # A first start, with nothing persisted yet: refused alike, nothing written.
    with pytest.raises(FailedPrecondition) as refused:
        open_identity(config)
    assert refused.value.reason == Reason.IDENTITY_MISMATCH
    assert not state.exists()
    token_file.write_text(token_for(ca, "inference"))
    with open_identity(config) as first:
        ours = first.credentials
    persisted = (state / STATE_FILE).read_bytes()
    token_file.write_text(foreign)
    with pytest.raises(FailedPrecondition) as refused:
        open_identity(config)
    assert refused.value.reason == Reason.IDENTITY_MISMATCH
    assert sid("modelstore") in refused.value.message
    assert sid("inference") in refused.value.message
    assert str(token_file) in refused.value.message
    assert (state / STATE_FILE).read_bytes() == persisted
    assert not list(state.glob("superseded-*"))
    # Still renewable: not revoked at the CA.
    ca.client().renew(ClientCertificate(ours.key_pem, ours.chain_pem))
    # And the token was not taken: the workload it is for still enrols with it.
    with WorkloadIdentity.start(ca.client(), token=foreign, auto_renew=False) as other:
        assert str(other.spiffe_id) == sid("modelstore")
