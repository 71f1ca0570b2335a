"""A simulated TEE for development and tests: a TEST PKI plus byte-exact signed SNP reports and TDX
quotes.

:class:`SimulatedAuthority` generates (or loads from a directory) a fake AMD chain (ARK and ASK/ASVK,
RSA-4096 RSASSA-PSS, like AMD's) and a fake Intel chain (SGX root, PCK platform CA, TCB signing),
every certificate marked ``Strongroom SIMULATED TEE - NOT FOR PRODUCTION`` in its subject. From it:

* :class:`SimulatedSnp` holds a VCEK or VLEK (P-384, with AMD's product/TCB/hwID extensions) and
  produces 1184-byte reports signed exactly as AMD firmware signs them;
* :class:`SimulatedTdx` holds a PCK certificate (with the SGX extension) and a Quoting Enclave
  attestation key, and produces v4/v5 quotes with a PCK-signed QE report binding that key, plus
  signed TCB info / QE identity collateral and CRLs.

Evidence from here verifies only against ``TrustStore.production().with_simulated_roots(...)``
(see :meth:`SimulatedAuthority.trust_store`); the production trust store rejects it. Regenerate a
fixture directory with ``python -m strongroom.dev.simulated DIR``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from strongroom.attestation.abi import _der
from strongroom.attestation.abi import certs as oids
from strongroom.attestation.abi import snp as snp_abi
from strongroom.attestation.abi import tdx as tdx_abi
from strongroom.attestation.abi.certs import SIMULATED_MARK, load_certificate
from strongroom.attestation.collateral import StaticCollateralSource
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.evidence import Collateral, CollateralKind, Evidence, TeeType
from strongroom.attestation.trust import TrustStore

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_UTC = dt.UTC
_PRODUCT_CPUID = {
    "Milan": (0x19, 0x01, 0x01),
    "Genoa": (0x19, 0x11, 0x01),
    "Turin": (0x1A, 0x02, 0x01),
}
_PRODUCT_NAME = {"Milan": "Milan-B0", "Genoa": "Genoa-B1", "Turin": "Turin"}
SIMULATED_QE_MRSIGNER = hashlib.sha256(b"strongroom simulated TD_QE signer").digest()
SIMULATED_CSP_ID = b"strongroom-sim"
"""The CSP_ID a simulated VLEK carries unless told otherwise (a real one names the cloud)."""
SIMULATED_FMSPC = bytes.fromhex("00906ed50000")
DEFAULT_SNP_POLICY = 0x30000  # SMT allowed, reserved bit 17 set, no debug, no migration agent


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIMULATED_MARK),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


def _cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: Any,
    signer: Any,
    now: dt.datetime,
    *,
    ca: bool,
    years: int = 25,
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    pss: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    if pss:
        return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)
    return builder.sign(signer, hashes.SHA256())


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


@dataclass
class SimulatedAuthority:
    """The simulated AMD and Intel PKI (keys and certificates)."""

    product: str
    ark_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    asvk_key: rsa.RSAPrivateKey
    asvk: x509.Certificate
    intel_root_key: ec.EllipticCurvePrivateKey
    intel_root: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck_ca: x509.Certificate
    tcb_signing_key: ec.EllipticCurvePrivateKey
    tcb_signing: x509.Certificate

    @classmethod
    def generate(
        cls, *, product: str = "Milan", now: dt.datetime | None = None
    ) -> SimulatedAuthority:
        """Creates a fresh simulated PKI (three RSA-4096 keys: about a second)."""
        if product not in _PRODUCT_CPUID:
            raise ValueError(f"unknown product {product!r}")
        now = now or dt.datetime.now(_UTC)
        ark_key = rsa.generate_private_key(65537, 4096)
        ark_name = _name(f"ARK-{product}")
        ark = _cert(ark_name, ark_name, ark_key.public_key(), ark_key, now, ca=True, pss=True)
        ask_key = rsa.generate_private_key(65537, 4096)
        ask = _cert(
            _name(f"SEV-{product}"), ark_name, ask_key.public_key(), ark_key, now, ca=True, pss=True
        )
        asvk_key = rsa.generate_private_key(65537, 4096)
        asvk = _cert(
            _name(f"SEV-VLEK-{product}"),
            ark_name,
            asvk_key.public_key(),
            ark_key,
            now,
            ca=True,
            pss=True,
        )
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name("Intel SGX Root CA")
        root = _cert(root_name, root_name, root_key.public_key(), root_key, now, ca=True)
        pck_ca_key = ec.generate_private_key(ec.SECP256R1())
        pck_ca = _cert(
            _name("Intel SGX PCK Platform CA"),
            root_name,
            pck_ca_key.public_key(),
            root_key,
            now,
            ca=True,
        )
        tcb_key = ec.generate_private_key(ec.SECP256R1())
        tcb_signing = _cert(
            _name("Intel SGX TCB Signing"), root_name, tcb_key.public_key(), root_key, now, ca=False
        )
        return cls(
            product, ark_key, ark, ask_key, ask, asvk_key, asvk, root_key, root, pck_ca_key,
            pck_ca, tcb_key, tcb_signing,
        )  # fmt: skip

    _FILES = (
        "ark", "ask", "asvk", "intel_root", "pck_ca", "tcb_signing",
    )  # fmt: skip

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Writes certificates (``*.pem``) and private keys (``*.key``) to ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in self._FILES:
            (out / f"{name}.pem").write_bytes(_pem(getattr(self, name)))
            key_path = out / f"{name}.key"
            key_path.write_bytes(_key_pem(getattr(self, f"{name}_key")))
            key_path.chmod(0o600)
        (out / "amd_trust.pem").write_bytes(
            b"".join(_pem(c) for c in (self.ark, self.ask, self.asvk))
        )
        (out / "README").write_text(
            f"{SIMULATED_MARK}\nGenerated by strongroom.dev.simulated for tests and "
            "development. Never trust these roots in production.\n"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SimulatedAuthority:
        """Reads a directory written by :meth:`save`."""
        src = Path(directory)
        values: dict[str, Any] = {}
        for name in cls._FILES:
            values[name] = load_certificate((src / f"{name}.pem").read_bytes())
            # OpenSSL's RSA consistency check (primality of p and q) costs ~0.3-1 s per RSA-4096
            # key, and every key-broker start, simulated attester and test that loads a stack's
            # chain paid it three times. These are test keys this class generated and saved
            # (0600), not keys from anyone else; a damaged file still fails to parse here, and a
            # key that does not match its certificate still makes signatures that do not verify.
            values[f"{name}_key"] = serialization.load_pem_private_key(
                (src / f"{name}.key").read_bytes(),
                password=None,
                unsafe_skip_rsa_key_validation=True,
            )
        product = values["ark"].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return cls(product=str(product).removeprefix("ARK-"), **values)

    def amd_root_pems(self) -> list[bytes]:
        """PEMs of the simulated ARK, ASK and ASVK (to pass to ``with_simulated_roots``)."""
        return [_pem(self.ark), _pem(self.ask), _pem(self.asvk)]

    def intel_root_pem(self) -> bytes:
        """PEM of the simulated Intel SGX root."""
        return _pem(self.intel_root)

    def trust_store(self, base: TrustStore | None = None) -> TrustStore:
        """``base`` (default: the production store) plus this authority's simulated roots."""
        return (base or TrustStore.production()).with_simulated_roots(
            amd=self.amd_root_pems(), intel=[self.intel_root_pem()]
        )

    def snp(
        self,
        *,
        signing_key: str = "VCEK",
        chip_id: bytes | None = None,
        tcb: snp_abi.TcbVersion | None = None,
        now: dt.datetime | None = None,
        csp_id: bytes | None = SIMULATED_CSP_ID,
    ) -> SimulatedSnp:
        """A simulated SNP platform with its own VCEK (or a VLEK, whose CSP_ID extension holds
        ``csp_id``, None for none) for ``tcb``."""
        return SimulatedSnp.create(
            self, signing_key=signing_key, chip_id=chip_id, tcb=tcb, now=now, csp_id=csp_id
        )

    def tdx(
        self, *, now: dt.datetime | None = None, fmspc: bytes = SIMULATED_FMSPC
    ) -> SimulatedTdx:
        """A simulated TDX platform with its own PCK certificate and QE attestation key."""
        return SimulatedTdx.create(self, now=now, fmspc=fmspc)

    def tcb_signing_chain_pem(self) -> bytes:
        """TCB-signing certificate and root, as Intel PCS returns them."""
        return _pem(self.tcb_signing) + _pem(self.intel_root)

    def sign_collateral(self, body_key: str, body: dict[str, Any]) -> bytes:
        """Signs a TCB info / QE identity body the way Intel PCS does (ECDSA over the raw JSON)."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        der = self.tcb_signing_key.sign(raw, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        sig = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
        return b'{"' + body_key.encode() + b'":' + raw + b',"signature":"' + sig.encode() + b'"}'

    def crl(
        self, issuer: str, revoked_serials: list[int] = (), *, now: dt.datetime | None = None,  # type: ignore[assignment]
        days: int = 30,
    ) -> bytes:  # fmt: skip
        """A DER CRL from ``"pck_ca"``, ``"intel_root"``, ``"ark"`` revoking the serials."""
        now = now or dt.datetime.now(_UTC)
        cert, key = getattr(self, issuer), getattr(self, f"{issuer}_key")
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(now - dt.timedelta(hours=1))
            .next_update(now + dt.timedelta(days=days))
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(hours=1))
                .build()
            )
        if isinstance(key, rsa.RSAPrivateKey):
            crl = builder.sign(key, hashes.SHA384(), rsa_padding=_PSS)
        else:
            crl = builder.sign(key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.DER)

    def pck_crl_chain_pem(self) -> bytes:
        """The issuer chain PCS sends with a PCK CRL (``SGX-PCK-CRL-Issuer-Chain``)."""
        return _pem(self.pck_ca) + _pem(self.intel_root)

    def collateral_source(
        self,
        *,
        tdx: Sequence[SimulatedTdx] = (),
        now: dt.datetime | None = None,
        days: int = 30,
        revoked: Mapping[str, list[int]] | None = None,
    ) -> StaticCollateralSource:
        """The verifier-side collateral for this PKI: ARK, Intel root and PCK CA CRLs (revoking
        ``revoked[issuer]`` serials), and each TDX platform's TCB info plus the QE identity."""
        revoked = revoked or {}
        crls = tuple(
            self.crl(issuer, revoked.get(issuer, []), now=now, days=days)
            for issuer in ("ark", "intel_root", "pck_ca")
        )
        return StaticCollateralSource(
            tcb_infos=tuple(p.tcb_info(now=now, days=days) for p in tdx),
            qe_identity=tdx[0].qe_identity(now=now, days=days) if tdx else None,
            signing_chain=self.tcb_signing_chain_pem(),
            crl_list=crls,
        )

    def fill_cache(
        self,
        cache: CollateralCache,
        *,
        tdx: Sequence[SimulatedTdx] = (),
        now: dt.datetime | None = None,
        days: int = 30,
    ) -> None:
        """Puts this PKI's simulated collateral into a collateral cache (the dev stack's broker
        verifies the simulated chain through the same cache as real collateral)."""
        ark_crl = self.crl("ark", now=now, days=days)
        cache.put_crl(ark_crl, scope="vcek")
        cache.put_crl(ark_crl, scope="vlek")
        cache.put_crl(self.crl("intel_root", now=now, days=days))
        cache.put_crl(self.crl("pck_ca", now=now, days=days), issuer_chain=self.pck_crl_chain_pem())
        for platform in tdx:
            cache.put_tdx_tcb_info(
                platform.tcb_info(now=now, days=days), self.tcb_signing_chain_pem()
            )
        if tdx:
            cache.put_tdx_qe_identity(
                tdx[0].qe_identity(now=now, days=days), self.tcb_signing_chain_pem()
            )


