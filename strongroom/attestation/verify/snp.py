"""AMD SEV-SNP report verification.

Checks, in order: the report is signed (SIGNING_KEY not none, ``REPORT_UNSIGNED``); a
VLEK-signed report carries its VLEK (KDS serves VCEKs only, ``VLEK_CERTIFICATE_MISSING``); a
VCEK-signed report without its VCEK names its chip (KDS serves VCEKs by chip id: a masked
CHIP_ID is ``CHIP_ID_MASKED``, with no KDS fetch); the VCEK/VLEK chains to a pinned ASK/ASVK and
ARK (RSASSA-PSS, SHA-384, salt 48) and every certificate is valid at ``now``; supplied ASK/ARK
certificates are byte-identical to the pinned ones; the report's ECDSA P-384 signature verifies
with the VCEK/VLEK; the bindings between report and certificate: signing-key type, product,
reported TCB (VCEK TCB extensions), and the chip id (VCEK ``hwID``; ``CHIP_ID_MASKED`` when the
report's is masked); the ARK's CRL for the chain (KDS ``/vcek|vlek/v1/<product>/crl``) from the
verifier's collateral source must be current and must not revoke the ASK/ASVK (CRLs the evidence
carries are ignored: the party being judged cannot choose its judge); finally a report the
hypervisor requested (VMPL 0xFFFFFFFF, SNP_HV_REPORT_REQ) is refused, since it attests no guest
(``HOST_REQUESTED_REPORT``): that is said only of a report known genuine.

Verified chains are cached in the trust store keyed by the certificate bytes and used only inside
their validity window, so repeated verification costs one ECDSA verify.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from strongroom.attestation._x509 import (
    check_valid_at,
    ec_public_key,
    validity_window,
    verify_issued_by,
)
from strongroom.attestation.abi.certs import (
    AmdKeyCertInfo,
    certificates_from_bytes,
    load_certificate,
    parse_amd_key_cert,
)
from strongroom.attestation.abi.snp import (
    CPU_FAMILY_BY_PRODUCT,
    SIGNING_KEY_NONE,
    SIGNING_KEY_VCEK,
    SIGNING_KEY_VLEK,
    SnpReport,
    parse_snp_report,
)
from strongroom.attestation.claims import SnpClaims
from strongroom.attestation.collateral import CollateralSource, crl_amd_scope
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.attestation.evidence import Evidence
from strongroom.attestation.trust import AmdProductRoots, PinnedCert, TrustStore
from strongroom.attestation.verify import _crl
from strongroom.attestation.verify._named import named_certificates
from strongroom.reasons import Reason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _VerifiedKey:
    """A VCEK/VLEK whose chain verified, with what it says."""

    product: str
    info: AmdKeyCertInfo
    public_key: ec.EllipticCurvePublicKey
    chain: tuple[x509.Certificate, ...]  # key cert, ASK/ASVK, ARK
    simulated: bool


def _verify_key_chain(key_der: bytes, trust: TrustStore, now: datetime) -> _VerifiedKey:
    cert = load_certificate(key_der)
    info = parse_amd_key_cert(cert)
    candidates: list[tuple[AmdProductRoots, PinnedCert]] = []
    for roots in trust.amd_roots():
        signers = roots.asks if info.kind == "VCEK" else roots.asvks
        candidates += [(roots, s) for s in signers if s.cert.subject == cert.issuer]
    if not candidates:
        raise VerificationFailed(
            f"{info.kind} is issued by {cert.issuer.rfc4514_string()!r}, which is not a pinned "
            f"AMD {'ASK' if info.kind == 'VCEK' else 'ASVK'}",
            reason=Reason.ROOT_NOT_TRUSTED,
        )
    last_error: VerificationFailed | None = None
    for roots, signer in candidates:
        try:
            verify_issued_by(cert, signer.cert, amd_pss=True)
        except VerificationFailed as exc:
            last_error = exc
            continue
        if info.product != roots.product:
            raise VerificationFailed(
                f"{info.kind} names product {info.product_name!r} but chains to ARK-{roots.product}",
                reason=Reason.PRODUCT_MISMATCH,
            )
        chain = (cert, signer.cert, roots.ark.cert)
        for c, what in zip(chain, (info.kind, "ASK", "ARK"), strict=True):
            check_valid_at(c, now, what)
        public_key = ec_public_key(cert, ec.SECP384R1)
        return _VerifiedKey(
            product=roots.product,
            info=info,
            public_key=public_key,
            chain=chain,
            simulated=signer.simulated or roots.ark.simulated,
        )
    assert last_error is not None
    raise last_error


def _split_certificates(evidence: Evidence, trust: TrustStore) -> list[bytes]:
    """Returns the VCEK/VLEK DERs; any other certificate must be a pinned ASK/ASVK/ARK."""
    pinned = trust.amd_pinned_ders()
    keys: list[bytes] = []
    for blob in evidence.certificates:
        for der, cn in named_certificates(blob):
            if cn in ("SEV-VCEK", "SEV-VLEK"):
                keys.append(der)
            elif der not in pinned:
                raise VerificationFailed(
                    f"supplied certificate {cn!r} does not match any pinned AMD certificate",
                    reason=Reason.ROOT_NOT_TRUSTED
                    if cn.startswith("ARK-")
                    else Reason.INTERMEDIATE_NOT_PINNED,
                )
    unique = list(dict.fromkeys(keys))
    if len(unique) > 1:
        raise MalformedEvidence(
            "SNP evidence carries more than one VCEK/VLEK certificate",
            reason=Reason.BAD_CERTIFICATE,
        )
    return unique


def _check_bindings(report: SnpReport, key: _VerifiedKey) -> None:
    expected_field = SIGNING_KEY_VCEK if key.info.kind == "VCEK" else SIGNING_KEY_VLEK
    if report.signing_key != expected_field:
        raise VerificationFailed(
            f"report says it is signed by {report.signing_key_name} but the certificate is a "
            f"{key.info.kind}",
            reason=Reason.SIGNING_KEY_MISMATCH,
        )
    family = CPU_FAMILY_BY_PRODUCT[key.product]
    if report.cpuid_fam_id is not None and report.cpuid_fam_id != family:
        raise VerificationFailed(
            f"report CPUID family 0x{report.cpuid_fam_id:02X} does not match product {key.product}",
            reason=Reason.PRODUCT_MISMATCH,
        )
    if report.product is not None and report.product != key.product:
        # Milan and Genoa share family 0x19 and differ by model (Genoa from 0x10): a report whose
        # CPUID names one under the other's chain was accepted on the family alone, and then
        # judged (TCB minimums, `products`) as the chain's product.
        # Siena/Bergamo is named as such (the operator looks for that host), with the chain
        # AMD signs it under.
        processor = report.processor
        if processor != report.product:
            processor = f"{processor} processor (signed under ARK-{report.product})"
        else:
            processor = f"{processor} processor"
        raise VerificationFailed(
            f"report CPUID family 0x{report.cpuid_fam_id:02X} model 0x{report.cpuid_mod_id:02X} "
            f"is a {processor} but its {key.info.kind} chains to ARK-{key.product}",
            reason=Reason.PRODUCT_MISMATCH,
        )
    if report.cpuid_fam_id is None and key.product == "Turin":
        raise VerificationFailed(
            "a version-2 report cannot come from a Turin processor", reason=Reason.PRODUCT_MISMATCH
        )
    tcb = report.reported_tcb
    cert_tcb: dict[str, int] = {
        "bootloader": key.info.bootloader,
        "tee": key.info.tee,
        "snp": key.info.snp,
        "microcode": key.info.microcode,
    }
    if tcb.turin_layout:
        if key.info.fmc is None:
            raise VerificationFailed(
                f"the report has a Turin TCB (with FMC) but the {key.info.kind} has no FMC "
                "TCB extension",
                reason=Reason.TCB_MISMATCH,
            )
        cert_tcb = {"fmc": key.info.fmc, **cert_tcb}
    if tcb.components() != cert_tcb:
        raise VerificationFailed(
            f"report's reported TCB {tcb.components()} does not match the {key.info.kind}'s TCB "
            f"{cert_tcb}",
            reason=Reason.TCB_MISMATCH,
        )
    if not tcb.reserved_bytes_zero():
        raise VerificationFailed(
            f"report's reported TCB {tcb.components()} matches the {key.info.kind} but its "
            "reserved bytes are not zero",
            reason=Reason.TCB_MISMATCH,
        )
    if key.info.kind == "VCEK" and key.info.hwid != report.chip_id_for_kds():
        if report.chip_id_masked:
            raise _chip_id_masked("its VCEK cannot be bound to the chip (hwID)")
        raise VerificationFailed(
            "report chip id does not match the VCEK's hwID", reason=Reason.HWID_MISMATCH
        )


def fetched_vcek_mismatch(report: SnpReport, key: _VerifiedKey) -> str | None:
    """How a VCEK fetched for ``report`` from KDS differs from the one requested (a VCEK, of the
    report's product, for its chip id and reported TCB, exactly what the URL names), or None.

    KDS answers a request with the VCEK of that chip and TCB or not at all, whatever the report:
    a certificate for something else is the source's failure (a caching proxy that ignores the
    query, a mirror keyed wrongly), not the caller's. Judged with the report, a VCEK of another
    chip or TCB made a genuine report REPORT_SIGNATURE_INVALID (a forgery, the caller's)."""
    asked = report.reported_tcb.components()
    if key.info.kind != "VCEK":
        return f"it is a {key.info.kind}, not a VCEK"
    if report.product is not None and key.product != report.product:
        return f"it is a {key.product} VCEK, not a {report.product} one"
    if key.info.hwid != report.chip_id_for_kds():
        return "its hwID is not the chip id asked for"
    served = {
        "fmc": key.info.fmc,
        "bootloader": key.info.bootloader,
        "tee": key.info.tee,
        "snp": key.info.snp,
        "microcode": key.info.microcode,
    }
    served = {name: served[name] for name in asked}
    if served != asked:
        return f"its TCB {served} is not the TCB asked for {asked}"
    return None


def _chip_id_masked(consequence: str) -> VerificationFailed:
    """A VCEK-signed report whose CHIP_ID the firmware zeroed (the platform's MASK_CHIP_ID): the
    chip id is what binds a VCEK to its chip and what AMD KDS serves VCEKs by."""
    return VerificationFailed(
        f"the VCEK-signed SNP report masks its chip id (MASK_CHIP_ID: CHIP_ID is zeros), so "
        f"{consequence}; a platform that masks its chip id must sign with a VLEK",
        reason=Reason.CHIP_ID_MASKED,
    )


def _check_crl_scope(crl: bytes, scope: str, product: str) -> None:
    """The ARK signs its VCEK CRL (ASKs) and its VLEK CRL (ASVKs) under one name, so a CRL of the
    other scope would pass the issuer and signature checks and leave the chain's ASK or ASVK
    unchecked; one whose issuing distribution point names the other scope is refused."""
    named = crl_amd_scope(crl)
    if named is not None and named != scope:
        raise VerificationFailed(
            f"the CRL held for ARK-{product}'s {scope.upper()} chains is its {named.upper()} CRL "
            f"(issuing distribution point), which does not speak for the {scope.upper()} signer",
            reason=Reason.COLLATERAL_MISMATCH,
        )


def _verify_signature(report: SnpReport, key: _VerifiedKey) -> None:
    try:
        signature = encode_dss_signature(report.signature_r, report.signature_s)
        key.public_key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise VerificationFailed(
            f"SNP report signature does not verify with the {key.info.kind}",
            reason=Reason.REPORT_SIGNATURE_INVALID,
        ) from None


def verify_key_chain(key_der: bytes, trust: TrustStore, now: datetime) -> _VerifiedKey:
    """The VCEK/VLEK ``key_der`` chained to a pinned ASK/ASVK and ARK, every certificate valid at
    ``now`` (cached in ``trust``). Nothing of a report is judged: a failure here says only that
    the certificate is not AMD's, whoever supplied it."""
    cache_key = trust.cache.key("snp-key", key_der)
    key: _VerifiedKey | None = trust.cache.get(cache_key, now)
    if key is None:
        key = _verify_key_chain(key_der, trust, now)
        trust.cache.put(cache_key, validity_window(*key.chain), key)
    return key


def verify_report_key(
    report: SnpReport, key_der: bytes, trust: TrustStore, now: datetime
) -> _VerifiedKey:
    """The VCEK/VLEK ``key_der`` verified for ``report``: its chain to a pinned ASK/ASVK and ARK
    (:func:`verify_key_chain`), the report's signature with it, and the bindings between them.

    Revocation is not part of it (see :func:`verify_snp`). The collateral cache calls this before
    it stores a fetched VCEK, so that only one a genuine report was signed with is kept.
    """
    key = verify_key_chain(key_der, trust, now)
    _verify_signature(report, key)
    _check_bindings(report, key)
    return key


def verify_snp(
    evidence: Evidence,
    *,
    trust: TrustStore,
    now: datetime,
    collateral: CollateralSource | None,
    require_collateral: bool = True,
    grace: timedelta = timedelta(0),
) -> SnpClaims:
    """Verifies SEV-SNP evidence and returns its claims (see the module docstring)."""
    report = parse_snp_report(evidence.report)
    if report.signing_key == SIGNING_KEY_NONE:
        # MASK_CHIP_KEY: the firmware signed nothing (the signature is zeros), so no key can
        # verify it; said as such, and before a VCEK is fetched for it.
        raise VerificationFailed(
            "SNP report is unsigned (SIGNING_KEY none: the platform masks its chip key)",
            reason=Reason.REPORT_UNSIGNED,
        )
    keys = _split_certificates(evidence, trust)
    if keys:
        key_der = keys[0]
    elif report.signing_key == SIGNING_KEY_VLEK:
        # AMD KDS publishes VCEKs only: fetching one for a VLEK-signed report cost a KDS round
        # trip on every such release (a fetched VCEK that does not verify is not remembered) and
        # then named the report forged (REPORT_SIGNATURE_INVALID).
        raise MalformedEvidence(
            "the SNP report is VLEK-signed and the evidence carries no VLEK certificate (AMD KDS "
            "does not publish VLEKs: the attester must send the one from its certificate table)",
            reason=Reason.VLEK_CERTIFICATE_MISSING,
        )
    elif report.chip_id_masked:
        # AMD KDS serves a VCEK by chip id: a fetch for zeros cannot succeed, and cost a KDS
        # round trip (on every release once the failure was forgotten) before the refusal was
        # named the broker's own (COLLATERAL_MISSING, UNAVAILABLE: outside the caller's budget).
        raise _chip_id_masked("AMD KDS cannot serve its VCEK")
    else:
        fetched = collateral.snp_key_certificate(report) if collateral is not None else None
        if fetched is None:
            raise CollateralUnavailable(
                "no VCEK/VLEK certificate was supplied with the SNP report and none could be "
                "fetched",
                reason=Reason.COLLATERAL_MISSING,
            )
        key_der = certificates_from_bytes(fetched)[0]
    key = verify_report_key(report, key_der, trust, now)
    # Revocation comes after the signature and bindings so that a forged or mismatched report is
    # named as such; only the verifier's own CRL counts (evidence-carried CRLs are never read).
    signer, ark = key.chain[1], key.chain[2]
    scope = key.info.kind.lower()
    crl = collateral.crl(ark, scope) if collateral is not None else None
    revocation_checked = crl is not None or require_collateral
    if crl is not None:
        _check_crl_scope(crl, scope, key.product)
    if revocation_checked:
        # The ARK's CRL speaks for what the ARK issued, the ASK/ASVK; AMD publishes no CRL for
        # VCEKs/VLEKs.
        _crl.check_revocation(crl, ark, (signer,), now, grace=grace, what=f"ARK-{key.product}")
    if report.host_requested:
        # Genuine, but the hypervisor asked for it (SNP_HV_REPORT_REQ): the guest chose nothing
        # in it (REPORT_DATA is the firmware's zeros), so it attests no guest. Named as such
        # rather than as a REPORT_DATA or VMPL mismatch, and only once the report is known
        # genuine: after the signature (a forged one is named forged) and after revocation (one
        # signed under a revoked ASK/ASVK, whose key its holder can sign anything with, is named
        # revoked: the forger does not choose the audited reason by setting VMPL 0xFFFFFFFF).
        raise VerificationFailed(
            "SNP report was requested by the hypervisor (VMPL 0xFFFFFFFF, SNP_HV_REPORT_REQ), "
            "not by the guest: it attests no guest",
            reason=Reason.HOST_REQUESTED_REPORT,
        )
    return SnpClaims(
        version=report.version,
        product=key.product,
        signing_key=key.info.kind,
        measurement=report.measurement,
        report_data=report.report_data,
        host_data=report.host_data,
        family_id=report.family_id,
        image_id=report.image_id,
        id_key_digest=report.id_key_digest,
        author_key_digest=report.author_key_digest,
        report_id=report.report_id,
        policy=report.policy,
        platform_info=report.platform_info,
        vmpl=report.vmpl,
        guest_svn=report.guest_svn,
        chip_id=report.chip_id,
        reported_tcb=report.reported_tcb,
        committed_tcb=report.committed_tcb,
        current_tcb=report.current_tcb,
        launch_tcb=report.launch_tcb,
        current_version=report.current_version,
        committed_version=report.committed_version,
        simulated=key.simulated,
        revocation_checked=revocation_checked,
        vlek_csp_id=key.info.csp_id if key.info.kind == "VLEK" else None,
    )
