"""Per-workload JWK provisioners against a real step-ca: each issues only its own workload's identity.

A service's pod holds its own provisioner's key (deploy/README.md, "PKI"). step-ca looks a token's
provisioner up by its issuer and key id and verifies the signature with that provisioner's key, so
whatever a token minted with that key asks for, the provisioner's certificate template decides the
certificate: it refuses a token asking for anything but the workload's SANs, and never issues other
SANs. The operator's provisioner stays unrestricted (admin and publisher tokens, compose, dev stack).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509

from strongroom.pki import RenewalPolicy, StepCa, WorkloadIdentity, mint_token
from strongroom.pki._x509 import build_csr, generate_key
from strongroom.pki.bootstrap import Workload, operator_template, workload_template
from strongroom.pki.errors import CaRejected, InvalidPkiConfig
from strongroom.pki.layout import CaLayout
from strongroom.pki.token import with_identity_names
from strongroom.spiffe import identity_dns_name
from tests.pki.helpers import TRUST_DOMAIN, new_ca, sid

MODELSTORE_IPS = ("2001:DB8::1", "0:0:0:0:0:0:0:1")
WORKLOADS = (
    Workload("keybroker", ("keybroker", "keybroker.strongroom.svc", "localhost")),
    # IPs as an operator may write them; step-ca compares them canonical (2001:db8::1, ::1).
    Workload("modelstore", ("modelstore", MODELSTORE_IPS[0], MODELSTORE_IPS[1])),
    Workload("inference", ("inference", "127.0.0.1")),
)
SANS = {w.service: w.sans(TRUST_DOMAIN) for w in WORKLOADS}


@pytest.fixture(scope="module")
def wca(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepCa]:
    running = new_ca(tmp_path_factory.mktemp("wca") / "ca", step_ca_binary, workloads=WORKLOADS)
    try:
        yield running
    finally:
        running.stop()


def sign_with(ca: StepCa, kit: CaLayout, subject: str, sans: Sequence[str]) -> set[str]:
    """Mints a token with the kit's key for ``sans`` and a CSR with exactly them; the issued SANs."""
    token = mint_token(kit.provisioner(), ca_url=ca.url, subject=subject, sans=list(sans))
    # The token asks for the derived name of each SPIFFE ID too: so does the CSR.
    csr = build_csr(generate_key(), with_identity_names(sans))
    (leaf, *_) = ca.client().sign(csr, token)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names: set[str] = set(san.get_values_for_type(x509.UniformResourceIdentifier))
    names |= set(san.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


@pytest.mark.parametrize(
    ("pod", "subject", "sans"),
    [
        ("inference", sid("admin"), [sid("admin")]),
        ("inference", sid("publisher"), [sid("publisher")]),
        ("inference", sid("keybroker"), SANS["keybroker"]),
        ("inference", sid("keybroker"), [sid("keybroker"), "keybroker"]),
        # Its own SPIFFE ID with another service's DNS name, or too few or too many names.
        ("inference", sid("inference"), [sid("inference"), "inference", "keybroker"]),
        ("inference", sid("inference"), [sid("inference")]),
        ("inference", sid("inference"), [*SANS["inference"], "127.0.0.2"]),
        # Its own SANs under another subject (the certificate's common name).
        ("inference", sid("admin"), SANS["inference"]),
        ("modelstore", sid("keybroker"), SANS["keybroker"]),
        ("keybroker", sid("inference"), SANS["inference"]),
    ],
)
def test_a_workload_key_cannot_obtain_another_identity(
    wca: StepCa, pod: str, subject: str, sans: list[str]
) -> None:
    kit = wca.layout.workload(pod)
    try:
        issued = sign_with(wca, kit, subject, sans)
    except CaRejected as refused:
        assert "this provisioner issues only" in str(refused)
        assert sid(pod) in str(refused)
        return
    assert issued == set(SANS[pod]), f"{pod}'s provisioner issued {issued}"


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.service)
@pytest.mark.parametrize("rekey", [True, False], ids=["rekey", "renew"])
def test_each_workload_enrols_and_renews_with_its_own_provisioner(
    wca: StepCa, workload: Workload, rekey: bool
) -> None:
    kit = wca.layout.workload(workload.service)
    assert kit.provisioner_name == f"strongroom-{workload.service}"
    sans = SANS[workload.service]
    token = mint_token(kit.provisioner(), ca_url=kit.url, subject=sans[0], sans=sans)
    identity = WorkloadIdentity.enrol(
        wca.client(), token, policy=RenewalPolicy(rekey=rekey), auto_renew=False
    )
    with identity:
        assert identity.credentials.sans == set(sans)
        assert str(identity.credentials.spiffe_id) == sid(workload.service)
        subject = identity.credentials.leaf.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME
        )
        assert [a.value for a in subject] == [sid(workload.service)]
        first = identity.credentials.serial
        renewed = identity.renew_now()
        assert renewed.serial != first
        assert renewed.sans == set(sans)


