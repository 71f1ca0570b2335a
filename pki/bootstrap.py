"""Creates a CA directory: root and intermediate (EC P-256), JWK provisioners and step-ca's ca.json.

One provisioner is the operator's, unrestricted (its key signs tokens for any identity and is never
given to a workload) but for the forms of names reserved for those derived from SPIFFE IDs
(:func:`operator_template`). Each :class:`Workload` gets a provisioner of its own whose certificate template
(``options.x509.template``) issues only that workload's SPIFFE ID and DNS names, whatever the token
or the CSR ask for: its key, the one a service's pod holds, can obtain no other identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from strongroom import jsonparse
from strongroom.errors import AlreadyExists
from strongroom.pki import _jose, layout
from strongroom.pki._duration import go_duration
from strongroom.pki._files import write_private, write_public
from strongroom.pki._x509 import generate_key
from strongroom.pki.client import check_ca_url
from strongroom.pki.errors import InvalidPkiConfig
from strongroom.pki.layout import CaLayout
from strongroom.reasons import Reason
from strongroom.spiffe import IDENTITY_DNS_SUFFIX, SpiffeId, identity_dns_name, is_reserved_dns_name

# No "none": without a database step-ca forgets used tokens at every restart and answers every
# revocation with HTTP 501, and Strongroom revokes each superseded certificate.
Database = Literal["bbolt", "badgerv2"]

_SERVICE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")


@dataclass(frozen=True)
class Workload:
    """A service identity ``spiffe://<trust domain>/<service>`` with its DNS names (or IPs).

    :func:`init_ca` gives it a JWK provisioner of its own, named ``<operator provisioner>-<service>``,
    that issues only this identity.
    """

    service: str
    dns_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _SERVICE.match(self.service):
            raise InvalidPkiConfig(
                f"workload name {self.service!r} must be lower-case letters, digits and '-'"
            )
        _check_names(self.dns_names)
        object.__setattr__(self, "dns_names", tuple(_canonical(n) for n in self.dns_names))

    @classmethod
    def parse(cls, spec: str) -> Workload:
        """``SERVICE`` or ``SERVICE=NAME,NAME,...`` (the form ``strongroom pki init --workload`` takes)."""
        service, _, names = spec.partition("=")
        return cls(service.strip(), tuple(n.strip() for n in names.split(",") if n.strip()))

    def spiffe_id(self, trust_domain: str) -> str:
        """The workload's SPIFFE ID in ``trust_domain``."""
        return str(SpiffeId.of(trust_domain, self.service))

    def sans(self, trust_domain: str) -> list[str]:
        """Exactly the SANs its certificates carry: the SPIFFE ID, the DNS name derived from it
        (:func:`~strongroom.spiffe.identity_dns_name`), then the operator's DNS names."""
        spiffe_id = self.spiffe_id(trust_domain)
        return [spiffe_id, identity_dns_name(spiffe_id), *self.dns_names]


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if not _is_ip(name) and not (len(name) <= 253 and _DNS_NAME.match(name)):
            raise InvalidPkiConfig(f"{name!r} is neither a DNS name nor an IP address")
        if is_reserved_dns_name(name):
            # A derived name stands for one SPIFFE ID: a channel expecting that ID accepts any
            # certificate carrying it, so only that workload's provisioner may issue it.
            raise InvalidPkiConfig(
                f"{name!r} is in the DNS suffix {IDENTITY_DNS_SUFFIX!r}, reserved for the names "
                "Strongroom derives from SPIFFE IDs (each workload's certificate gets its own); "
                "choose another name",
                reason=Reason.DNS_NAME_RESERVED,
            )


def _canonical(name: str) -> str:
    """An IP address as step-ca compares it (``2001:DB8::1`` is ``2001:db8::1``); names as given."""
    return str(ipaddress.ip_address(name)) if _is_ip(name) else name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