@dataclass
class SimulatedSnp:
    """A simulated SEV-SNP platform: a VCEK/VLEK and a report signer."""

    authority: SimulatedAuthority
    signing_key_kind: str
    chip_id: bytes
    tcb: snp_abi.TcbVersion
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(
        cls,
        authority: SimulatedAuthority,
        *,
        signing_key: str = "VCEK",
        chip_id: bytes | None = None,
        tcb: snp_abi.TcbVersion | None = None,
        now: dt.datetime | None = None,
        csp_id: bytes | None = SIMULATED_CSP_ID,
    ) -> SimulatedSnp:
        """Issues a VCEK (bound to ``chip_id`` and ``tcb``) or a VLEK (bound to ``tcb``, its
        CSP_ID extension the IA5String with content ``csp_id``; None for none)."""
        now = now or dt.datetime.now(_UTC)
        turin = authority.product == "Turin"
        if tcb is None:
            tcb = snp_abi.TcbVersion.from_components(
                bootloader=4, tee=0, snp=24, microcode=219, fmc=1 if turin else None
            )
        chip = chip_id if chip_id is not None else secrets.token_bytes(8 if turin else 64)
        chip = chip.ljust(64, b"\0") if turin else chip
        key = ec.generate_private_key(ec.SECP384R1())
        exts: list[x509.ExtensionType] = [
            _ext(oids.OID_AMD_STRUCT_VERSION, _der.encode_unsigned(0)),
            _ext(oids.OID_AMD_PRODUCT_NAME, _der.encode(_der.TAG_IA5STRING, _PRODUCT_NAME[authority.product].encode())),
            _ext(oids.OID_AMD_BL_SPL, _der.encode_unsigned(tcb.bootloader)),
            _ext(oids.OID_AMD_TEE_SPL, _der.encode_unsigned(tcb.tee)),
            _ext(oids.OID_AMD_SNP_SPL, _der.encode_unsigned(tcb.snp)),
            _ext(oids.OID_AMD_UCODE_SPL, _der.encode_unsigned(tcb.microcode)),
        ]  # fmt: skip
        if tcb.fmc is not None:
            exts.append(_ext(oids.OID_AMD_FMC_SPL, _der.encode_unsigned(tcb.fmc)))
        if signing_key == "VCEK":
            exts.append(_ext(oids.OID_AMD_HWID, chip[:8] if turin else chip))
            issuer, issuer_key = authority.ask, authority.ask_key
        elif signing_key == "VLEK":
            if csp_id is not None:
                exts.append(_ext(oids.OID_AMD_CSP_ID, _der.encode(_der.TAG_IA5STRING, csp_id)))
            issuer, issuer_key = authority.asvk, authority.asvk_key
        else:
            raise ValueError("signing_key must be VCEK or VLEK")
        cert = _cert(
            _name(f"SEV-{signing_key}"), issuer.subject, key.public_key(), issuer_key, now,
            ca=False, years=7, extensions=exts, pss=True,
        )  # fmt: skip
        return cls(authority, signing_key, chip, tcb, key, cert)

    @property
    def certificate_der(self) -> bytes:
        """The VCEK/VLEK certificate, DER."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def report(
        self,
        report_data: bytes,
        *,
        measurement: bytes,
        policy: int = DEFAULT_SNP_POLICY,
        vmpl: int = 0,
        reported_tcb: snp_abi.TcbVersion | None = None,
        launch_tcb: snp_abi.TcbVersion | None = None,
        committed_tcb: snp_abi.TcbVersion | None = None,
        guest_svn: int = 0,
        host_data: bytes = bytes(32),
        version: int = 3,
        signing_key_field: int | None = None,
        chip_id: bytes | None = None,
        family_id: bytes = bytes(16),
        image_id: bytes = bytes(16),
        id_key_digest: bytes = bytes(48),
        author_key_digest: bytes = bytes(48),
        platform_info: int = 0x1,
        cpuid: tuple[int, int, int] | None = None,
        sign_with: ec.EllipticCurvePrivateKey | None = None,
        patch: Mapping[int, bytes] | None = None,
    ) -> bytes:
        """A byte-exact 1184-byte report signed (ECDSA P-384/SHA-384) by this platform's key.

        Every field can be overridden to build well-signed reports with bad content; ``patch``
        writes bytes at offsets of the signed part before it is signed (a reserved byte set, say,
        which no named field reaches).
        """
        if len(report_data) != 64 or len(measurement) != 48:
            raise ValueError("report_data must be 64 bytes and measurement 48")
        tcb = reported_tcb or self.tcb
        fam, mod, step = cpuid or _PRODUCT_CPUID[self.authority.product]
        kind = (
            snp_abi.SIGNING_KEY_VCEK
            if self.signing_key_kind == "VCEK"
            else snp_abi.SIGNING_KEY_VLEK
        )
        fields = {
            "version": version,
            "guest_svn": guest_svn,
            "policy": policy,
            "family_id": family_id,
            "image_id": image_id,
            "id_key_digest": id_key_digest,
            "author_key_digest": author_key_digest,
            "author_key_en": any(author_key_digest),
            "vmpl": vmpl,
            "current_tcb": tcb,
            "platform_info": platform_info,
            "signing_key": kind if signing_key_field is None else signing_key_field,
            "report_data": report_data,
            "measurement": measurement,
            "host_data": host_data,
            "report_id": hashlib.sha256(report_data).digest(),
            "reported_tcb": tcb,
            "cpuid_fam_id": fam,
            "cpuid_mod_id": mod,
            "cpuid_step": step,
            "chip_id": self.chip_id if chip_id is None else chip_id,
            "committed_tcb": committed_tcb or tcb,
            "current_version": snp_abi.FirmwareVersion(1, 55, 29),
            "committed_version": snp_abi.FirmwareVersion(1, 55, 29),
            "launch_tcb": launch_tcb or tcb,
        }
        buf = snp_abi.build_report_body(fields)
        for offset, value in (patch or {}).items():
            if not 0 <= offset <= snp_abi.SIGNED_LENGTH - len(value):
                raise ValueError(f"patch at 0x{offset:03X} is outside the signed part")
            buf[offset : offset + len(value)] = value
        der = (sign_with or self.key).sign(
            bytes(buf[: snp_abi.SIGNED_LENGTH]), ec.ECDSA(hashes.SHA384())
        )
        r, s = decode_dss_signature(der)
        buf[0x2A0:0x2E8] = r.to_bytes(72, "little")
        buf[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(buf)

    def evidence(self, report_data: bytes, **kwargs: Any) -> Evidence:
        """The report wrapped as :class:`Evidence` with this platform's certificate."""
        return Evidence(
            TeeType.SEV_SNP, self.report(report_data, **kwargs), (self.certificate_der,)
        )


