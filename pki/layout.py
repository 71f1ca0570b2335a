"""Where a Strongroom CA directory keeps its files, and loading them back.

::

    <dir>/config/ca.json              step-ca configuration (paths in it are relative to <dir>)
    <dir>/config/strongroom.json      trust domain, CA URL and provisioner name
    <dir>/certs/root_ca.crt           the root to pin everywhere
    <dir>/certs/intermediate_ca.crt   the issuing CA
    <dir>/secrets/password            password of both CA keys (0600; step-ca reads it as a file)
    <dir>/secrets/root_ca_key         encrypted PKCS#8 (0600)
    <dir>/secrets/intermediate_ca_key encrypted PKCS#8 (0600)
    <dir>/secrets/provisioner_key     the operator's JWK provisioner key (ES256, PKCS#8 PEM, 0600):
                                      signs tokens for ANY identity; never give it to a workload
    <dir>/provisioners/<service>/     one workload's token directory, itself a (token-only) layout:
        config/strongroom.json        the CA's URL etc., its provisioner's name and its SANs
        secrets/provisioner_key       its own provisioner's key (0600), which step-ca lets issue
                                      only those SANs (the provisioner's certificate template)
        certs/root_ca.crt             the root
    <dir>/db/                         step-ca's database (used-token list, issued certificates)
    <dir>/logs/step-ca.log            step-ca's output when started by :class:`~strongroom.pki.stepca.StepCa`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom import jsonparse
from strongroom.cryptoparse import KEY_PARSE_ERRORS, X509_PARSE_ERRORS
from strongroom.pki import _jose
from strongroom.pki._files import read_private
from strongroom.pki.errors import InvalidPkiConfig
from strongroom.reasons import Reason

CONFIG = Path("config/ca.json")
META = Path("config/strongroom.json")
ROOT_CERT = Path("certs/root_ca.crt")
INTERMEDIATE_CERT = Path("certs/intermediate_ca.crt")
PASSWORD = Path("secrets/password")
ROOT_KEY = Path("secrets/root_ca_key")
INTERMEDIATE_KEY = Path("secrets/intermediate_ca_key")
PROVISIONER_KEY = Path("secrets/provisioner_key")
DB = Path("db")
LOG = Path("logs/step-ca.log")
WORKLOADS = Path("provisioners")


def workload_dir(service: str) -> Path:
    """The token directory of one workload's own provisioner, relative to the CA directory."""
    return WORKLOADS / service


@dataclass(frozen=True)
class Provisioner:
    """A JWK provisioner able to mint one-time tokens. Its key never appears in ``repr``."""

    name: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def kid(self) -> str:
        """The key id step-ca looks the provisioner up by: the JWK's RFC 7638 thumbprint."""
        return _jose.thumbprint(self.key.public_key())


@dataclass(frozen=True)
class CaLayout:
    """A CA directory made by :func:`~strongroom.pki.bootstrap.init_ca`."""

    directory: Path
    trust_domain: str
    url: str
    address: str
    dns_names: tuple[str, ...]
    provisioner_name: str
    # A workload's token directory: the only SANs its provisioner issues. Empty: unrestricted.
    sans: tuple[str, ...] = ()
    # The CA directory: service -> the SANs of that workload's own provisioner.
    workloads: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    @classmethod
    def load(cls, directory: Path | str) -> CaLayout:
        """Reads the layout of an initialised CA directory."""
        base = Path(directory).resolve()
        try:
            meta = jsonparse.loads((base / META).read_text())
            return cls(
                directory=base,
                trust_domain=str(meta["trust_domain"]),
                url=str(meta["url"]),
                address=str(meta["address"]),
                dns_names=tuple(str(n) for n in meta["dns_names"]),
                provisioner_name=str(meta["provisioner_name"]),
                sans=tuple(str(n) for n in meta.get("sans", ())),
                workloads={
                    str(service): tuple(str(n) for n in entry["sans"])
                    for service, entry in dict(meta.get("workloads", {})).items()
                },
            )
        except FileNotFoundError as exc:
            raise InvalidPkiConfig(
                f"{base} is not an initialised CA directory (run 'strongroom pki init')",
                reason=Reason.CA_DIR_MISSING,
            ) from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidPkiConfig(f"{base / META} is malformed: {exc}") from exc

    def path(self, relative: Path) -> Path:
        """Absolute path of one of the module-level relative paths."""
        return self.directory / relative

    @property
    def config_path(self) -> Path:
        """step-ca's ``ca.json``."""
        return self.directory / CONFIG

    @property
    def password_path(self) -> Path:
        """The file holding the CA keys' password."""
        return self.directory / PASSWORD

    @property
    def root_cert_path(self) -> Path:
        """The root certificate file."""
        return self.directory / ROOT_CERT

    @property
    def log_path(self) -> Path:
        """Where :class:`~strongroom.pki.stepca.StepCa` writes step-ca's output."""
        return self.directory / LOG

    @property
    def root_pem(self) -> bytes:
        """The root certificate, PEM: what every workload pins."""
        return self.root_cert_path.read_bytes()

    @property
    def port(self) -> int:
        """The TCP port step-ca listens on."""
        return int(self.address.rsplit(":", 1)[1])

    def workload(self, service: str) -> CaLayout:
        """The token directory of ``service``'s own provisioner (made by ``init_ca(workloads=)``)."""
        if service not in self.workloads:
            raise InvalidPkiConfig(
                f"{self.directory} has no provisioner for the workload {service!r} "
                f"(it has: {', '.join(sorted(self.workloads)) or 'none'})"
            )
        return CaLayout.load(self.directory / workload_dir(service))

    def provisioner(self) -> Provisioner:
        """Loads the JWK provisioner (name and signing key) for minting tokens."""
        key = self._private_key(PROVISIONER_KEY, None, "the provisioner key")
        return Provisioner(self.provisioner_name, key)

    def load_intermediate(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Loads the issuing CA certificate and key (for operator tooling and tests)."""
        password = read_private(self.password_path).strip()
        key = self._private_key(INTERMEDIATE_KEY, password, "the intermediate CA key")
        path = self.directory / INTERMEDIATE_CERT
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except X509_PARSE_ERRORS:
            raise InvalidPkiConfig(f"{path} is not a PEM certificate") from None
        return cert, key

    def _private_key(
        self, relative: Path, password: bytes | None, what: str
    ) -> ec.EllipticCurvePrivateKey:
        # The messages name the file, never its contents (it holds a private key).
        path = self.directory / relative
        try:
            key = serialization.load_pem_private_key(read_private(path), password=password)
        except KEY_PARSE_ERRORS:
            kind = "an unencrypted" if password is None else "a password-protected (CA password)"
            raise InvalidPkiConfig(f"{what} ({path}) is not {kind} PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidPkiConfig(f"{what} ({path}) is not an EC key")
        return key
