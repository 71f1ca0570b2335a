"""TDX collateral (Intel PCS TCB info and QE identity) parsing, and the collateral getter interface.

The PCS response bodies are ``{"tcbInfo": {...}, "signature": "<hex r||s>"}`` and
``{"enclaveIdentity": {...}, "signature": ...}``; the ECDSA P-256 signature covers the exact raw
bytes of the inner object text, so parsing keeps those bytes rather than re-serialising.

:class:`CollateralSource` is how a verifier obtains collateral the evidence did not carry (AMD KDS
VCEKs, Intel PCS TCB info ...). It is an interface so that tests, offline caches and network
getters are interchangeable; :class:`StaticCollateralSource` serves fixed documents.
"""

from __future__ import annotations

import functools
import itertools
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from strongroom import jsonparse
from strongroom.attestation._x509 import parse_crl
from strongroom.attestation.abi.snp import SnpReport
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
)
from strongroom.cryptoparse import X509_PARSE_ERRORS
from strongroom.reasons import Reason

_WS = " \t\r\n"


def _bad(what: str) -> MalformedEvidence:
    return MalformedEvidence(f"TDX collateral: {what}", reason=Reason.BAD_COLLATERAL)


def split_signed_json(data: bytes, body_key: str) -> tuple[bytes, bytes, Any]:
    """Returns ``(raw inner object bytes, signature bytes, parsed inner object)``.

    The top level must be an object with exactly ``body_key`` and ``signature``.
    """
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("not UTF-8 text") from None
    decoder = json.JSONDecoder()
    members: dict[str, tuple[int, int, Any]] = {}
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        raise _bad("top level is not a JSON object")
    pos = _skip(text, pos + 1)
    try:
        while not text.startswith("}", pos):
            if members:
                if not text.startswith(",", pos):
                    raise _bad("expected ',' between members")
                pos = _skip(text, pos + 1)
            if not text.startswith('"', pos):
                raise _bad("expected a member name")
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise _bad("expected ':'")
            start = _skip(text, pos + 1)
            value, end = decoder.raw_decode(text, start)
            if key in members:
                raise _bad(f"duplicate member {key!r}")
            members[key] = (start, end, value)
            pos = _skip(text, end)
    except json.JSONDecodeError as exc:
        raise _bad(f"invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise _bad("JSON nested too deeply") from None
    except ValueError:
        # e.g. an integer literal longer than the interpreter's digit limit
        raise _bad("invalid JSON value") from None
    if text[_skip(text, pos + 1) :]:
        raise _bad("data after the JSON object")
    if set(members) != {body_key, "signature"}:
        raise _bad(f"expected exactly {body_key!r} and 'signature', got {sorted(members)}")
    start, end, body = members[body_key]
    sig_hex = members["signature"][2]
    if not isinstance(body, dict) or not isinstance(sig_hex, str):
        raise _bad("body must be an object and signature a hex string")
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        raise _bad("signature is not hex") from None
    if len(signature) != 64:
        raise _bad("signature must be 64 bytes (r||s)")
    return text[start:end].encode("utf-8"), signature, body


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


# Every integer Intel publishes in TCB info / QE identity (SVNs, ISVPRODID, evaluation numbers)
# fits in 32 bits; anything larger is malformed, not a value to compare.
_MAX_INT = 0xFFFFFFFF


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad(f"{where}.{key} is missing or has the wrong type")
    if isinstance(value, int) and not 0 <= value <= _MAX_INT:
        raise _bad(f"{where}.{key} is out of range")
    return value


def _advisories(level: Mapping[str, Any], where: str) -> tuple[str, ...]:
    value = level.get("advisoryIDs", [])
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _bad(f"{where}.advisoryIDs must be a list of strings")
    return tuple(value)


def _hex(obj: Mapping[str, Any], key: str, size: int, where: str) -> bytes:
    value = _get(obj, key, str, where)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise _bad(f"{where}.{key} is not hex") from None
    if len(raw) != size:
        raise _bad(f"{where}.{key} must be {size} bytes")
    return raw


def _time(obj: Mapping[str, Any], key: str, where: str) -> datetime:
    value = _get(obj, key, str, where)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"{where}.{key} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise _bad(f"{where}.{key} has no time zone")
    return parsed


@dataclass(frozen=True)
class TcbLevel:
    """One platform TCB level of a TDX TCB info."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...]
    tcb_date: str
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class ModuleTcbLevel:
    """One TCB level of a TDX module identity (or of a QE identity)."""

    isvsvn: int
    tcb_date: str
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    """A TDX module's expected signer and attributes, with its TCB levels (empty for the base)."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[ModuleTcbLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    """A parsed TDX TCB info (version 3)."""

    raw_body: bytes
    signature: bytes
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeIdentity:
    """A parsed TD_QE enclave identity (version 2)."""

    raw_body: bytes
    signature: bytes
    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[ModuleTcbLevel, ...]
    tcb_evaluation_data_number: int | None = None


def _check_newest_first(levels: list[Mapping[str, Any]], where: str) -> None:
    """Intel publishes TCB levels sorted newest first (``tcbDate`` descending; levels of one date,
    e.g. UpToDate and ConfigurationNeeded of one recovery, in Intel's order) and the evaluation
    takes the first level the platform meets, so the order decides the status. The verifier does
    not re-sort: a date alone does not order levels of one date, and no other key is Intel's. A
    document out of order is not as Intel publishes it and is refused; it judges nothing."""
    dates = [_time(level, "tcbDate", f"{where}.tcbLevels") for level in levels]
    for i, (newer, older) in enumerate(itertools.pairwise(dates)):
        if older > newer:
            raise _bad(
                f"{where}.tcbLevels are not newest first: level {i + 1} is dated "
                f"{older.isoformat()}, after level {i}'s {newer.isoformat()}"
            )


def _module_levels(items: Any, where: str) -> tuple[ModuleTcbLevel, ...]:
    if not isinstance(items, list) or not items:
        raise _bad(f"{where}.tcbLevels must be a non-empty list")
    out = []
    for level in items:
        if not isinstance(level, dict):
            raise _bad(f"{where}.tcbLevels entry is not an object")
        tcb = _get(level, "tcb", dict, where)
        out.append(
            ModuleTcbLevel(
                isvsvn=_get(tcb, "isvsvn", int, where),
                tcb_date=_get(level, "tcbDate", str, where),
                tcb_status=_get(level, "tcbStatus", str, where),
                advisory_ids=_advisories(level, where),
            )
        )
    _check_newest_first(items, where)
    # The first level whose ISVSVN the module or QE meets judges it: a higher SVN listed after a
    # lower one would never be reached.
    for i, (newer, older) in enumerate(itertools.pairwise(out)):
        if older.isvsvn > newer.isvsvn:
            raise _bad(
                f"{where}.tcbLevels are not highest ISVSVN first: level {i + 1} has ISVSVN "
                f"{older.isvsvn}, above level {i}'s {newer.isvsvn}"
            )
    return tuple(out)


def _components(items: Any, where: str) -> tuple[int, ...]:
    if not isinstance(items, list) or len(items) != 16:
        raise _bad(f"{where} must list 16 components")
    if not all(isinstance(c, dict) for c in items):
        raise _bad(f"{where} entries must be objects")
    return tuple(_get(c, "svn", int, where) for c in items)


def parse_tcb_info(data: bytes) -> TcbInfo:
    """Parses an Intel PCS TDX TCB info response body (``id`` TDX, version 3)."""
    raw, signature, body = split_signed_json(data, "tcbInfo")
    w = "tcbInfo"
    if body.get("id") != "TDX" or body.get("version") != 3:
        raise _bad("tcbInfo must have id 'TDX' and version 3")
    # tcbType names how levels compare (Intel PCS: "type of TCB level composition that determines
    # TCB level comparison logic"); 0, component by component, is the only one Intel defines and
    # the one evaluated here. A document of another type would be judged by the wrong logic.
    if _get(body, "tcbType", int, w) != 0:
        raise _bad(f"tcbInfo.tcbType {body['tcbType']} is not 0, the only comparison logic known")
    module = _get(body, "tdxModule", dict, w)
    base = TdxModuleIdentity(
        id="",
        mrsigner=_hex(module, "mrsigner", 48, w + ".tdxModule"),
        attributes=_hex(module, "attributes", 8, w + ".tdxModule"),
        attributes_mask=_hex(module, "attributesMask", 8, w + ".tdxModule"),
        tcb_levels=(),
    )
    identities = []
    raw_identities = body.get("tdxModuleIdentities", [])
    if not isinstance(raw_identities, list):
        raise _bad("tcbInfo.tdxModuleIdentities must be a list")
    for ident in raw_identities:
        if not isinstance(ident, dict):
            raise _bad("tdxModuleIdentities entry is not an object")
        wi = w + ".tdxModuleIdentities"
        identities.append(
            TdxModuleIdentity(
                id=_get(ident, "id", str, wi),
                mrsigner=_hex(ident, "mrsigner", 48, wi),
                attributes=_hex(ident, "attributes", 8, wi),
                attributes_mask=_hex(ident, "attributesMask", 8, wi),
                tcb_levels=_module_levels(ident.get("tcbLevels"), wi),
            )
        )
    levels = []
    raw_levels = body.get("tcbLevels")
    if not isinstance(raw_levels, list) or not raw_levels:
        raise _bad("tcbInfo.tcbLevels must be a non-empty list")
    for level in raw_levels:
        if not isinstance(level, dict):
            raise _bad("tcbLevels entry is not an object")
        tcb = _get(level, "tcb", dict, w + ".tcbLevels")
        levels.append(
            TcbLevel(
                sgx_components=_components(tcb.get("sgxtcbcomponents"), "sgxtcbcomponents"),
                pcesvn=_get(tcb, "pcesvn", int, w + ".tcbLevels"),
                tdx_components=_components(tcb.get("tdxtcbcomponents"), "tdxtcbcomponents"),
                tcb_date=_get(level, "tcbDate", str, w + ".tcbLevels"),
                tcb_status=_get(level, "tcbStatus", str, w + ".tcbLevels"),
                advisory_ids=_advisories(level, w + ".tcbLevels"),
            )
        )
    _check_newest_first(raw_levels, w)
    return TcbInfo(
        raw_body=raw,
        signature=signature,
        issue_date=_time(body, "issueDate", w),
        next_update=_time(body, "nextUpdate", w),
        fmspc=_hex(body, "fmspc", 6, w),
        pce_id=_hex(body, "pceId", 2, w),
        tcb_evaluation_data_number=_get(body, "tcbEvaluationDataNumber", int, w),
        tdx_module=base,
        tdx_module_identities=tuple(identities),
        tcb_levels=tuple(levels),
    )


def parse_qe_identity(data: bytes) -> QeIdentity:
    """Parses an Intel PCS TD_QE identity response body (``id`` TD_QE, version 2)."""
    raw, signature, body = split_signed_json(data, "enclaveIdentity")
    w = "enclaveIdentity"
    if body.get("id") != "TD_QE" or body.get("version") != 2:
        raise _bad("enclaveIdentity must have id 'TD_QE' and version 2")
    return QeIdentity(
        raw_body=raw,
        signature=signature,
        issue_date=_time(body, "issueDate", w),
        next_update=_time(body, "nextUpdate", w),
        miscselect=int.from_bytes(_hex(body, "miscselect", 4, w), "little"),
        miscselect_mask=int.from_bytes(_hex(body, "miscselectMask", 4, w), "little"),
        attributes=_hex(body, "attributes", 16, w),
        attributes_mask=_hex(body, "attributesMask", 16, w),
        mrsigner=_hex(body, "mrsigner", 32, w),
        isv_prod_id=_get(body, "isvprodid", int, w),
        tcb_levels=_module_levels(body.get("tcbLevels"), w),
        tcb_evaluation_data_number=(
            _get(body, "tcbEvaluationDataNumber", int, w)
            if "tcbEvaluationDataNumber" in body
            else None
        ),
    )


def sniff_collateral_json(data: bytes) -> str | None:
    """``"tcbInfo"`` or ``"enclaveIdentity"`` when the bytes are such a signed document."""
    try:
        doc = jsonparse.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(doc, dict):
        for key in ("tcbInfo", "enclaveIdentity"):
            if key in doc and "signature" in doc:
                return key
    return None


@dataclass(frozen=True)
class SignedDocument:
    """A signed collateral document (TCB info, QE identity) with the PEM chain of its signer."""

    data: bytes
    issuer_chain: bytes

    def __repr__(self) -> str:
        return f"SignedDocument({len(self.data)} bytes, chain {len(self.issuer_chain)} bytes)"


# Intel CAs that publish CRLs, by the name PCS uses (``pckcrl?ca=platform``) and the root.
INTEL_CRL_CAS = ("root", "platform", "processor")
INTEL_CA_BY_CN = {
    "Intel SGX Root CA": "root",
    "Intel SGX PCK Platform CA": "platform",
    "Intel SGX PCK Processor CA": "processor",
}


class CollateralSource(Protocol):
    """The verifier's own collateral: what judges evidence, never taken from the evidence itself.

    Implementations return ``None`` when they hold no such document (the verifier then fails
    closed with ``Reason.COLLATERAL_MISSING``) and may raise :class:`CollateralUnavailable`. They need not
    verify anything: the verifier checks every document it is given (signatures to the pinned
    roots, freshness), so a source can only withhold, never forge. The broker's source is
    :class:`strongroom.attestation.collateral_cache.CollateralCache`.
    """

    def snp_key_certificate(self, report: SnpReport) -> bytes | None:
        """The VCEK (DER or PEM) for the report's chip and reported TCB, if the evidence lacks it."""
        ...

    def crl(self, issuer: x509.Certificate, scope: str = "") -> bytes | None:
        """The CRL (DER) that ``issuer`` publishes: an AMD ARK's for ``scope`` ``vcek`` or
        ``vlek`` (KDS ``/<scope>/v1/<product>/crl``), an Intel root or PCK CA's (scope empty)."""
        ...

    def tdx_tcb_info(self, fmspc: bytes) -> SignedDocument | None:
        """The TDX TCB info for the FMSPC, with its issuer chain."""
        ...

    def tdx_qe_identity(self) -> SignedDocument | None:
        """The TD_QE identity, with its issuer chain."""
        ...


@dataclass(frozen=True)
class _CrlFacts:
    issuer: x509.Name
    this_update: datetime
    amd_scope: str | None


def amd_crl_scope(crl: x509.CertificateRevocationList) -> str | None:
    """``"vcek"`` or ``"vlek"`` when an ARK's CRL says which of the two it is, else ``None``.

    An ARK signs its VCEK CRL (which revokes ASKs) and its VLEK CRL (ASVKs) under one issuer name,
    so the name cannot tell them apart. The CRL's issuing distribution point can (RFC 5280
    5.2.5): it is signed with the CRL and names where the CRL is published, the KDS URL that the
    ASK's and ASVK's CRL distribution points name (``/vcek/v1/<product>/crl``, ``/vlek/...``).
    The revoked serials cannot: an empty CRL names no certificate, and nothing stops a CRL from
    listing a serial of the other kind. A CRL whose URIs disagree is unclassified.
    """
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    scopes = set()
    for name in idp.full_name or ():
        if isinstance(name, x509.UniformResourceIdentifier):
            parts = urllib.parse.urlsplit(name.value).path.strip("/").split("/")
            if len(parts) == 4 and parts[1] == "v1" and parts[3] == "crl":
                scopes.add(parts[0] if parts[0] in ("vcek", "vlek") else "")
            else:
                scopes.add("")
    if len(scopes) != 1:
        return None
    return scopes.pop() or None


@functools.lru_cache(maxsize=32)
def _crl_facts(data: bytes) -> _CrlFacts | None:
    """What selecting a held CRL needs to know of it, or ``None`` if it is not a CRL (memoised:
    an offline verifier asks for the same few CRLs on every verification)."""
    try:
        crl = parse_crl(data)
        return _CrlFacts(crl.issuer, crl.last_update_utc, amd_crl_scope(crl))
    except X509_PARSE_ERRORS:
        return None


def crl_amd_scope(data: bytes) -> str | None:
    """:func:`amd_crl_scope` of a DER/PEM CRL (``None`` also when it is not one; memoised)."""
    facts = _crl_facts(bytes(data))
    return facts.amd_scope if facts else None


def crl_issuer_name(data: bytes) -> x509.Name | None:
    """The issuer name of a DER/PEM CRL, or ``None`` if it is not one (structure only)."""
    facts = _crl_facts(bytes(data))
    return facts.issuer if facts else None


@dataclass(frozen=True)
class StaticCollateralSource:
    """Serves fixed, operator-supplied documents (offline verification with explicit files, tests).

    ``signing_chain`` is the issuer chain of every TCB info / QE identity held. CRLs are matched to
    what they cover by their issuer's name (``ARK-<product>``, Intel root / PCK CAs) and, for an
    ARK's, by scope (:meth:`crl`); the verifier still checks each CRL's signature against the
    chain it judges.
    """

    vceks: tuple[bytes, ...] = ()
    tcb_infos: tuple[bytes, ...] = ()
    qe_identity: bytes | None = None
    signing_chain: bytes | None = None
    crl_list: tuple[bytes, ...] = ()

    def snp_key_certificate(self, report: SnpReport) -> bytes | None:
        """The first VCEK whose hwID matches the report's chip id."""
        from strongroom.attestation.abi.certs import OID_AMD_HWID, load_certificate

        for der in self.vceks:
            cert = load_certificate(der)
            try:
                extensions = list(cert.extensions)
            except ValueError:
                continue
            for ext in extensions:
                if ext.oid.dotted_string == OID_AMD_HWID:
                    hwid = getattr(ext.value, "value", b"")
                    if hwid == report.chip_id_for_kds():
                        return der
        return None

    def crl(self, issuer: x509.Certificate, scope: str = "") -> bytes | None:
        """The newest (``thisUpdate``) held CRL of ``issuer`` for ``scope``.

        For an ARK (``scope`` ``vcek``/``vlek``) the name does not say which CRL is which (see
        :func:`amd_crl_scope`): one whose issuing distribution point names the scope is taken;
        failing that, the only ARK CRL without one; several without one are
        :class:`CollateralUnavailable` (``Reason.COLLATERAL_AMBIGUOUS``), since a VCEK CRL
        handed to a VLEK chain would leave a revoked ASVK unrevoked. The verifier checks the rest.
        """
        held: list[tuple[_CrlFacts, bytes]] = []
        for data in dict.fromkeys(self.crl_list):  # the same file given twice is one CRL
            facts = _crl_facts(data)
            if facts is not None and facts.issuer == issuer.subject:
                held.append((facts, data))
        if scope:
            scoped = [h for h in held if h[0].amd_scope == scope]
            if not scoped:
                scoped = [h for h in held if h[0].amd_scope is None]
                if len(scoped) > 1:
                    raise CollateralUnavailable(
                        f"{len(scoped)} CRLs of {issuer.subject.rfc4514_string()!r} are given and "
                        "none says (by an issuing distribution point) whether it is the VCEK or "
                        f"the VLEK CRL: give only the {scope} one",
                        reason=Reason.COLLATERAL_AMBIGUOUS,
                    )
            held = scoped
        return max(held, key=lambda h: h[0].this_update)[1] if held else None

    def tdx_tcb_info(self, fmspc: bytes) -> SignedDocument | None:
        """The TCB info for the FMSPC, if one is held (and a signing chain is)."""
        if self.signing_chain is None or not self.tcb_infos:
            return None
        for doc in self.tcb_infos:
            try:
                if parse_tcb_info(doc).fmspc == fmspc:
                    return SignedDocument(doc, self.signing_chain)
            except MalformedEvidence:
                continue
        # None matches: hand the first to the verifier, which names what is wrong with it
        # (malformed, or FMSPC_MISMATCH) rather than a vague "missing".
        return SignedDocument(self.tcb_infos[0], self.signing_chain)

    def tdx_qe_identity(self) -> SignedDocument | None:
        """The held QE identity (with the signing chain)."""
        if self.qe_identity is None or self.signing_chain is None:
            return None
        return SignedDocument(self.qe_identity, self.signing_chain)


def require(value: bytes | None, what: str) -> bytes:
    """Returns ``value`` or raises :class:`CollateralUnavailable` naming what is missing."""
    if value is None:
        raise CollateralUnavailable(
            f"{what} is needed but was not supplied", reason=Reason.COLLATERAL_MISSING
        )
    return value