@dataclass
class SimulatedTdx:
    """A simulated TDX platform: PCK certificate, QE and attestation key."""

    authority: SimulatedAuthority
    fmspc: bytes
    pck_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey
    cpusvn_components: tuple[int, ...]
    pcesvn: int
    qe_isv_svn: int = 8
    qe_auth_data: bytes = field(default_factory=lambda: bytes(range(32)))

    @classmethod
    def create(
        cls,
        authority: SimulatedAuthority,
        *,
        now: dt.datetime | None = None,
        fmspc: bytes = SIMULATED_FMSPC,
        components: tuple[int, ...] = (7, 7, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0),
        pcesvn: int = 13,
    ) -> SimulatedTdx:
        """Issues a PCK certificate with the SGX extension for ``fmspc`` and TCB ``components``."""
        now = now or dt.datetime.now(_UTC)
        pck_key = ec.generate_private_key(ec.SECP256R1())
        tcb_items = [
            seq(_der.encode_oid(f"{oids.OID_SGX_TCB}.{i + 1}"), _der.encode_unsigned(v))
            for i, v in enumerate(components)
        ]
        tcb_items.append(seq(_der.encode_oid(oids.OID_SGX_PCESVN), _der.encode_unsigned(pcesvn)))
        tcb_items.append(
            seq(
                _der.encode_oid(oids.OID_SGX_CPUSVN),
                _der.encode(_der.TAG_OCTET_STRING, bytes(components)),
            )
        )
        sgx = seq(
            seq(_der.encode_oid(oids.OID_SGX_PPID), _der.encode(_der.TAG_OCTET_STRING, secrets.token_bytes(16))),
            seq(_der.encode_oid(oids.OID_SGX_TCB), seq(*tcb_items)),
            seq(_der.encode_oid(oids.OID_SGX_PCEID), _der.encode(_der.TAG_OCTET_STRING, b"\0\0")),
            seq(_der.encode_oid(oids.OID_SGX_FMSPC), _der.encode(_der.TAG_OCTET_STRING, fmspc)),
            seq(_der.encode_oid(oids.OID_SGX_TYPE), _der.encode_unsigned(0, _der.TAG_ENUMERATED)),
        )  # fmt: skip
        pck = _cert(
            _name("Intel SGX PCK Certificate"), authority.pck_ca.subject, pck_key.public_key(),
            authority.pck_ca_key, now, ca=False, years=7,
            extensions=[_ext(oids.OID_SGX_EXTENSIONS, sgx)],
        )  # fmt: skip
        return cls(
            authority=authority,
            fmspc=fmspc,
            pck_key=pck_key,
            pck=pck,
            attestation_key=ec.generate_private_key(ec.SECP256R1()),
            cpusvn_components=components,
            pcesvn=pcesvn,
        )

    def pck_chain_pem(self) -> bytes:
        """PCK, PCK CA and root, PEM, as the QE embeds them."""
        a = self.authority
        return _pem(self.pck) + _pem(a.pck_ca) + _pem(a.intel_root)

    def quote(
        self,
        report_data: bytes,
        *,
        mrtd: bytes,
        rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48), bytes(48), bytes(48), bytes(48)),
        td_attributes: bytes = bytes.fromhex("0000001000000000"),
        xfam: bytes = bytes.fromhex("e742060000000000"),
        tee_tcb_svn: bytes = bytes.fromhex("03000500000000000000000000000000"),
        mrconfigid: bytes = bytes(48),
        mrowner: bytes = bytes(48),
        mrownerconfig: bytes = bytes(48),
        mr_seam: bytes = bytes(48),
        mr_signer_seam: bytes = bytes(48),
        version: int = 4,
        body_type: int = tdx_abi.BODY_TYPE_TD10,
        tee_tcb_svn2: bytes | None = None,
        mr_servicetd: bytes | None = None,
        qe_report_data: bytes | None = None,
        qe_mrsigner: bytes = SIMULATED_QE_MRSIGNER,
        qe_sign_with: ec.EllipticCurvePrivateKey | None = None,
        pck_chain_pem: bytes | None = None,
        trailing: bytes = b"",
    ) -> bytes:
        """A byte-exact TDX quote signed by the attestation key, with a PCK-signed QE report.

        Every field can be overridden to build well-signed quotes with bad content.
        """
        if len(report_data) != 64 or len(mrtd) != 48:
            raise ValueError("report_data must be 64 bytes and mrtd 48")
        ak_pub = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        body = tdx_abi.TdQuoteBody(
            body_type=body_type,
            tee_tcb_svn=tee_tcb_svn,
            mr_seam=mr_seam,
            mr_signer_seam=mr_signer_seam,
            seam_attributes=bytes(8),
            td_attributes=td_attributes,
            xfam=xfam,
            mr_td=mrtd,
            mr_config_id=mrconfigid,
            mr_owner=mrowner,
            mr_owner_config=mrownerconfig,
            rtmrs=rtmrs,
            report_data=report_data,
            tee_tcb_svn2=(tee_tcb_svn2 or tee_tcb_svn)
            if body_type == tdx_abi.BODY_TYPE_TD15
            else None,
            mr_servicetd=(mr_servicetd or bytes(48))
            if body_type == tdx_abi.BODY_TYPE_TD15
            else None,
        )
        binding = hashlib.sha256(ak_pub + self.qe_auth_data).digest() + bytes(32)
        qe_report = tdx_abi.build_enclave_report(
            cpusvn=bytes(self.cpusvn_components),
            miscselect=0,
            attributes=bytes.fromhex("11000000000000000000000000000000"),
            mr_enclave=hashlib.sha256(b"strongroom simulated TD_QE").digest(),
            mr_signer=qe_mrsigner,
            isv_prod_id=2,
            isv_svn=self.qe_isv_svn,
            report_data=qe_report_data if qe_report_data is not None else binding,
        )
        qe_sig = _raw_p256(
            (qe_sign_with or self.pck_key).sign(qe_report, ec.ECDSA(hashes.SHA256()))
        )
        quote, signed = tdx_abi.build_quote(
            version=version,
            body_fields=body,
            signature=bytes(64),
            attestation_key=ak_pub,
            qe_report=qe_report,
            qe_report_signature=qe_sig,
            qe_auth_data=self.qe_auth_data,
            pck_chain_pem=pck_chain_pem if pck_chain_pem is not None else self.pck_chain_pem(),
        )
        sig = _raw_p256(self.attestation_key.sign(quote[:signed], ec.ECDSA(hashes.SHA256())))
        return quote[: signed + 4] + sig + quote[signed + 4 + 64 :] + trailing

    def tcb_info(
        self,
        *,
        now: dt.datetime | None = None,
        status: str = "UpToDate",
        tdx_components: tuple[int, ...] = (3, 0, 5) + (0,) * 13,
        fmspc: bytes | None = None,
        days: int = 30,
        evaluation_number: int = 17,
        issued: dt.datetime | None = None,
        advisory_ids: tuple[str, ...] = (),
    ) -> bytes:
        """A signed TCB info whose first level matches this platform with ``status`` (and lists
        ``advisory_ids``, as Intel's levels below UpToDate do)."""
        now = now or dt.datetime.now(_UTC)
        body = {
            "id": "TDX",
            "version": 3,
            "issueDate": _ts(issued or now - dt.timedelta(hours=1)),
            "nextUpdate": _ts(now + dt.timedelta(days=days)),
            "fmspc": (fmspc or self.fmspc).hex(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": evaluation_number,
            "tdxModule": {
                "mrsigner": "00" * 48,
                "attributes": "00" * 8,
                "attributesMask": "ff" * 8,
            },
            "tdxModuleIdentities": [],
            "tcbLevels": [
                _level(
                    self.cpusvn_components,
                    self.pcesvn,
                    tdx_components,
                    status,
                    "2024-03-13T00:00:00Z",
                )
                | ({"advisoryIDs": list(advisory_ids)} if advisory_ids else {}),
                _level((0,) * 16, 0, (0,) * 16, "OutOfDate", "2018-01-04T00:00:00Z"),
            ],
        }
        return self.authority.sign_collateral("tcbInfo", body)

    def qe_identity(
        self,
        *,
        now: dt.datetime | None = None,
        mrsigner: bytes = SIMULATED_QE_MRSIGNER,
        days: int = 30,
        status: str = "UpToDate",
    ) -> bytes:
        """A signed TD_QE identity that this platform's QE matches, its level at ``status``."""
        now = now or dt.datetime.now(_UTC)
        body = {
            "id": "TD_QE",
            "version": 2,
            "issueDate": _ts(now - dt.timedelta(hours=1)),
            "nextUpdate": _ts(now + dt.timedelta(days=days)),
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": mrsigner.hex().upper(),
            "isvprodid": 2,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": self.qe_isv_svn},
                    "tcbDate": "2024-03-13T00:00:00Z",
                    "tcbStatus": status,
                }
            ],
        }
        return self.authority.sign_collateral("enclaveIdentity", body)

    def collateral(
        self, *, now: dt.datetime | None = None, **tcb_kwargs: Any
    ) -> tuple[Collateral, ...]:
        """TCB info, QE identity and TCB-signing chain for this platform."""
        return (
            Collateral(CollateralKind.TDX_TCB_INFO, self.tcb_info(now=now, **tcb_kwargs)),
            Collateral(CollateralKind.TDX_QE_IDENTITY, self.qe_identity(now=now)),
            Collateral(CollateralKind.TCB_SIGNING_CHAIN, self.authority.tcb_signing_chain_pem()),
        )

    def evidence(
        self, report_data: bytes, *, now: dt.datetime | None = None, **quote_kwargs: Any
    ) -> Evidence:
        """A quote with its collateral as :class:`Evidence`."""
        return Evidence(
            TeeType.TDX, self.quote(report_data, **quote_kwargs), (), self.collateral(now=now)
        )