#: The end of every leaf template: key usages by key type (an RSA key also enciphers), both TLS
#: roles, and the closing brace.
_LEAF_USAGES = (
    '{{- if typeIs "*rsa.PublicKey" .Insecure.CR.PublicKey }}',
    '  "keyUsage": ["keyEncipherment", "digitalSignature"],',
    "{{- else }}",
    '  "keyUsage": ["digitalSignature"],',
    "{{- end }}",
    '  "extKeyUsage": ["serverAuth", "clientAuth"]',
    "}",
)


def workload_template(spiffe_id: str, dns_names: Sequence[str] = ()) -> str:
    """The X.509 template (step-ca ``options.x509.template``) that pins a provisioner to one identity.

    The certificate always carries exactly ``spiffe_id`` (URI SAN and subject common name), the
    DNS name derived from it (:func:`~strongroom.spiffe.identity_dns_name`, which channels
    expecting that ID check) and ``dns_names`` (DNS or IP SANs; none may be in the suffix
    reserved for derived names), whatever the token and the CSR ask for; and a token asking for
    anything else is refused with a message naming both, so that a mismatch is an error at
    enrolment rather than a certificate its holder did not expect. Only sprig functions that
    step-ca has offered since 0.15 (``list``, ``append``, ``uniq``, ``sortAlpha``, ``toJson``,
    ``fail``, ``typeIs``) are used.
    """
    SpiffeId.parse(spiffe_id)  # validates it (and so keeps '{{' and '"' out of the template)
    _check_names(dns_names)
    dns_names = [_canonical(n) for n in dns_names]
    ips = [n for n in dns_names if _is_ip(n)]
    dns = [identity_dns_name(spiffe_id), *(n for n in dns_names if not _is_ip(n))]
    allowed = [spiffe_id, *dns, *ips]
    go_list = " ".join(json.dumps(v) for v in allowed)
    lines = [
        f"{{{{- /* Strongroom: this provisioner issues only {spiffe_id} */ -}}}}",
        f"{{{{- $allowed := list {go_list} -}}}}",
        "{{- $asked := list -}}",
        "{{- range .SANs }}{{ $asked = append $asked .Value }}{{ end -}}",
        "{{- if ne (toJson (sortAlpha (uniq $asked))) (toJson (sortAlpha (uniq $allowed))) -}}",
        '{{- fail (printf "this provisioner issues only %s, not %s" '
        "(toJson $allowed) (toJson $asked)) -}}",
        "{{- end -}}",
        f"{{{{- if ne .Subject.CommonName {json.dumps(spiffe_id)} -}}}}",
        '{{- fail (printf "this provisioner issues only %s, not the subject %s" '
        f"{json.dumps(spiffe_id)} .Subject.CommonName) -}}}}",
        "{{- end }}",
        "{",
        f'  "subject": {{"commonName": {json.dumps(spiffe_id)}}},',
        f'  "uris": {json.dumps([spiffe_id])},',
        f'  "dnsNames": {json.dumps(dns)},',
        f'  "ipAddresses": {json.dumps(ips)},',
        *_LEAF_USAGES,
    ]
    return "\n".join(lines) + "\n"


