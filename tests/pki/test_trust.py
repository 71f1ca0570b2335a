"""The root file: every certificate in it is pinned (a root rotation bundle), nothing but roots;
a chain not valid yet at local time is blamed on the clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from strongroom.pki import StepCa, WorkloadIdentity, _x509
from strongroom.pki._x509 import verify_chain
from strongroom.pki.client import CaClient
from strongroom.pki.errors import CertificateInvalid, InvalidPkiConfig, NoIdentity
from strongroom.pki.token import mint_token
from strongroom.reasons import Reason
from tests.pki.helpers import make_ca, make_leaf, new_ca, pem, sid, token_for


@pytest.fixture(scope="module")
def new_root_ca(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepCa]:
    """A second CA of the same trust domain: the 'new root' of a root rotation."""
    running = new_ca(tmp_path_factory.mktemp("new") / "ca", step_ca_binary)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("order", ["new+old", "old+new"])
def test_a_two_root_bundle_enrols_renews_and_resumes_at_either_ca(
    ca: StepCa, new_root_ca: StepCa, order: str, tmp_path: Path
) -> None:
    old, new = ca, new_root_ca
    bundle = new.root_pem + old.root_pem if order == "new+old" else old.root_pem + new.root_pem
    for name, running in (("old", old), ("new", new)):
        client = CaClient(running.url, bundle)
        state = tmp_path / name
        identity = WorkloadIdentity.enrol(
            client, token_for(running, "inference"), state_dir=state, auto_renew=False
        )
        with identity:
            assert str(identity.spiffe_id) == sid("inference")
            identity.renew_now()
        with WorkloadIdentity.resume(client, state, auto_renew=False) as resumed:
            assert resumed.credentials.serial == identity.credentials.serial


def test_a_certificate_of_the_old_root_replaced_at_the_new_ca_is_left_to_expire(
    ca: StepCa, new_root_ca: StepCa, tmp_path: Path
) -> None:
    """Step 3 of a root rotation: enrolling at the new CA over an identity of the old one does not
    try to revoke the old certificate at the new CA, which neither trusts nor knows it (its
    renewal there is refused anyway)."""
    bundle = new_root_ca.root_pem + ca.root_pem
    state = tmp_path / "state"
    with WorkloadIdentity.enrol(
        CaClient(ca.url, bundle), token_for(ca, "inference"), state_dir=state, auto_renew=False
    ):
        pass
    client = CaClient(new_root_ca.url, bundle)
    with WorkloadIdentity.enrol(
        client, token_for(new_root_ca, "inference"), state_dir=state, auto_renew=False
    ) as moved:
        assert moved.status().unrevoked_serials == ()
    assert list(state.glob("superseded-*.pem")) == []


def test_a_fresh_token_from_the_new_ca_moves_a_restarted_workload_to_it(
    ca: StepCa, new_root_ca: StepCa, tmp_path: Path
) -> None:
    """Step 3 of a root rotation: a workload restarted with a token from the new CA resumed its
    certificate from the old one (it still verifies against the bundle) and ignored the token;
    its renewals then failed at the new CA, and once the certificate lapsed the token had expired
    too. A token naming another root (its ``sha`` claim) than the persisted chain's now enrols."""
    bundle = new_root_ca.root_pem + ca.root_pem
    state = tmp_path / "state"

    def token(at: StepCa) -> str:
        return mint_token(
            at.layout.provisioner(),
            ca_url=at.url,
            subject=sid("inference"),
            sans=[sid("inference")],
            root_pem=at.root_pem,
        )

    old_root = x509.load_pem_x509_certificate(ca.root_pem)
    new_root = x509.load_pem_x509_certificate(new_root_ca.root_pem)
    with WorkloadIdentity.start(
        CaClient(ca.url, bundle), token=token(ca), state_dir=state, auto_renew=False
    ) as first:
        verify_chain(first.credentials.chain, old_root)
    client = CaClient(new_root_ca.url, bundle)
    fresh = token(new_root_ca)
    with WorkloadIdentity.start(client, token=fresh, state_dir=state, auto_renew=False) as moved:
        verify_chain(moved.credentials.chain, new_root)
        moved.renew_now()  # the new CA renews it
        serial = moved.credentials.serial
    # Restarted again with the same (now used) token: resumed.
    with WorkloadIdentity.start(client, token=fresh, state_dir=state, auto_renew=False) as again:
        assert again.credentials.serial == serial