def seq(*items: bytes) -> bytes:
    """A DER SEQUENCE of already-encoded items."""
    return _der.encode(_der.TAG_SEQUENCE, b"".join(items))


def _level(
    comps: tuple[int, ...], pcesvn: int, tdx: tuple[int, ...], status: str, date: str
) -> dict[str, Any]:
    return {
        "tcb": {
            "sgxtcbcomponents": [{"svn": c} for c in comps],
            "pcesvn": pcesvn,
            "tdxtcbcomponents": [{"svn": c} for c in tdx],
        },
        "tcbDate": date,
        "tcbStatus": status,
    }


def _raw_p256(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _ts(when: dt.datetime) -> str:
    return when.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_fixtures(
    directory: str | os.PathLike[str], *, product: str = "Milan"
) -> SimulatedAuthority:
    """Generates a simulated PKI plus a sample SNP report and TDX quote with collateral in ``directory``."""
    out = Path(directory)
    authority = SimulatedAuthority.generate(product=product)
    authority.save(out)
    snp = authority.snp()
    report_data = hashlib.sha512(b"strongroom simulated fixture").digest()
    (out / "snp_report.bin").write_bytes(snp.report(report_data, measurement=bytes(range(48))))
    (out / "snp_vcek.der").write_bytes(snp.certificate_der)
    tdx = authority.tdx()
    (out / "tdx_quote.dat").write_bytes(tdx.quote(report_data, mrtd=bytes(range(48))))
    (out / "tdx_tcb_info.json").write_bytes(tdx.tcb_info())
    (out / "tdx_qe_identity.json").write_bytes(tdx.qe_identity())
    (out / "tcb_signing_chain.pem").write_bytes(authority.tcb_signing_chain_pem())
    return authority


def load_simulator(directory: str | Path) -> SimulatedAuthority:
    """The ``strongroom.simulators`` entry point: the simulated authority saved in ``directory``."""
    return SimulatedAuthority.load(directory)