def operator_template() -> str:
    """The X.509 template of the operator's provisioner: step-ca's default leaf template (the
    token's subject and SANs), refusing any name in the suffix reserved for derived names
    (:data:`~strongroom.spiffe.IDENTITY_DNS_SUFFIX`) but a derived name's one exact form (52
    lower-case base32 characters, then the suffix) and any such subject, whatever the token.

    gRPC's host-name check takes ``*.<suffix>`` for every derived name, and upper case and a
    trailing dot as the name itself: a token minted by another tool (``step ca token`` with the
    operator's key) asking for them would otherwise get a certificate passing for every workload
    with every channel expecting one. The exact form of another ID's name stays the operator's to
    ask for (its key signs any SPIFFE ID). Only sprig functions step-ca has offered since 0.15.
    """
    suffix = IDENTITY_DNS_SUFFIX
    exact = "^[a-z2-7]{52}[.]" + suffix.replace(".", "[.]") + "$"
    lines = [
        "{{- /* Strongroom: the operator's provisioner; no other form of a derived name */ -}}",
        "{{- range .SANs }}",
        '{{- $folded := lower (trimSuffix "." (trim .Value)) -}}',
        f'{{{{- if or (eq $folded "{suffix}") (hasSuffix ".{suffix}" $folded) -}}}}',
        f'{{{{- if not (regexMatch "{exact}" .Value) -}}}}',
        '{{- fail (printf "%s is in the DNS suffix '
        f"{suffix}"
        ', reserved for the names Strongroom derives from SPIFFE IDs, and is not one" .Value) -}}',
        "{{- end -}}",
        "{{- end -}}",
        "{{- end -}}",
        '{{- $cn := lower (trimSuffix "." (trim .Subject.CommonName)) -}}',
        f'{{{{- if or (eq $cn "{suffix}") (hasSuffix ".{suffix}" $cn) -}}}}',
        '{{- fail (printf "the subject %s is in the DNS suffix '
        f"{suffix}"
        ', reserved for the names Strongroom derives from SPIFFE IDs" .Subject.CommonName) -}}',
        "{{- end }}",
        "{",
        '  "subject": {{ toJson .Subject }},',
        '  "sans": {{ toJson .SANs }},',
        *_LEAF_USAGES,
    ]
    return "\n".join(lines) + "\n"


ROOT_VALIDITY = timedelta(days=3650)
INTERMEDIATE_VALIDITY = timedelta(days=1825)
# Only TLS 1.3 on the CA's own listener: every client of ours speaks it (Go's cipherSuites list
# applies to TLS 1.2 only and is kept for completeness).
_CA_TLS = {
    "cipherSuites": [
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ],
    "minVersion": 1.3,
    "maxVersion": 1.3,
    "renegotiation": False,
}


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidPkiConfig(f"address {address!r} must be HOST:PORT with a port in 1-65535")
    return host.strip("[]"), int(port_text)