def test_a_root_file_with_a_certificate_that_is_not_a_root_is_refused(ca: StepCa) -> None:
    intermediate, intermediate_key = ca.layout.load_intermediate()
    with pytest.raises(InvalidPkiConfig) as refused:
        CaClient(ca.url, ca.root_pem + pem(intermediate))
    assert refused.value.reason == Reason.ROOT_BUNDLE_INVALID
    message = refused.value.message
    assert "certificate 2 of 2 in the root file" in message
    assert "not by itself" in message and "must hold only root CA certificates" in message

    leaf = make_leaf(intermediate, intermediate_key, uris=[sid("inference")])
    with pytest.raises(InvalidPkiConfig, match=r"certificate 1 of 2 .* CA:FALSE"):
        CaClient(ca.url, leaf.chain_pem + ca.root_pem)

    # Named as its own issuer, but signed by another key: not a root either.
    with pytest.raises(InvalidPkiConfig, match="self-signature does not verify"):
        CaClient(ca.url, ca.root_pem + pem(_self_named_ca_signed_by_another_key()))
    # No basicConstraints at all.
    with pytest.raises(InvalidPkiConfig, match="no basicConstraints"):
        CaClient(ca.url, pem(_self_signed_without_basic_constraints()))


def _self_named_ca_signed_by_another_key() -> x509.Certificate:
    return _self_named(
        "Strongroom Root CA", ca=True, signer=ec.generate_private_key(ec.SECP256R1())
    )


def _self_signed_without_basic_constraints() -> x509.Certificate:
    return _self_named("not a CA", ca=None)


def _self_named(
    common_name: str, *, ca: bool | None, signer: ec.EllipticCurvePrivateKey | None = None
) -> x509.Certificate:
    """A certificate named as its own issuer; signed by ``signer`` (else its own key), with
    basicConstraints CA ``ca`` (none if None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    return builder.sign(signer or key, hashes.SHA256())


# ----------------------------------------------------------------- a clock behind the CA's

BEHIND = timedelta(minutes=5)  # more than step-ca's one-minute backdate


def test_a_chain_not_yet_valid_at_local_time_names_the_clock(ca: StepCa, tmp_path: Path) -> None:
    client = ca.client()
    identity = WorkloadIdentity.enrol(
        client, token_for(ca, "inference"), state_dir=tmp_path, auto_renew=False
    )
    identity.close()
    credentials = identity.credentials
    starts = credentials.leaf.not_valid_before_utc
    local = starts - BEHIND
    with pytest.raises(CertificateInvalid) as refused:
        verify_chain(credentials.chain, client.roots, at=local)
    assert refused.value.reason == Reason.CERT_NOT_YET_VALID
    message = refused.value.message
    assert f"notBefore is {starts.isoformat()}" in message
    assert f"the local time is {local.isoformat()}" in message
    assert "clock" in message and f"serial 0x{credentials.serial:x}" in message

    # Resuming on such a host says why the persisted identity is not usable.
    with pytest.raises(NoIdentity, match="not valid yet at the local time"):
        WorkloadIdentity.resume(client, tmp_path, clock=lambda: local, auto_renew=False)

    # A chain that is early AND from another CA is not blamed on the clock.
    foreign, foreign_key = make_ca("Foreign Root")
    soon = datetime.now(UTC) + timedelta(hours=1)
    early = make_leaf(
        foreign, foreign_key, uris=[sid("x")], not_before=soon, not_after=soon + timedelta(hours=1)
    )
    with pytest.raises(CertificateInvalid) as other:
        verify_chain(early.chain, client.roots)
    assert other.value.reason == Reason.CHAIN_UNVERIFIED


def test_enrolling_with_a_clock_behind_the_ca_names_the_clock(
    ca: StepCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Behind(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Behind:
            real = datetime.now(tz)
            return cls.fromtimestamp(real.timestamp(), tz) - BEHIND

    monkeypatch.setattr(_x509, "datetime", Behind)
    with pytest.raises(CertificateInvalid, match=r"not valid yet .* clock is probably behind"):
        WorkloadIdentity.enrol(ca.client(), token_for(ca, "inference"), auto_renew=False)
