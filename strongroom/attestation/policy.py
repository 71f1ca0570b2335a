"""The release policy: which verified evidence may release a key (validation, after verification).

A policy is a versioned YAML or JSON document (format: ``services/keybroker/POLICY.md``), checked
strictly when loaded: unknown keys, wrong types, hex of the wrong length and empty allow-lists are
errors (:class:`PolicyInvalid`), never silently ignored. Evaluation denies by default and raises
:class:`PolicyViolation` with a precise reason code on the first failed check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from strongroom.attestation.claims import SnpClaims, TdxClaims
from strongroom.attestation.errors import (
    PolicyInvalid,
    PolicyViolation,
)
from strongroom.attestation.evidence import TeeType
from strongroom.reasons import Reason
from strongroom.spiffe import is_workload_id

SNP_PRODUCTS = ("Milan", "Genoa", "Turin")
SNP_SIGNING_KEYS = ("VCEK", "VLEK")
SNP_TCB_COMPONENTS = ("fmc", "bootloader", "tee", "snp", "microcode")
# Intel's statuses a policy may accept. Revoked, NoMatchingTcbLevel and NotEvaluated never pass.
ACCEPTABLE_TDX_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TdRelaunchAdvised",
    "TdRelaunchAdvisedConfigurationNeeded",
)


_HEX = re.compile(r"\A[0-9a-fA-F]*\Z")

_TOP_KEYS = {"version", "description", "allowed_spiffe_ids", "tee_types", "sev_snp", "tdx"}
_SNP_KEYS = {
    "measurements",
    "products",
    "signing_keys",
    "allow_debug",
    "vmpl",
    "allow_smt",
    "allow_migrate_ma",
    "min_guest_svn",
    "min_reported_tcb",
    "host_data",
    "allow_simulated",
}
_TDX_KEYS = {
    "mrtds",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrconfigids",
    "mrowners",
    "mrownerconfigs",
    "accepted_tcb_statuses",
    "allow_debug",
    "fmspcs",
    "min_tcb_evaluation_data_number",
    "allow_simulated",
}
# The TCB components a stated SNP minimum must cover (``fmc`` only exists on Turin).
_REQUIRED_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode")
ANY_TCB = "any"


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate mapping keys."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise PolicyInvalid(f"duplicate key {key!r}", reason=Reason.POLICY_SYNTAX)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_no_duplicates,
)


def _fail(where: str, what: str, reason: str) -> PolicyInvalid:
    return PolicyInvalid(f"policy {where}: {what}", reason=reason)


def _mapping(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be a mapping", Reason.POLICY_BAD_TYPE)
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}", Reason.POLICY_UNKNOWN_KEY)
    return value


def _bool(section: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{where}.{key}", "must be true or false", Reason.POLICY_BAD_TYPE)
    return value


def _int(section: Mapping[str, Any], key: str, default: int, where: str, hi: int) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise _fail(f"{where}.{key}", f"must be an integer 0..{hi}", Reason.POLICY_BAD_VALUE)
    return value


def _list(section: Mapping[str, Any], key: str, where: str, *, required: bool) -> list[Any] | None:
    if key not in section:
        if required:
            raise _fail(f"{where}.{key}", "is required", Reason.POLICY_MISSING_KEY)
        return None
    value = section[key]
    if not isinstance(value, list):
        raise _fail(f"{where}.{key}", "must be a list", Reason.POLICY_BAD_TYPE)
    if not value:
        raise _fail(
            f"{where}.{key}",
            "is an empty allow-list, which would allow nothing; remove it or list values",
            Reason.POLICY_EMPTY_ALLOW_LIST,
        )
    return value


def _hex_set(
    section: Mapping[str, Any], key: str, size: int, where: str, *, required: bool = False
) -> frozenset[bytes] | None:
    items = _list(section, key, where, required=required)
    if items is None:
        return None
    out = set()
    for item in items:
        if not isinstance(item, str) or not _HEX.match(item) or len(item) != 2 * size:
            raise _fail(
                f"{where}.{key}",
                f"entries must be {2 * size} hex characters ({size} bytes)",
                Reason.POLICY_BAD_HEX,
            )
        out.add(bytes.fromhex(item))
    return frozenset(out)


def _choices(
    section: Mapping[str, Any],
    key: str,
    allowed: tuple[str, ...],
    default: tuple[str, ...] | None,
    where: str,
) -> frozenset[str] | None:
    items = _list(section, key, where, required=False)
    if items is None:
        return frozenset(default) if default is not None else None
    for item in items:
        if item not in allowed:
            raise _fail(
                f"{where}.{key}", f"{item!r} is not one of {list(allowed)}", Reason.POLICY_BAD_VALUE
            )
    return frozenset(items)


@dataclass(frozen=True)
class SnpRules:
    """Rules for SEV-SNP evidence."""

    measurements: frozenset[bytes]
    products: frozenset[str] | None
    signing_keys: frozenset[str]
    allow_debug: bool
    vmpl: int
    allow_smt: bool
    allow_migrate_ma: bool
    min_guest_svn: int
    min_reported_tcb: Mapping[str, int]  # empty only for an explicit development "any"
    host_data: frozenset[bytes] | None
    allow_simulated: bool


@dataclass(frozen=True)
class TdxRules:
    """Rules for TDX evidence."""

    mrtds: frozenset[bytes]
    rtmrs: tuple[frozenset[bytes] | None, ...]
    mrconfigids: frozenset[bytes] | None
    mrowners: frozenset[bytes] | None
    mrownerconfigs: frozenset[bytes] | None
    accepted_tcb_statuses: frozenset[str]
    allow_debug: bool
    fmspcs: frozenset[bytes] | None
    allow_simulated: bool
    min_tcb_evaluation_data_number: int = 0


@dataclass(frozen=True)
class PolicyDecision:
    """A successful evaluation: what allowed the release, for the audit log."""

    policy_version: str
    tee_type: TeeType
    caller_spiffe_id: str
    measurement: str

    def as_dict(self) -> dict[str, str]:
        """A JSON-able view."""
        return {
            "policy_version": self.policy_version,
            "tee_type": self.tee_type.value,
            "caller_spiffe_id": self.caller_spiffe_id,
            "measurement": self.measurement,
        }


def _min_tcb(s: Mapping[str, Any], w: str, production: bool) -> dict[str, int]:
    """The stated minimum reported TCB: a mapping of every component, or (development) "any"."""
    where = f"{w}.min_reported_tcb"
    if "min_reported_tcb" not in s:
        raise _fail(
            where,
            "is required: state the minimum reported TCB (bootloader, tee, snp, microcode; fmc "
            'for Turin), or in development mode "any"',
            Reason.POLICY_MISSING_KEY,
        )
    raw = s["min_reported_tcb"]
    if raw == ANY_TCB:
        if production:
            raise _fail(where, '"any" is only allowed in development mode', Reason.POLICY_BAD_VALUE)
        return {}
    tcb_map = _mapping(raw, where, set(SNP_TCB_COMPONENTS))
    missing = [c for c in _REQUIRED_TCB_COMPONENTS if c not in tcb_map]
    if missing:
        raise _fail(where, f"must state {missing}", Reason.POLICY_MISSING_KEY)
    return {k: _int(tcb_map, k, 0, where, 255) for k in tcb_map}


def _snp_rules(raw: Any, production: bool) -> SnpRules:
    w = "sev_snp"
    s = _mapping(raw, w, _SNP_KEYS)
    measurements = _hex_set(s, "measurements", 48, w, required=True)
    assert measurements is not None
    signing = _choices(s, "signing_keys", SNP_SIGNING_KEYS, ("VCEK",), w)
    assert signing is not None
    vmpl = _int(s, "vmpl", 0, w, 3)
    min_tcb = _min_tcb(s, w, production)
    return SnpRules(
        measurements=measurements,
        products=_choices(s, "products", SNP_PRODUCTS, None, w),
        signing_keys=signing,
        allow_debug=_bool(s, "allow_debug", False, w),
        vmpl=vmpl,
        allow_smt=_bool(s, "allow_smt", True, w),
        allow_migrate_ma=_bool(s, "allow_migrate_ma", False, w),
        min_guest_svn=_int(s, "min_guest_svn", 0, w, 0xFFFFFFFF),
        min_reported_tcb=min_tcb,
        host_data=_hex_set(s, "host_data", 32, w),
        allow_simulated=_bool(s, "allow_simulated", False, w),
    )


def _tdx_rules(raw: Any) -> TdxRules:
    w = "tdx"
    s = _mapping(raw, w, _TDX_KEYS)
    mrtds = _hex_set(s, "mrtds", 48, w, required=True)
    assert mrtds is not None
    statuses = _choices(s, "accepted_tcb_statuses", ACCEPTABLE_TDX_STATUSES, ("UpToDate",), w)
    assert statuses is not None
    return TdxRules(
        mrtds=mrtds,
        rtmrs=tuple(_hex_set(s, f"rtmr{i}", 48, w) for i in range(4)),
        mrconfigids=_hex_set(s, "mrconfigids", 48, w),
        mrowners=_hex_set(s, "mrowners", 48, w),
        mrownerconfigs=_hex_set(s, "mrownerconfigs", 48, w),
        accepted_tcb_statuses=statuses,
        allow_debug=_bool(s, "allow_debug", False, w),
        fmspcs=_hex_set(s, "fmspcs", 6, w),
        allow_simulated=_bool(s, "allow_simulated", False, w),
        min_tcb_evaluation_data_number=_int(s, "min_tcb_evaluation_data_number", 0, w, 0xFFFFFFFF),
    )


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


@dataclass(frozen=True)
class ReleasePolicy:
    """A loaded, validated release policy."""

    version: str
    allowed_spiffe_ids: frozenset[str]
    tee_types: frozenset[TeeType]
    snp: SnpRules | None
    tdx: TdxRules | None

    @classmethod
    def load(cls, text: str | bytes, *, production: bool = True) -> ReleasePolicy:
        """Parses and strictly validates a YAML or JSON policy document.

        ``production`` is the broker's mode: only a development broker accepts an SNP
        ``min_reported_tcb: any``.
        """
        try:
            doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyInvalid(
                f"policy is not valid YAML/JSON: {exc}", reason=Reason.POLICY_SYNTAX
            ) from None
        top = _mapping(doc, "document", _TOP_KEYS)
        version = top.get("version")
        if "version" not in top:
            raise _fail("version", "is required", Reason.POLICY_MISSING_KEY)
        if not isinstance(version, str) or not version.strip():
            raise _fail("version", "must be a non-empty string", Reason.POLICY_BAD_TYPE)
        description = top.get("description", "")
        if not isinstance(description, str):
            raise _fail("description", "must be a string", Reason.POLICY_BAD_TYPE)
        callers = _list(top, "allowed_spiffe_ids", "document", required=True)
        assert callers is not None
        for caller in callers:
            if not isinstance(caller, str) or not is_workload_id(caller):
                raise _fail(
                    "allowed_spiffe_ids", f"{caller!r} is not a SPIFFE ID", Reason.POLICY_BAD_VALUE
                )
        tee_names = _choices(top, "tee_types", tuple(t.value for t in TeeType), None, "document")
        if tee_names is None:
            raise _fail("tee_types", "is required", Reason.POLICY_MISSING_KEY)
        tees = frozenset(TeeType(t) for t in tee_names)
        sections = {TeeType.SEV_SNP: "sev_snp", TeeType.TDX: "tdx"}
        for tee, key in sections.items():
            if (tee in tees) != (key in top):
                raise _fail(
                    key,
                    f"a {key!r} section is required exactly when tee_types lists {tee.value}",
                    Reason.POLICY_MISSING_KEY if tee in tees else Reason.POLICY_BAD_VALUE,
                )
        return cls(
            version=version,
            allowed_spiffe_ids=frozenset(callers),
            tee_types=tees,
            snp=_snp_rules(top["sev_snp"], production) if "sev_snp" in top else None,
            tdx=_tdx_rules(top["tdx"]) if "tdx" in top else None,
        )

    def check_deployment(self, *, trust_domain: str, production: bool) -> None:
        """Refuses a policy that cannot be right where it is deployed (raises PolicyInvalid).

        An ``allowed_spiffe_ids`` entry outside ``trust_domain`` can never match a caller (the
        broker authenticates only its own trust domain), so it is always an error; ``allow_debug``
        releases keys to a VM whose memory the host can read, so production refuses it.
        """
        foreign = sorted(
            i for i in self.allowed_spiffe_ids if not i.startswith(f"spiffe://{trust_domain}/")
        )
        if foreign:
            raise _fail(
                "allowed_spiffe_ids",
                f"{', '.join(foreign)} outside this broker's trust domain {trust_domain!r} "
                "can never match a caller",
                Reason.POLICY_FOREIGN_TRUST_DOMAIN,
            )
        if production:
            for key, rules in (("sev_snp", self.snp), ("tdx", self.tdx)):
                if rules is not None and rules.allow_debug:
                    raise _fail(
                        f"{key}.allow_debug",
                        "must be false in production mode (a debug VM's memory is readable "
                        "by the host)",
                        Reason.POLICY_DEBUG_IN_PRODUCTION,
                    )

    def evaluate(self, claims: SnpClaims | TdxClaims, caller_spiffe_id: str) -> PolicyDecision:
        """Allows the release or raises :class:`PolicyViolation` naming the failed check."""
        if caller_spiffe_id not in self.allowed_spiffe_ids:
            raise _deny(f"caller {caller_spiffe_id!r} is not allowed", Reason.CALLER_NOT_ALLOWED)
        if claims.tee_type not in self.tee_types:
            raise _deny(
                f"{claims.tee_type.value} evidence is not allowed", Reason.TEE_TYPE_NOT_ALLOWED
            )
        if not claims.collateral_complete:
            # Claims verified without the verifier's own CRLs / TCB info / QE identity (offline
            # inspection) can never release a key.
            raise _deny(
                "the evidence was verified without complete verifier-owned collateral",
                Reason.COLLATERAL_INCOMPLETE,
            )
        if isinstance(claims, SnpClaims):
            assert self.snp is not None
            self._check_snp(claims, self.snp)
            measurement = claims.measurement
        else:
            assert self.tdx is not None
            self._check_tdx(claims, self.tdx)
            measurement = claims.mrtd
        return PolicyDecision(
            policy_version=self.version,
            tee_type=claims.tee_type,
            caller_spiffe_id=caller_spiffe_id,
            measurement=measurement.hex(),
        )

    @staticmethod
    def _check_snp(c: SnpClaims, r: SnpRules) -> None:
        if c.simulated and not r.allow_simulated:
            raise _deny(
                "evidence from a simulated TEE is not allowed", Reason.SIMULATED_TEE_NOT_ALLOWED
            )
        if c.measurement not in r.measurements:
            raise _deny(
                f"measurement {c.measurement.hex()} is not allowed", Reason.MEASUREMENT_NOT_ALLOWED
            )
        if c.policy.debug and not r.allow_debug:
            raise _deny("guest policy allows debugging", Reason.DEBUG_FORBIDDEN)
        if c.vmpl != r.vmpl:
            raise _deny(
                f"report is from VMPL {c.vmpl}, policy requires {r.vmpl}", Reason.VMPL_NOT_ALLOWED
            )
        if c.policy.smt and not r.allow_smt:
            raise _deny("guest policy allows SMT", Reason.SMT_FORBIDDEN)
        if c.policy.migrate_ma and not r.allow_migrate_ma:
            raise _deny("guest policy allows a migration agent", Reason.MIGRATE_MA_FORBIDDEN)
        if c.signing_key not in r.signing_keys:
            raise _deny(
                f"{c.signing_key}-signed reports are not allowed", Reason.SIGNING_KEY_NOT_ALLOWED
            )
        if r.products is not None and c.product not in r.products:
            raise _deny(f"product {c.product} is not allowed", Reason.PRODUCT_NOT_ALLOWED)
        if c.guest_svn < r.min_guest_svn:
            raise _deny(f"guest SVN {c.guest_svn} < {r.min_guest_svn}", Reason.GUEST_SVN_TOO_OLD)
        have = c.reported_tcb.components()
        for name, minimum in r.min_reported_tcb.items():
            if name in have and have[name] < minimum:
                raise _deny(
                    f"reported TCB {name}={have[name]} is below the minimum {minimum}",
                    Reason.TCB_TOO_OLD,
                )
        if r.host_data is not None and c.host_data not in r.host_data:
            raise _deny("host data is not allowed", Reason.HOST_DATA_NOT_ALLOWED)

    @staticmethod
    def _check_tdx(c: TdxClaims, r: TdxRules) -> None:
        if c.simulated and not r.allow_simulated:
            raise _deny(
                "evidence from a simulated TEE is not allowed", Reason.SIMULATED_TEE_NOT_ALLOWED
            )
        if c.mrtd not in r.mrtds:
            raise _deny(f"MRTD {c.mrtd.hex()} is not allowed", Reason.MRTD_NOT_ALLOWED)
        if c.debug and not r.allow_debug:
            raise _deny("TD attributes allow debugging", Reason.DEBUG_FORBIDDEN)
        for i, allowed in enumerate(r.rtmrs):
            if allowed is not None and c.rtmrs[i] not in allowed:
                raise _deny(f"RTMR{i} is not allowed", Reason.RTMR_NOT_ALLOWED)
        if r.mrconfigids is not None and c.mrconfigid not in r.mrconfigids:
            raise _deny("MRCONFIGID is not allowed", Reason.MRCONFIGID_NOT_ALLOWED)
        if r.mrowners is not None and c.mrowner not in r.mrowners:
            raise _deny("MROWNER is not allowed", Reason.MROWNER_NOT_ALLOWED)
        if r.mrownerconfigs is not None and c.mrownerconfig not in r.mrownerconfigs:
            raise _deny("MROWNERCONFIG is not allowed", Reason.MROWNERCONFIG_NOT_ALLOWED)
        if r.fmspcs is not None and c.fmspc not in r.fmspcs:
            raise _deny(f"FMSPC {c.fmspc.hex()} is not allowed", Reason.FMSPC_NOT_ALLOWED)
        number = c.tcb_evaluation_data_number
        if number is None or number < r.min_tcb_evaluation_data_number:
            raise _deny(
                f"TCB info evaluation data number {number} is below the policy's minimum "
                f"{r.min_tcb_evaluation_data_number}",
                Reason.TCB_EVALUATION_TOO_OLD,
            )
        if c.tcb_status not in r.accepted_tcb_statuses:
            raise _deny(
                f"TCB status {c.tcb_status} is not accepted", Reason.TCB_STATUS_NOT_ACCEPTED
            )