def test_the_operator_provisioner_stays_unrestricted(wca: StepCa) -> None:
    # Admin and publisher tokens come from the operator's provisioner, as before.
    # (Its certificate carries the name derived from its ID, as every workload's does.)
    admin = {sid("admin"), identity_dns_name(sid("admin"))}
    assert sign_with(wca, wca.layout, sid("admin"), [sid("admin")]) == admin


def test_ca_directory_layout(wca: StepCa) -> None:
    layout = wca.layout
    config = json.loads(layout.config_path.read_text())
    by_name = {p["name"]: p for p in config["authority"]["provisioners"]}
    assert set(by_name) == {"strongroom", *(f"strongroom-{w.service}" for w in WORKLOADS)}
    assert by_name["strongroom"]["options"]["x509"]["template"] == operator_template()
    operator = by_name["strongroom"]
    for workload in WORKLOADS:
        entry = by_name[f"strongroom-{workload.service}"]
        assert entry["claims"] == operator["claims"]
        assert entry["options"]["x509"]["template"] == workload_template(
            sid(workload.service), workload.dns_names
        )
        kit = layout.workload(workload.service)
        assert entry["key"]["kid"] == kit.provisioner().kid != layout.provisioner().kid
        assert kit.sans == tuple(SANS[workload.service])
        assert layout.workloads[workload.service] == tuple(SANS[workload.service])
        # The kit holds its key, its metadata and the root: no CA key, no other provisioner key.
        files = sorted(
            str(p.relative_to(kit.directory)) for p in kit.directory.rglob("*") if p.is_file()
        )
        assert files == ["certs/root_ca.crt", "config/strongroom.json", "secrets/provisioner_key"]
        key_mode = stat.S_IMODE((kit.directory / "secrets" / "provisioner_key").stat().st_mode)
        assert key_mode == 0o600
        assert stat.S_IMODE((kit.directory / "secrets").stat().st_mode) == 0o700
        assert kit.root_pem == layout.root_pem
        assert kit.url == layout.url and kit.trust_domain == TRUST_DOMAIN
    with pytest.raises(InvalidPkiConfig, match="no provisioner for the workload 'admin'"):
        layout.workload("admin")


@pytest.mark.parametrize(
    "spec",
    [
        "Keybroker",
        "key broker",
        "keybroker=bad name",
        "keybroker=a..b",
        'keybroker=x"}}{{',
        "../keybroker",
    ],
)
def test_workload_names_are_checked(spec: str) -> None:
    with pytest.raises(InvalidPkiConfig):
        Workload.parse(spec)


@pytest.mark.parametrize(
    "name",
    [
        "spiffe-id.strongroom.invalid",
        "x.spiffe-id.strongroom.invalid",
        "X.Spiffe-ID.Strongroom.Invalid",
    ],
)
def test_no_operator_name_may_be_in_the_suffix_reserved_for_derived_names(
    tmp_path: Path, name: str
) -> None:
    """A derived name stands for one SPIFFE ID (channels expecting that ID check it): given to
    another workload, or to step-ca, it would let that one pass for the ID's workload."""
    from strongroom.pki import init_ca

    derived = identity_dns_name(sid("keybroker"))
    for spec in (f"inference={name}", f"inference={derived}"):
        with pytest.raises(InvalidPkiConfig, match="reserved") as refused:
            Workload.parse(spec)
        assert refused.value.reason == "DNS_NAME_RESERVED"
    with pytest.raises(InvalidPkiConfig, match="reserved"):
        workload_template(sid("inference"), [derived])
    with pytest.raises(InvalidPkiConfig, match="reserved"):
        init_ca(tmp_path / "ca", trust_domain=TRUST_DOMAIN, dns_names=["localhost", name])
    assert not (tmp_path / "ca").exists()
    # A token may carry only the derived names of the IDs it asks for.
    with pytest.raises(InvalidPkiConfig, match="reserved"):
        with_identity_names([sid("inference"), derived])
    assert with_identity_names([sid("inference"), "x"]) == [
        sid("inference"),
        identity_dns_name(sid("inference")),
        "x",
    ]


