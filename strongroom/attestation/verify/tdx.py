"""Intel TDX quote verification (DCAP, ECDSA P-256 attestation key).

Checks, in order: the PCK chain embedded in the quote (PCK <- Platform/Processor CA <- Intel SGX
Root CA; exactly those, the root optional and then byte-identical to the pinned one, nothing
between the PEM blocks) ends at a pinned root and is valid at ``now``; CRLs (if supplied) do not
revoke it; the quote signature over header and body verifies with the attestation key; the QE
report signature verifies with the PCK key; the QE report data binds the attestation key and QE
auth data (``SHA-256(AK || auth data) || 32 zero bytes``). Then the verifier's own collateral (never the
evidence's): the Intel root CA CRL and the PCK CA's CRL must be current and revoke nothing in the
PCK chain or the TCB-signing chain; the TCB info and the QE identity must be signed over the exact
raw inner JSON by a TCB-signing certificate chaining to the pinned root and be current (within the
grace past ``nextUpdate``). The QE identity is mandatory: the PCE PCK-signs the report of any
production enclave, so without it a host-built "quoting enclave" could sign any TD body. Then the
TCB info's FMSPC/PCE-ID against the PCK certificate; the TDX module and QE identities; and finally
the TCB status, reported in the claims for the policy to judge.

:func:`verify_tdx` runs the steps in that order, each a function of its own: :func:`verify_pck_chain`
(the chain), :func:`verify_quote` (parsing and signatures), :func:`select_collateral` (the
verifier's TCB info and QE identity for this quote), :func:`check_revocation` and
:func:`evaluate_tcb` (the TCB status).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from strongroom.attestation._x509 import (
    check_valid_at,
    ec_public_key,
    validity_window,
    verify_issued_by,
)
from strongroom.attestation.abi.certs import (
    PckExtensions,
    certificates_from_bytes,
    common_name,
    load_certificate,
    parse_pck_extensions,
)
from strongroom.attestation.abi.tdx import TdQuoteBody, TdxQuote, parse_tdx_quote
from strongroom.attestation.claims import TCB_NOT_EVALUATED, TdxClaims
from strongroom.attestation.collateral import (
    INTEL_CA_BY_CN,
    CollateralSource,
    QeIdentity,
    SignedDocument,
    TcbInfo,
    parse_qe_identity,
    parse_tcb_info,
)
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.attestation.evidence import Evidence
from strongroom.attestation.trust import PinnedCert, TrustStore
from strongroom.attestation.verify import _crl, _tdx_tcb
from strongroom.reasons import Reason

logger = logging.getLogger(__name__)

PCK_LEAF_CN = "Intel SGX PCK Certificate"
PCK_CA_CNS = ("Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA")
TCB_SIGNING_CN = "Intel SGX TCB Signing"


@dataclass(frozen=True)
class VerifiedPck:
    """A PCK chain that verified to a pinned Intel root, with the PCK's key and extensions."""

    chain: tuple[x509.Certificate, ...]  # leaf, CA, root
    public_key: ec.EllipticCurvePublicKey
    extensions: PckExtensions
    simulated: bool


@dataclass(frozen=True)
class VerifiedSigner:
    """A TCB-signing chain that verified to a pinned Intel root, with the signer's key."""

    chain: tuple[x509.Certificate, ...]  # signing cert, root
    public_key: ec.EllipticCurvePublicKey
    simulated: bool


def _root_for(cert: x509.Certificate, trust: TrustStore) -> PinnedCert:
    for root in trust.intel_roots():
        if root.cert.subject == cert.issuer:
            try:
                verify_issued_by(cert, root.cert)
            except VerificationFailed:
                continue
            return root
    raise VerificationFailed(
        f"certificate {common_name(cert)!r} does not chain to a pinned Intel SGX root",
        reason=Reason.ROOT_NOT_TRUSTED,
    )


def _check_supplied_roots(certs: list[x509.Certificate], trust: TrustStore) -> None:
    pinned = {r.der for r in trust.intel_roots()}
    for cert in certs:
        if cert.subject == cert.issuer and cert.public_bytes(Encoding.DER) not in pinned:
            raise VerificationFailed(
                f"supplied root {common_name(cert)!r} is not the pinned Intel SGX Root CA",
                reason=Reason.ROOT_NOT_TRUSTED,
            )


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
_PEM_SPACE = b" \t\r\n"