def _url_for(host: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    except ValueError:
        pass
    return f"https://{host}:{port}"


def _ca_name(common_name: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strongroom"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    path_length: int,
    validity: timedelta,
    now: datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _plain_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _jwk_provisioner(
    name: str, key: ec.EllipticCurvePrivateKey, claims: dict[str, object], template: str | None
) -> dict[str, object]:
    provisioner: dict[str, object] = {
        "type": "JWK",
        "name": name,
        "key": _jose.public_jwk(key.public_key()),
        "claims": claims,
    }
    if template is not None:
        provisioner["options"] = {"x509": {"template": template}}
    return provisioner


def _encrypted_pem(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    # PKCS#8 PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC): the form step-ca's pemutil decrypts.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )


def _check_base(base: Path) -> None:
    """Creates the CA directory, or accepts an existing one only if it is this user's and no one
    else may write it.

    Whoever may write the CA directory can replace ``config/ca.json`` (adding a provisioner of
    their own) or ``certs/root_ca.crt`` once ``init`` is done, and step-ca, which holds the
    intermediate key, would then issue whatever they ask: a directory pre-created by another user
    (in ``/tmp``, say) or writable by group or others is refused before any secret is written.
    """
    try:
        base.mkdir(parents=True)
    except FileExistsError:
        info = base.stat()
        owner_ok = info.st_uid == os.geteuid()
        if not owner_ok or info.st_mode & 0o022:
            problem = (
                f"it belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
                if not owner_ok
                else f"group or others may write it (mode {info.st_mode & 0o777:o})"
            )
            raise InvalidPkiConfig(
                f"refusing to create a CA in {base}: {problem}; whoever may write it could "
                "replace the CA's configuration or root. Use a new directory, or one of yours "
                "that only you may write (chmod go-w)",
                reason=Reason.CA_DIR_UNSAFE,
            ) from None
    else:
        _restrict(base, 0o755)


@contextlib.contextmanager
def _init_lock(base: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on the CA directory while ``init`` writes it, and refuses if a
    CA appeared there meanwhile: two ``init`` runs that both passed the first check would
    otherwise each write their own password, keys and root, leaving a ``ca.json`` whose keys
    cannot be decrypted with the password beside them, or a root that did not sign the
    intermediate."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyExists(
                f"another `pki init` is creating a CA in {base}", reason=Reason.CA_INIT_IN_PROGRESS
            ) from None
        if (base / layout.CONFIG).exists():
            raise AlreadyExists(
                f"{base} already holds a CA; refusing to overwrite it", reason=Reason.CA_EXISTS
            )
        yield
    finally:
        os.close(fd)


def _make_dirs(base: Path, modes: dict[Path, int]) -> None:
    """Creates ``base / relative`` for each entry with at most its mode (see :func:`_restrict`)."""
    for relative, mode in modes.items():
        path = base / relative
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        _restrict(path, mode)


def _restrict(path: Path, mode: int) -> None:
    """Leaves ``path`` with at most ``mode`` and never writable by group or others: ``mkdir``
    alone would keep a umask of 002 (or 0, in some containers) making it so. A stricter umask (the
    demo's 077) is kept, not widened."""
    path.chmod(stat.S_IMODE(path.stat().st_mode) & mode & ~0o022)


def _layout_dirs(base: Path = Path()) -> dict[Path, int]:
    """The directories of a CA (or, under ``base``, a workload token directory) and their modes."""
    return {
        base / layout.CONFIG.parent: 0o755,
        base / layout.ROOT_CERT.parent: 0o755,
        base / layout.PASSWORD.parent: 0o700,
    }


def init_ca(
    directory: Path | str,
    *,
    trust_domain: str,
    dns_names: Sequence[str] = ("localhost",),
    address: str = "127.0.0.1:9000",
    default_lifetime: timedelta = timedelta(hours=1),
    max_lifetime: timedelta = timedelta(hours=24),
    min_lifetime: timedelta = timedelta(minutes=5),
    database: Database = "bbolt",
    provisioner_name: str = "strongroom",
    url: str | None = None,
    workloads: Sequence[Workload] = (),
) -> CaLayout:
    """Creates a new CA in ``directory`` (which must not hold one already) and returns its layout.

    ``directory`` is created (0755 at most, narrower under a stricter umask) if missing; an
    existing one must belong to this user and be writable by no one else (whoever may write it
    could replace ``ca.json`` or the root). No directory of the CA is left writable by group or
    others, whatever the umask.

    ``dns_names`` are the names (or IP addresses) in step-ca's own TLS certificate and its token
    audiences; ``url`` defaults to ``https://<dns_names[0]>:<port of address>``. Certificate
    lifetimes go into the provisioners' claims: ``min_lifetime`` may be lowered to seconds for tests.

    ``provisioner_name`` is the operator's provisioner (``secrets/provisioner_key``): it signs tokens
    for any identity in the trust domain and must never be handed to a workload. Each of
    ``workloads`` gets its own provisioner, restricted by :func:`workload_template`, and a token
    directory ``provisioners/<service>/`` (see :mod:`strongroom.pki.layout`) holding only what that
    workload needs to mint its own tokens: give a service that directory, never the CA's.
    """
    base = Path(directory).resolve()
    if (base / layout.CONFIG).exists():
        raise AlreadyExists(
            f"{base} already holds a CA; refusing to overwrite it", reason=Reason.CA_EXISTS
        )
    SpiffeId.of(trust_domain)  # validates the trust domain
    names = [n.strip() for n in dns_names if n.strip()]
    if not names:
        raise InvalidPkiConfig("the CA needs at least one DNS name or IP address")
    # They become step-ca's own certificate's SANs and every token's audience: a malformed one
    # would make a CA whose URL no client can verify, or a ca.json step-ca refuses.
    _check_names(names)
    _, port = _split_address(address)
    if not min_lifetime <= default_lifetime <= max_lifetime:
        raise InvalidPkiConfig(
            "certificate lifetimes must satisfy min <= default <= max "
            f"(got {min_lifetime}, {default_lifetime}, {max_lifetime})"
        )
    if min_lifetime < timedelta(seconds=1):
        raise InvalidPkiConfig("the minimum certificate lifetime must be at least 1s")
    if database not in ("bbolt", "badgerv2"):
        raise InvalidPkiConfig(
            f"CA database {database!r} is not bbolt or badgerv2: without one, step-ca cannot "
            "revoke certificates or remember used tokens across restarts"
        )
    if not provisioner_name or any(c in provisioner_name for c in ":/ "):
        raise InvalidPkiConfig(f"provisioner name {provisioner_name!r} is not a plain word")
    ca_url = url or _url_for(names[0], port)
    check_ca_url(ca_url)  # before anything is written: a CA no client could reach is no CA
    services = [w.service for w in workloads]
    if len(set(services)) != len(services):
        raise InvalidPkiConfig(f"workloads must be distinct, got {services}")

    now = datetime.now(UTC)
    password = secrets.token_urlsafe(32).encode()
    root_key = generate_key()
    root_name = _ca_name("Strongroom Root CA", trust_domain)
    root = _ca_certificate(
        root_name, root_key, root_name, root_key, path_length=1, validity=ROOT_VALIDITY, now=now
    )
    intermediate_key = generate_key()
    intermediate = _ca_certificate(
        _ca_name("Strongroom Intermediate CA", trust_domain),
        intermediate_key,
        root_name,
        root_key,
        path_length=0,
        validity=INTERMEDIATE_VALIDITY,
        now=now,
    )
    provisioner_key = generate_key()
    workload_keys = {w.service: generate_key() for w in workloads}

    _check_base(base)
    with _init_lock(base):
        dirs = {
            **_layout_dirs(),
            layout.DB: 0o700,
            layout.LOG.parent: 0o755,
            **({layout.WORKLOADS: 0o755} if workloads else {}),
        }
        for workload in workloads:
            kit = layout.workload_dir(workload.service)
            dirs |= {kit: 0o755, **_layout_dirs(kit)}
        _make_dirs(base, dirs)
        write_private(base / layout.PASSWORD, password + b"\n")
        write_private(base / layout.ROOT_KEY, _encrypted_pem(root_key, password))
        write_private(base / layout.INTERMEDIATE_KEY, _encrypted_pem(intermediate_key, password))
        write_private(base / layout.PROVISIONER_KEY, _plain_pem(provisioner_key))
        write_public(base / layout.ROOT_CERT, root.public_bytes(serialization.Encoding.PEM))
        write_public(
            base / layout.INTERMEDIATE_CERT, intermediate.public_bytes(serialization.Encoding.PEM)
        )

        db_config = (
            {"type": "bbolt", "dataSource": str(layout.DB / "step.db")}
            if database == "bbolt"
            else {"type": "badgerv2", "dataSource": str(layout.DB)}
        )
        claims: dict[str, object] = {
            "minTLSCertDuration": go_duration(min_lifetime),
            "maxTLSCertDuration": go_duration(max_lifetime),
            "defaultTLSCertDuration": go_duration(default_lifetime),
            "disableRenewal": False,
        }
        provisioners = [
            _jwk_provisioner(provisioner_name, provisioner_key, claims, operator_template())
        ]
        for workload in workloads:
            provisioners.append(
                _jwk_provisioner(
                    f"{provisioner_name}-{workload.service}",
                    workload_keys[workload.service],
                    claims,
                    workload_template(workload.spiffe_id(trust_domain), workload.dns_names),
                )
            )
        config = {
            "root": str(layout.ROOT_CERT),
            "federatedRoots": None,
            "crt": str(layout.INTERMEDIATE_CERT),
            "key": str(layout.INTERMEDIATE_KEY),
            "address": address,
            "insecureAddress": "",
            "dnsNames": names,
            "logger": {"format": "text"},
            "db": db_config,
            "authority": {
                # step-ca refuses a token issued (iat) before its process started, a stopgap of
                # its own "for the lack of a persistence layer": it broke every token minted
                # before the CA was up (the compose bootstrap mints them all before step-ca
                # starts; a Helm pod's init container may mint its token before the CA's pod is
                # up). This CA always has a database, which keeps each used token across restarts:
                # a token stays single-use (and expires) without that check.
                "disableIssuedAtCheck": True,
                "provisioners": provisioners,
            },
            "tls": _CA_TLS,
        }
        meta: dict[str, object] = {
            "trust_domain": trust_domain,
            "url": ca_url,
            "address": address,
            "dns_names": names,
            "provisioner_name": provisioner_name,
        }
        if workloads:
            meta["workloads"] = {
                w.service: {
                    "provisioner_name": f"{provisioner_name}-{w.service}",
                    "sans": w.sans(trust_domain),
                }
                for w in workloads
            }
        for workload in workloads:
            # The workload's token directory: laid out like a CA directory, holding only its own
            # provisioner (name and key, restricted to its SANs) and the root.
            kit = base / layout.workload_dir(workload.service)
            kit_meta = {
                **{k: v for k, v in meta.items() if k != "workloads"},
                "provisioner_name": f"{provisioner_name}-{workload.service}",
                "sans": workload.sans(trust_domain),
            }
            write_private(kit / layout.PROVISIONER_KEY, _plain_pem(workload_keys[workload.service]))
            write_public(kit / layout.ROOT_CERT, root.public_bytes(serialization.Encoding.PEM))
            write_public(kit / layout.META, json.dumps(kit_meta, indent=2).encode() + b"\n")
        write_public(base / layout.META, json.dumps(meta, indent=2).encode() + b"\n")
        # ca.json last: it is what marks the directory as holding a CA (``init`` refuses one that
        # has it, and so does the compose bootstrap), so an init that stops before it leaves a
        # directory the next ``init`` simply writes again; one that stopped after it but before
        # strongroom.json left a directory every command refused, ``init`` included.
        write_public(base / layout.CONFIG, json.dumps(config, indent=2).encode() + b"\n")
        return CaLayout.load(base)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`InvalidPkiConfig` naming the file for one that is
    missing, unreadable or not a JSON object (never a traceback from ``pki upgrade``)."""
    try:
        value = jsonparse.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidPkiConfig(
            f"{path.parent.parent} is not an initialised CA directory ({path} is missing)",
            reason=Reason.CA_DIR_MISSING,
        ) from None
    except ValueError as exc:
        raise InvalidPkiConfig(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidPkiConfig(f"{path} does not hold a JSON object")
    return value


def _template_of(provisioner: dict[str, Any]) -> str:
    """A provisioner's X.509 template as ca.json holds it ("" without one)."""
    options = provisioner.get("options")
    x509_options = options.get("x509") if isinstance(options, dict) else None
    template = x509_options.get("template") if isinstance(x509_options, dict) else None
    return template if isinstance(template, str) else ""


def upgrade_ca(directory: Path | str) -> list[str]:
    """Updates a CA made by an earlier version so that its workload provisioners issue the DNS
    name derived from each workload's SPIFFE ID (:func:`~strongroom.spiffe.identity_dns_name`),
    and returns the services whose provisioner it changed (none: already up to date).

    The operator's provisioner, when it has no template, gets :func:`operator_template` (and
    is listed as ``<name> (the operator's)``). A workload is up to date when both its recorded
    SANs and its provisioner's template in
    ``ca.json`` hold the name. Otherwise its template is made again by
    :func:`workload_template` from the SANs ``strongroom.json`` records for it, and those SANs,
    in ``strongroom.json`` and in the workload's token directory, gain the derived name; keys,
    names and everything else stay. step-ca reads ``ca.json`` when it starts: restart it after.
    A recorded DNS name in the reserved suffix is refused, and so is a directory whose
    ``ca.json`` or ``strongroom.json`` is not what ``init`` writes (missing, not JSON, a
    workload without its provisioner): :class:`InvalidPkiConfig` naming the file, nothing written.
    """
    base = Path(directory).resolve()
    config_path, meta_path = base / layout.CONFIG, base / layout.META
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        # A mistyped --dir (or a volume not mounted) is the operator's to fix: say so as the
        # other `pki` commands do, not with the bare OS error.
        raise InvalidPkiConfig(
            f"{base} is not an initialised CA directory (nothing to upgrade; `strongroom pki "
            "init` makes one)",
            reason=Reason.CA_DIR_MISSING,
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyExists(
                f"another `pki` command is writing the CA in {base}",
                reason=Reason.CA_INIT_IN_PROGRESS,
            ) from None
        config = _read_json(config_path)
        meta = _read_json(meta_path)
        try:
            trust_domain = str(meta["trust_domain"])
            provisioners = {p.get("name"): p for p in config["authority"]["provisioners"]}
            workloads = sorted(dict(meta.get("workloads") or {}).items())
            recorded_sans = {s: [str(n) for n in e["sans"]] for s, e in workloads}
            names = {s: str(e["provisioner_name"]) for s, e in workloads}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A directory every later step would misread: refused before anything is written.
            raise InvalidPkiConfig(
                f"{base} does not hold a CA this command can update ({config_path} or "
                f"{meta_path} is malformed: {type(exc).__name__} {exc})"
            ) from None
        changed: list[str] = []
        kits: dict[Path, bytes] = {}
        for service, entry in workloads:
            spiffe_id = str(SpiffeId.of(trust_domain, service))
            derived = identity_dns_name(spiffe_id)
            recorded = recorded_sans[service]
            provisioner = provisioners.get(names[service])
            if not isinstance(provisioner, dict):
                raise InvalidPkiConfig(
                    f"{config_path} has no provisioner {names[service]!r} for "
                    f"workload {service!r}, which {meta_path} records"
                )
            if derived in recorded and json.dumps(derived) in _template_of(provisioner):
                # Up to date. The template is read too: strongroom.json alone (recording the
                # name while a ca.json restored from before still lacks it) would leave a
                # provisioner refusing every token its workload mints.
                continue
            workload = Workload(
                service, tuple(n for n in recorded if n not in (spiffe_id, derived))
            )
            template = workload_template(spiffe_id, workload.dns_names)
            provisioner.setdefault("options", {}).setdefault("x509", {})["template"] = template
            entry["sans"] = workload.sans(trust_domain)
            kit_meta_path = base / layout.workload_dir(service) / layout.META
            if kit_meta_path.exists():
                kit_meta = _read_json(kit_meta_path)
                kit_meta["sans"] = entry["sans"]
                kits[kit_meta_path] = json.dumps(kit_meta, indent=2).encode() + b"\n"
            changed.append(service)
        operator_name = str(meta.get("provisioner_name", ""))
        operator = provisioners.get(operator_name)
        if isinstance(operator, dict) and not _template_of(operator):
            # An earlier version's operator provisioner had no template (step-ca issued any
            # form of a derived name); one of the operator's own is left as it is.
            options = operator.setdefault("options", {}).setdefault("x509", {})
            options["template"] = operator_template()
            changed.append(f"{operator_name} (the operator's)")
        if changed:
            # ca.json first: a stop between the writes leaves templates issuing the derived name
            # while strongroom.json still lacks it, which the next run completes.
            write_public(config_path, json.dumps(config, indent=2).encode() + b"\n")
            for path, data in kits.items():
                write_public(path, data)
            write_public(meta_path, json.dumps(meta, indent=2).encode() + b"\n")
        return changed
    finally:
        os.close(fd)