@pytest.mark.parametrize(
    "subject",
    [
        "*.spiffe-id.strongroom.invalid",  # gRPC's host-name check takes it for every derived name
        identity_dns_name(sid("keybroker")).upper(),
        identity_dns_name(sid("keybroker")) + ".",
        identity_dns_name(sid("keybroker")),
    ],
)
def test_a_token_whose_subject_is_a_reserved_name_is_refused(wca: StepCa, subject: str) -> None:
    """A token without SANs asks step-ca for a certificate naming its subject as its one SAN:
    mint_token checked the SANs it was given, none, and the operator's provisioner (no template)
    issued ``*.spiffe-id.strongroom.invalid``, which gRPC's host-name check accepts for every
    workload's derived name (tests/pki/test_server_identity.py). The subject is checked too."""
    with pytest.raises(InvalidPkiConfig, match="reserved") as refused:
        mint_token(wca.layout.provisioner(), ca_url=wca.url, subject=subject, sans=[])
    assert refused.value.reason == "DNS_NAME_RESERVED"
    with pytest.raises(InvalidPkiConfig, match="reserved"):
        mint_token(wca.layout.provisioner(), ca_url=wca.url, subject=subject, sans=[sid("x")])


def test_duplicate_workloads_are_refused(tmp_path: Path) -> None:
    from strongroom.pki import init_ca

    with pytest.raises(InvalidPkiConfig, match="distinct"):
        init_ca(
            tmp_path / "ca",
            trust_domain=TRUST_DOMAIN,
            workloads=[Workload("inference"), Workload("inference", ("x",))],
        )


def test_ip_addresses_written_any_way_enrol(wca: StepCa) -> None:
    """The template listed IPs as written and step-ca compares them canonical, so a workload
    given ``2001:DB8::1`` could never enrol."""
    kit = wca.layout.workload("modelstore")
    as_written = [sid("modelstore"), "modelstore", *MODELSTORE_IPS]
    assert sign_with(wca, kit, sid("modelstore"), as_written) == {
        sid("modelstore"),
        identity_dns_name(sid("modelstore")),
        "modelstore",
        "2001:db8::1",
        "::1",
    }


def _raw_token(ca: StepCa, subject: str, sans: Sequence[str]) -> str:
    """A token signed with the operator's key as another tool (``step ca token``) would sign
    it: none of mint_token's checks."""
    from datetime import timedelta

    from strongroom.pki.token import _signed, sign_audience

    return _signed(
        ca.layout.provisioner(),
        subject=subject,
        audience=sign_audience(ca.url),
        lifetime=timedelta(minutes=5),
        now=None,
        extra={"sans": list(sans)},
    )


@pytest.mark.parametrize(
    ("subject", "sans"),
    [
        (sid("admin"), [sid("admin"), "*.spiffe-id.strongroom.invalid"]),
        (sid("admin"), [sid("admin"), identity_dns_name(sid("keybroker")).upper()]),
        (sid("admin"), [sid("admin"), identity_dns_name(sid("keybroker")) + "."]),
        (sid("admin"), [sid("admin"), "spiffe-id.strongroom.invalid"]),
        ("*.spiffe-id.strongroom.invalid", []),
        (identity_dns_name(sid("keybroker")), [sid("admin")]),
    ],
)
def test_the_operators_provisioner_refuses_any_other_form_of_a_derived_name(
    wca: StepCa, subject: str, sans: list[str]
) -> None:
    """The operator's provisioner had no template: step-ca issued whatever its token asked, and
    a token made by another tool with its key (``step ca token --san``) got a certificate for
    ``*.spiffe-id.strongroom.invalid``, any case or a trailing dot, which gRPC's host-name check
    takes for every workload's derived name (tests/pki/test_server_identity.py). The CA itself
    now refuses them, and a subject in the suffix; the exact form stays the operator's."""
    csr = build_csr(generate_key(), sans or [subject])
    with pytest.raises(CaRejected, match="reserved for the names"):
        wca.client().sign(csr, _raw_token(wca, subject, sans))


def test_the_operators_provisioner_still_issues_any_identity_with_its_derived_name(
    wca: StepCa,
) -> None:
    """What the operator's key is for: any workload's identity, with its derived name."""
    sans = [sid("admin"), identity_dns_name(sid("admin")), "admin.example"]
    csr = build_csr(generate_key(), sans)
    chain = wca.client().sign(csr, _raw_token(wca, sid("admin"), sans))
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == set(sans[1:])
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid("admin")]