def _pck_chain_certificates(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a quote's PCK chain, in order.

    Only whitespace may stand between the PEM blocks, and whitespace or NUL padding after the last
    (quote generators pad the certification data); anything else is data the chain was not
    supposed to carry, so the quote is refused rather than read past (``BAD_CERTIFICATE``).
    """
    text = bytes(pem).rstrip(b"\x00" + _PEM_SPACE)
    certs: list[x509.Certificate] = []
    pos = 0
    while pos < len(text):
        start = text.find(_PEM_BEGIN, pos)
        if text[pos : start if start >= 0 else len(text)].strip(_PEM_SPACE):
            raise MalformedEvidence(
                "TDX quote PCK chain carries data outside its PEM certificate blocks",
                reason=Reason.BAD_CERTIFICATE,
            )
        stop = text.find(_PEM_END, start)
        if stop < 0:
            raise MalformedEvidence(
                "unterminated PEM certificate block", reason=Reason.BAD_CERTIFICATE
            )
        pos = stop + len(_PEM_END)
        certs.append(load_certificate(text[start:pos]))
    return certs


def _check_supplied_pck_root(supplied: x509.Certificate, root: PinnedCert) -> None:
    """A root after the PCK CA must be the very pinned root the CA chains to."""
    if supplied.public_bytes(Encoding.DER) == root.der:
        return
    self_signed = supplied.subject == supplied.issuer
    raise VerificationFailed(
        f"the quote's third certificate {common_name(supplied)!r} is not the pinned Intel SGX Root "
        "CA its PCK CA chains to",
        reason=Reason.ROOT_NOT_TRUSTED if self_signed else Reason.CERT_CHAIN_INVALID,
    )


def _verify_pck_chain_uncached(pem: bytes, trust: TrustStore, now: datetime) -> VerifiedPck:
    certs = _pck_chain_certificates(pem)
    if len(certs) < 2:
        raise MalformedEvidence(
            "TDX quote PCK chain must hold the PCK certificate and its CA",
            reason=Reason.BAD_CERTIFICATE,
        )
    if len(certs) > 3:
        raise VerificationFailed(
            f"TDX quote PCK chain holds {len(certs)} certificates: expected the PCK certificate, "
            "its PCK CA and at most the Intel SGX Root CA",
            reason=Reason.CERT_CHAIN_INVALID,
        )
    leaf, ca = certs[0], certs[1]
    if common_name(leaf) != PCK_LEAF_CN or common_name(ca) not in PCK_CA_CNS:
        raise VerificationFailed(
            f"quote certificate chain is {common_name(leaf)!r} <- {common_name(ca)!r}, not a PCK "
            "certificate and its Intel PCK CA",
            reason=Reason.CERT_CHAIN_INVALID,
        )
    verify_issued_by(leaf, ca)
    root = _root_for(ca, trust)
    if len(certs) == 3:
        _check_supplied_pck_root(certs[2], root)
    chain = (leaf, ca, root.cert)
    for c, what in zip(chain, ("PCK", "PCK CA", "Intel root"), strict=True):
        check_valid_at(c, now, what)
    return VerifiedPck(
        chain=chain,
        public_key=ec_public_key(leaf, ec.SECP256R1),
        extensions=parse_pck_extensions(leaf),
        simulated=root.simulated,
    )


def verify_signing_chain(pem: bytes, trust: TrustStore, now: datetime) -> VerifiedSigner:
    """Verifies a TCB-signing chain (``Intel SGX TCB Signing`` <- pinned root) valid at ``now``."""
    certs = [load_certificate(d) for d in certificates_from_bytes(pem)]
    signer = certs[0]
    if common_name(signer) != TCB_SIGNING_CN:
        raise VerificationFailed(
            f"collateral signing certificate is {common_name(signer)!r}, not {TCB_SIGNING_CN!r}",
            reason=Reason.CERT_CHAIN_INVALID,
        )
    _check_supplied_roots(certs[1:], trust)
    root = _root_for(signer, trust)
    chain = (signer, root.cert)
    for c, what in zip(chain, ("TCB signing", "Intel root"), strict=True):
        check_valid_at(c, now, what)
    return VerifiedSigner(
        chain=chain, public_key=ec_public_key(signer, ec.SECP256R1), simulated=root.simulated
    )


def _raw_sig(signature: bytes) -> bytes:
    return encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )


def _verify_p256(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(_raw_sig(signature), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise MalformedEvidence(
            "quote attestation key is not a P-256 point", reason=Reason.BAD_FIELD
        ) from None


def _verify_quote_signatures(quote: TdxQuote, pck: VerifiedPck) -> None:
    sd = quote.signature_data
    ak = _attestation_key(sd.attestation_key)
    if not _verify_p256(ak, sd.signature, quote.signed_bytes):
        raise VerificationFailed(
            "TDX quote signature does not verify with the attestation key",
            reason=Reason.QUOTE_SIGNATURE_INVALID,
        )
    if not _verify_p256(pck.public_key, sd.qe_report_signature, sd.qe_report.raw):
        raise VerificationFailed(
            "QE report signature does not verify with the PCK certificate",
            reason=Reason.QE_REPORT_SIGNATURE_INVALID,
        )
    expected = hashlib.sha256(sd.attestation_key + sd.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(expected, sd.qe_report.report_data):
        raise VerificationFailed(
            "QE report data does not bind the attestation key and QE auth data",
            reason=Reason.QE_REPORT_DATA_MISMATCH,
        )


def check_signed_document(
    doc: TcbInfo | QeIdentity, signer_pem: bytes, trust: TrustStore, at: datetime
) -> VerifiedSigner:
    """Checks a TCB info / QE identity signature with a TCB-signing chain valid at ``at``."""
    name = "TCB info" if isinstance(doc, TcbInfo) else "QE identity"
    signer = verify_signing_chain(signer_pem, trust, at)
    if not _verify_p256(signer.public_key, doc.signature, doc.raw_body):
        raise VerificationFailed(
            f"{name} signature does not verify with the TCB signing certificate",
            reason=Reason.COLLATERAL_SIGNATURE_INVALID,
        )
    return signer


def _verified_collateral(
    kind: str, signed: SignedDocument, trust: TrustStore, now: datetime, grace: timedelta
) -> tuple[TcbInfo | QeIdentity, VerifiedSigner]:
    """Parses and verifies a signed TCB info / QE identity; cached by its bytes and signer chain."""
    cache_key = trust.cache.key("tdx-" + kind, signed.data, signed.issuer_chain)
    cached = trust.cache.get(cache_key, now)
    if cached is None:
        doc: TcbInfo | QeIdentity = (
            parse_tcb_info(signed.data) if kind == "tcb-info" else parse_qe_identity(signed.data)
        )
        signer = check_signed_document(doc, signed.issuer_chain, trust, now)
        # Cached inside the signer chain's validity only; freshness is checked on every use
        # because the grace past nextUpdate is the caller's.
        trust.cache.put(cache_key, validity_window(*signer.chain), (doc, signer))
    else:
        doc, signer = cached
    name = "TCB info" if kind == "tcb-info" else "QE identity"
    _crl.check_fresh(name, doc.issue_date, doc.next_update, now, grace)
    return doc, signer


def _check_module(quote: TdxQuote, tcb_info: TcbInfo) -> None:
    body = quote.body
    ident = _tdx_tcb.module_identity(tcb_info, body.tee_tcb_svn)
    if ident is None:
        return  # no identity for this module version: the TCB evaluation reports no match
    masked = bytes(a & m for a, m in zip(body.seam_attributes, ident.attributes_mask, strict=True))
    if ident.mrsigner != body.mr_signer_seam or masked != ident.attributes:
        raise VerificationFailed(
            "TDX module signer or attributes do not match the TCB info's module identity",
            reason=Reason.TDX_MODULE_MISMATCH,
        )


def _check_qe(quote: TdxQuote, qe: QeIdentity) -> None:
    report = quote.signature_data.qe_report
    masked_attrs = bytes(a & m for a, m in zip(report.attributes, qe.attributes_mask, strict=True))
    if (
        report.mr_signer != qe.mrsigner
        or report.isv_prod_id != qe.isv_prod_id
        or report.miscselect & qe.miscselect_mask != qe.miscselect
        or masked_attrs != qe.attributes
    ):
        raise VerificationFailed(
            "Quoting Enclave report does not match the QE identity (MRSIGNER, ISVPRODID, "
            "MISCSELECT or attributes)",
            reason=Reason.QE_IDENTITY_MISMATCH,
        )


def _missing(what: str) -> CollateralUnavailable:
    return CollateralUnavailable(
        f"{what} is needed and the verifier's collateral holds none",
        reason=Reason.COLLATERAL_MISSING,
    )


def check_revocation(  # noqa: PLR0917 - the step's inputs, in the order verify_tdx has them
    collateral: CollateralSource | None,
    pck: VerifiedPck,
    signers: list[VerifiedSigner],
    now: datetime,
    grace: timedelta,
    required: bool,
) -> bool:
    """Between steps 3 and 4, revocation: the PCK chain against the PCK CA's CRL and the PCK CA
    and TCB-signing certificates against the Intel root CA's CRL, both from ``collateral`` and
    current within ``grace``. True when checked; False only when not ``required`` and the
    collateral holds neither CRL."""
    leaf, ca, root = pck.chain
    ca_name = INTEL_CA_BY_CN.get(common_name(ca), "PCK")
    pck_crl = collateral.crl(ca) if collateral is not None else None
    root_crl = collateral.crl(root) if collateral is not None else None
    if not required and pck_crl is None and root_crl is None:
        return False
    _crl.check_revocation(pck_crl, ca, (leaf,), now, grace=grace, what=f"the {ca_name} CA")
    # Each CRL names exactly the certificates its CA issued: a TCB-signing certificate under
    # another root than the PCK chain's is refused by the check, never passed unchecked.
    covered = [ca, *(s.chain[0] for s in signers)]
    _crl.check_revocation(root_crl, root, covered, now, grace=grace, what="the Intel SGX Root CA")
    return True


def verify_pck_chain(pem: bytes, trust: TrustStore, now: datetime) -> VerifiedPck:
    """Step 1, the chain: the PCK chain a quote carries (PCK <- Platform/Processor CA <- pinned
    Intel SGX Root CA), every certificate valid at ``now``. The quote must carry exactly the PCK
    certificate and its CA, optionally followed by the root, which must be byte-identical to the
    pinned one; any other certificate, or data between the PEM blocks, is refused.

    A verified chain is cached in ``trust`` by its bytes and reused only inside its validity window.
    Revocation is checked later, against the verifier's own CRLs (:func:`check_revocation`).
    """
    cache_key = trust.cache.key("tdx-pck", pem)
    pck: VerifiedPck | None = trust.cache.get(cache_key, now)
    if pck is None:
        pck = _verify_pck_chain_uncached(pem, trust, now)
        trust.cache.put(cache_key, validity_window(*pck.chain), pck)
    return pck


@dataclass(frozen=True)
class VerifiedQuote:
    """A parsed TDX quote whose signatures verified, and the PCK chain that vouches for it."""

    quote: TdxQuote
    pck: VerifiedPck


def verify_quote(evidence: Evidence, trust: TrustStore, now: datetime) -> VerifiedQuote:
    """Step 2, the quote: parses it (structure only), verifies its PCK chain (step 1), then the
    quote signature (attestation key), the QE report signature (PCK key) and the QE report data's
    binding of the attestation key and QE auth data.

    TDX evidence carries its PCK chain inside the quote, so ``evidence.certificates`` must be empty.
    """
    quote = parse_tdx_quote(evidence.report)
    if evidence.certificates:
        raise MalformedEvidence(
            "TDX evidence carries its PCK chain inside the quote; certificates must be empty",
            reason=Reason.BAD_CERTIFICATE,
        )
    pck = verify_pck_chain(quote.signature_data.pck_chain_pem, trust, now)
    _verify_quote_signatures(quote, pck)
    return VerifiedQuote(quote=quote, pck=pck)


@dataclass(frozen=True)
class SelectedCollateral:
    """The verifier's own TCB info and QE identity for one quote, each signature-checked, fresh
    and matched to the quote (None only when absent and not required)."""

    tcb_info: TcbInfo | None
    qe_identity: QeIdentity | None
    signers: tuple[VerifiedSigner, ...]
    simulated: bool  # a signer chains to a simulated root


def select_collateral(  # noqa: PLR0917 - the step's inputs, in the order verify_tdx has them
    verified: VerifiedQuote,
    collateral: CollateralSource | None,
    trust: TrustStore,
    now: datetime,
    grace: timedelta,
    required: bool,
) -> SelectedCollateral:
    """Step 3, collateral selection: the TCB info for the PCK certificate's FMSPC and the TDX QE
    identity, taken only from ``collateral`` (the evidence's own collateral is never read).

    Each document must be signed over its exact raw JSON by a TCB-signing chain to the pinned root
    and be current within ``grace``. The QE identity must match the quote's QE report; the TCB
    info's FMSPC and PCE-ID must match the PCK certificate and its TDX module identity the quote's
    module. With ``required`` a missing document is ``COLLATERAL_MISSING``.
    """
    quote, ext = verified.quote, verified.pck.extensions
    tcb_signed = collateral.tdx_tcb_info(ext.fmspc) if collateral is not None else None
    qe_signed = collateral.tdx_qe_identity() if collateral is not None else None
    if required and tcb_signed is None:
        raise _missing(f"TDX TCB info for FMSPC {ext.fmspc.hex()}")
    if required and qe_signed is None:
        raise _missing("the TDX QE identity")
    tcb_info: TcbInfo | None = None
    qe_identity: QeIdentity | None = None
    signers: list[VerifiedSigner] = []
    if qe_signed is not None:
        doc, signer = _verified_collateral("qe-identity", qe_signed, trust, now, grace)
        assert isinstance(doc, QeIdentity)
        qe_identity = doc
        signers.append(signer)
        _check_qe(quote, qe_identity)
    if tcb_signed is not None:
        doc, signer = _verified_collateral("tcb-info", tcb_signed, trust, now, grace)
        assert isinstance(doc, TcbInfo)
        tcb_info = doc
        signers.append(signer)
        if tcb_info.fmspc != ext.fmspc:
            raise VerificationFailed(
                f"TCB info is for FMSPC {tcb_info.fmspc.hex()}, the PCK certificate's is "
                f"{ext.fmspc.hex()}",
                reason=Reason.FMSPC_MISMATCH,
            )
        if tcb_info.pce_id != ext.pce_id:
            raise VerificationFailed(
                "TCB info PCE-ID does not match the PCK certificate",
                reason=Reason.COLLATERAL_MISMATCH,
            )
        _check_module(quote, tcb_info)
    return SelectedCollateral(
        tcb_info=tcb_info,
        qe_identity=qe_identity,
        signers=tuple(signers),
        simulated=any(s.simulated for s in signers),
    )


_NOT_EVALUATED = _tdx_tcb.TcbEvaluation(TCB_NOT_EVALUATED, TCB_NOT_EVALUATED, None, None, None, ())


def evaluate_tcb(
    body: TdQuoteBody,
    qe_isv_svn: int,
    pck: PckExtensions,
    tcb_info: TcbInfo | None,
    qe_identity: QeIdentity | None,
) -> _tdx_tcb.TcbEvaluation:
    """Step 4, TCB evaluation: the TCB status of the platform (PCK TCB), the TDX module
    (TEE_TCB_SVN) and the QE (ISVSVN) against verified collateral, for the policy to judge.

    For a TD 1.5 body Intel's TD relaunch check follows (:func:`_tdx_tcb.relaunch`): a TD out of
    date only because of its TDX module, now running the newest one (TEE_TCB_SVN2), is
    TdRelaunchAdvised; the other fields describe the launch-time evaluation. Without TCB info the status is ``NotEvaluated``, which no policy
    accepts.
    """
    if tcb_info is None:
        return _NOT_EVALUATED

    def at(tee_tcb_svn: bytes) -> _tdx_tcb.TcbEvaluation:
        return _tdx_tcb.evaluate(
            tcb_info=tcb_info,
            qe_identity=qe_identity,
            pck_components=pck.tcb_components,
            pck_pcesvn=pck.pcesvn,
            tee_tcb_svn=tee_tcb_svn,
            qe_isv_svn=qe_isv_svn,
        )

    launch = at(body.tee_tcb_svn)
    if body.tee_tcb_svn2 is None or launch.status not in _tdx_tcb.INTEL_STATUSES:
        return launch
    status = _tdx_tcb.relaunch(
        launch,
        tcb_info=tcb_info,
        pck_components=pck.tcb_components,
        pck_pcesvn=pck.pcesvn,
        tee_tcb_svn2=body.tee_tcb_svn2,
    )
    return replace(launch, status=status)


def _evaluation_number(tcb_info: TcbInfo | None, qe_identity: QeIdentity | None) -> int | None:
    """The TCB recovery the verdict rests on, Intel's ``tcb_eval_ref_num``: the lower of the TCB
    info's and the QE identity's ``tcbEvaluationDataNumber`` (the QE is judged by the identity, and
    the two are fetched and refreshed apart). A QE identity without one vouches for no recovery."""
    if tcb_info is None:
        return None
    if qe_identity is None:
        return tcb_info.tcb_evaluation_data_number
    return min(tcb_info.tcb_evaluation_data_number, qe_identity.tcb_evaluation_data_number or 0)


def verify_tdx(
    evidence: Evidence,
    *,
    trust: TrustStore,
    now: datetime,
    collateral: CollateralSource | None,
    require_collateral: bool = True,
    grace: timedelta = timedelta(0),
) -> TdxClaims:
    """Verifies TDX evidence and returns its claims (see the module docstring): the quote and its
    chain, the verifier's collateral, revocation, then the TCB status."""
    verified = verify_quote(evidence, trust, now)
    selected = select_collateral(verified, collateral, trust, now, grace, require_collateral)
    revocation_checked = check_revocation(
        collateral, verified.pck, list(selected.signers), now, grace, require_collateral
    )
    quote, ext = verified.quote, verified.pck.extensions
    body = quote.body
    qe_svn = quote.signature_data.qe_report.isv_svn
    tcb = evaluate_tcb(body, qe_svn, ext, selected.tcb_info, selected.qe_identity)
    tcb_info = selected.tcb_info
    return TdxClaims(
        version=quote.header.version,
        body_type=body.body_name,
        tee_tcb_svn=body.tee_tcb_svn,
        tee_tcb_svn2=body.tee_tcb_svn2,
        mr_seam=body.mr_seam,
        mr_signer_seam=body.mr_signer_seam,
        seam_attributes=body.seam_attributes,
        td_attributes=body.td_attributes,
        xfam=body.xfam,
        mrtd=body.mr_td,
        mrconfigid=body.mr_config_id,
        mrowner=body.mr_owner,
        mrownerconfig=body.mr_owner_config,
        rtmrs=body.rtmrs,
        report_data=body.report_data,
        mr_servicetd=body.mr_servicetd,
        debug=body.debug,
        fmspc=ext.fmspc,
        pce_id=ext.pce_id,
        pcesvn=ext.pcesvn,
        cpusvn=ext.cpusvn,
        sgx_type=ext.sgx_type,
        qe_isv_svn=qe_svn,
        tcb_status=tcb.status,
        platform_tcb_status=tcb.platform_status,
        tdx_module_tcb_status=tcb.module_status,
        qe_tcb_status=tcb.qe_status,
        tcb_date=tcb.tcb_date,
        advisory_ids=tcb.advisory_ids,
        collateral_evaluated=tcb_info is not None,
        simulated=verified.pck.simulated or selected.simulated,
        revocation_checked=revocation_checked,
        qe_identity_checked=selected.qe_identity is not None,
        tcb_evaluation_data_number=_evaluation_number(tcb_info, selected.qe_identity),
    )
