"""SEV-SNP release rules: the ``sev_snp`` section of a policy (``services/keybroker/POLICY.md``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from strongroom.attestation.abi.snp import PRODUCTS, PlatformInfo, SnpPolicy, TcbVersion
from strongroom.attestation.claims import SnpClaims, VerifiedClaims
from strongroom.attestation.errors import PolicyViolation
from strongroom.attestation.rules import schema
from strongroom.reasons import Reason

SNP_SIGNING_KEYS = ("VCEK", "VLEK")
# Guest-policy flags a policy may require or forbid by name. Debug, SMT and the migration agent
# have keys of their own (allow_debug, allow_smt, allow_migrate_ma): one way to say each thing.
# Bit 17 (reserved_1) is fixed at 1 by the ABI: firmware refuses to launch a guest without it.
_OWN_KEYS = frozenset({"debug", "smt", "migrate_ma", "reserved_1"})
GUEST_POLICY_FLAGS = tuple(n for n in SnpPolicy(0).flags() if n not in _OWN_KEYS)
PLATFORM_FLAGS = tuple(PlatformInfo(0).flags())
ANY_TCB = "any"
SECTION = "sev_snp"


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


class TcbMinimum(schema.Section):
    """A minimum TCB: every component but ``fmc`` must be stated. A minimum without ``fmc``
    (Turin's only) refuses every Turin report (:func:`_check_tcb`)."""

    fmc: Annotated[int | None, schema.uint(0xFF)] = None
    bootloader: schema.U8
    tee: schema.U8
    snp: schema.U8
    microcode: schema.U8

    def components(self) -> dict[str, int]:
        """The stated minima by component name (``fmc`` only when stated)."""
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp}
        out["microcode"] = self.microcode
        return out if self.fmc is None else {"fmc": self.fmc, **out}


def _not_null(absent: str) -> BeforeValidator:
    """A minimum that, when present, must be a mapping: an explicit ``null`` reads as "no
    minimum" to one author and as the key's absent meaning to another, so it is refused, the
    message ending with ``absent`` (what leaving the key out does, or "instead")."""

    def check(value: Any) -> Any:
        if value is None:
            raise schema.invalid(
                Reason.POLICY_BAD_TYPE, f"must be a mapping, not null: leave the key out {absent}"
            )
        return value

    return BeforeValidator(check)


class ProductTcbMinimums(schema.Section):
    """A minimum TCB per product. SPL numbers are each product's own (a current Milan reports
    microcode 219, a current Genoa 84), so one minimum for several products can only be the lower
    of their numbers, which admits each product's out-of-date firmware; with a minimum per product
    each is judged by its own numbers, and a product without one is refused
    (``TCB_MINIMUM_INCOMPLETE``). Turin's needs ``fmc``; Milan's and Genoa's cannot have one."""

    # Absent: refused (min_reported_tcb) or judged by min_reported_tcb's (min_launch_tcb). An
    # explicit null is an error, never read as absent: its author may have meant "no minimum".
    Milan: Annotated[TcbMinimum | None, _not_null("instead")] = None
    Genoa: Annotated[TcbMinimum | None, _not_null("instead")] = None
    Turin: Annotated[TcbMinimum | None, _not_null("instead")] = None

    @model_validator(mode="after")
    def _fmc_where_the_product_has_one(self) -> ProductTcbMinimums:
        """At least one product; ``fmc`` stated exactly for Turin (the only product with one)."""
        if not self.stated():
            raise schema.invalid(
                Reason.POLICY_EMPTY_ALLOW_LIST,
                "states no product's minimum, which would allow none",
            )
        for product, minimum in self.stated().items():
            if (minimum.fmc is None) != (product != "Turin"):
                raise schema.invalid(
                    Reason.POLICY_MISSING_KEY if product == "Turin" else Reason.POLICY_BAD_VALUE,
                    f"{product}: fmc is {'required' if product == 'Turin' else 'Turin only'}",
                )
        return self

    def stated(self) -> dict[str, TcbMinimum]:
        """The stated minima by product."""
        return {p: m for p in PRODUCTS if (m := getattr(self, p)) is not None}


def _tcb_form(value: Any) -> str:
    """Which form a minimum is written in: by product (its keys name products) or one for all."""
    if isinstance(value, ProductTcbMinimums) or (
        isinstance(value, dict) and any(k in PRODUCTS for k in value)
    ):
        return schema.tag("by_product")
    return schema.tag("one")


TcbMinimumSpec = Annotated[
    Annotated[TcbMinimum, Tag(schema.tag("one"))]
    | Annotated[ProductTcbMinimums, Tag(schema.tag("by_product"))],
    Discriminator(_tcb_form),
]
"""A minimum TCB for every product, or one per product (:class:`ProductTcbMinimums`)."""


def _for_product(
    minimum: TcbMinimum | ProductTcbMinimums | None, product: str, key: str
) -> TcbMinimum | None:
    """The minimum that judges ``product``'s TCB (None: no minimum, a development ``any``)."""
    if not isinstance(minimum, ProductTcbMinimums):
        return minimum
    stated = minimum.stated().get(product)
    if stated is None:
        raise _deny(
            f"the policy's {key} states no minimum for {product}: add one to accept {product}",
            Reason.TCB_MINIMUM_INCOMPLETE,
        )
    return stated


_REQUIRED = object()


def _csp_ids(value: Any, info: ValidationInfo) -> frozenset[str]:
    """``vlek_csp_ids``: the CSP_ID strings of allowed VLEKs, as their certificates carry them (the
    AWS one reads ``CN=cc-us-east-2.amazonaws.com``); only with VLEK in ``signing_keys``, since
    otherwise no report could use them (fields before it are validated)."""
    items = schema.allow_list(value)
    if not all(isinstance(i, str) and i and i.isascii() and i.isprintable() for i in items):
        raise schema.invalid(
            Reason.POLICY_BAD_VALUE, "entries must be non-empty printable ASCII strings"
        )
    if "VLEK" not in info.data.get("signing_keys", ()):
        raise schema.invalid(
            Reason.POLICY_BAD_VALUE,
            "pins the clouds of VLEKs, but signing_keys does not allow VLEK-signed reports",
        )
    return frozenset(items)


def _min_tcb(value: Any, info: ValidationInfo) -> Any:
    """Required, with a hint; ``"any"`` (None: no minimum) only on a development broker."""
    if value is _REQUIRED:
        raise schema.invalid(
            Reason.POLICY_MISSING_KEY,
            "is required: state the minimum reported TCB (bootloader, tee, snp, microcode; fmc "
            'for Turin), or in development mode "any"',
        )
    if value == ANY_TCB:
        if (info.context or {}).get("production", True):  # no context: the strict mode
            raise schema.invalid(
                Reason.POLICY_BAD_VALUE, '"any" is only allowed in development mode'
            )
        return None
    if value is None:
        raise schema.invalid(Reason.POLICY_BAD_TYPE, 'must be a mapping or "any"')
    return value


def _check_tcb(
    have: TcbVersion, minimum: TcbMinimum, what: str, reason: str, note: str = ""
) -> None:
    """Raises ``reason`` on the first component of ``have`` below ``minimum`` (``fmc`` is judged
    only where the report has one: Turin)."""
    components = have.components()
    if "fmc" in components and minimum.fmc is None:
        # Judged here, not when the policy loads: policies written before Turin (no fmc, no
        # products) keep serving Milan and Genoa, and fail closed for Turin.
        raise _deny(
            f"{what} has an FMC SPL (Turin) but the policy's minimum states no fmc: state one to "
            "accept Turin",
            Reason.TCB_MINIMUM_INCOMPLETE,
        )
    for name, floor in minimum.components().items():
        if name in components and components[name] < floor:
            raise _deny(
                f"{what} {name}={components[name]} is below the minimum {floor}{note}", reason
            )


def _check_flags(
    flags: dict[str, bool],
    what: str,
    required: frozenset[str] | None,
    forbidden: frozenset[str] | None,
    reasons: tuple[str, str],
) -> None:
    """Raises the first required flag clear, else the first forbidden flag set (by name)."""
    missing = sorted(n for n in required or () if not flags[n])
    if missing:
        raise _deny(f"{what} does not set {', '.join(missing)}", reasons[0])
    present = sorted(n for n in forbidden or () if flags[n])
    if present:
        raise _deny(f"{what} sets {', '.join(present)}", reasons[1])


class SnpRules(schema.Section):
    """Rules for SEV-SNP evidence (the ``sev_snp`` section; see POLICY.md for each key)."""

    measurements: schema.Hex48
    products: Annotated[frozenset[str] | None, schema.one_of(PRODUCTS)] = None
    signing_keys: Annotated[frozenset[str], schema.one_of(SNP_SIGNING_KEYS)] = frozenset({"VCEK"})
    # Every cloud's VLEK chains to AMD's ASVK: without a pin, a policy that allows VLEKs trusts
    # each cloud that AMD issued one to, not only the operator's.
    vlek_csp_ids: Annotated[frozenset[str] | None, BeforeValidator(_csp_ids)] = None
    allow_debug: schema.Bool = False
    vmpl: Annotated[int, schema.uint(3)] = 0
    allow_smt: schema.Bool = True
    allow_migrate_ma: schema.Bool = False
    # GUEST_SVN (like FAMILY_ID and IMAGE_ID) comes from the ID block, which whoever launches the
    # VM may sign with an ID key of its own: it means something only with that key pinned.
    id_key_digests: schema.OptionalHex48 = None
    author_key_digests: schema.OptionalHex48 = None
    min_guest_svn: schema.U32 = 0
    # None only for an explicit development "any".
    min_reported_tcb: Annotated[TcbMinimumSpec | None, BeforeValidator(_min_tcb)] = Field(
        default=_REQUIRED, validate_default=True
    )
    # Absent: min_reported_tcb applies to the launch TCB too. A VM launched on firmware below the
    # minimum keeps what that firmware could leak even after a live update raises reported_tcb.
    # By product, a product it states no minimum for takes min_reported_tcb's.
    min_launch_tcb: Annotated[
        TcbMinimumSpec | None, _not_null("to judge the launch TCB by min_reported_tcb")
    ] = None
    host_data: schema.OptionalHex32 = None
    # Guest policy: what the guest owner made the firmware enforce for the VM's whole life (a bit
    # firmware does not know reads 0, so requiring it refuses older firmware: fail closed).
    required_guest_policy_flags: Annotated[
        frozenset[str] | None, schema.one_of(GUEST_POLICY_FLAGS)
    ] = None
    forbidden_guest_policy_flags: Annotated[
        frozenset[str] | None, schema.one_of(GUEST_POLICY_FLAGS)
    ] = None
    # PLATFORM_INFO: the host's state when the report was made (alias_check_complete: the BadRAM
    # check of the memory configuration, AMD-SB-3015).
    required_platform_flags: Annotated[frozenset[str] | None, schema.one_of(PLATFORM_FLAGS)] = None
    forbidden_platform_flags: Annotated[frozenset[str] | None, schema.one_of(PLATFORM_FLAGS)] = None
    allow_simulated: schema.Bool = False

    @field_validator("min_guest_svn")
    @classmethod
    def _guest_svn_needs_its_signer(cls, value: int, info: ValidationInfo) -> int:
        """A minimum guest SVN needs the key that vouches for it (fields before it are validated)."""
        if value and not (info.data.get("id_key_digests") or info.data.get("author_key_digests")):
            raise schema.invalid(
                Reason.POLICY_MISSING_KEY,
                "needs id_key_digests or author_key_digests: the guest SVN is what the ID block "
                "says, and whoever launches the VM can sign an ID block with a key of its own",
            )
        return value

    @model_validator(mode="after")
    def _a_minimum_for_every_listed_product(self) -> SnpRules:
        """A product listed in ``products`` that a by-product ``min_reported_tcb`` states no
        minimum for, or Turin listed with a single minimum that states no ``fmc``, could never
        pass: a policy error, not a silent refusal. (Without ``products`` a minimum with no
        ``fmc`` still loads: policies written before Turin keep serving Milan and Genoa.)"""
        if isinstance(self.min_reported_tcb, ProductTcbMinimums) and self.products is not None:
            missing = sorted(self.products - set(self.min_reported_tcb.stated()))
            if missing:
                raise schema.invalid(
                    Reason.POLICY_MISSING_KEY,
                    f"min_reported_tcb states no minimum for {', '.join(missing)}, which products "
                    "lists: no report of it could pass",
                )
        if self.products is not None and "Turin" in self.products:
            for key in ("min_reported_tcb", "min_launch_tcb"):
                minimum = getattr(self, key)
                if isinstance(minimum, TcbMinimum) and minimum.fmc is None:
                    raise schema.invalid(
                        Reason.POLICY_MISSING_KEY,
                        f"{key} states no fmc (Turin's FMC SPL), and products lists Turin: no "
                        "Turin report could pass",
                    )
        return self

    @field_validator("forbidden_guest_policy_flags", "forbidden_platform_flags")
    @classmethod
    def _not_both(cls, value: frozenset[str] | None, info: ValidationInfo) -> frozenset[str] | None:
        """A flag both required and forbidden would refuse every report: a policy error."""
        required = info.data.get(str(info.field_name).replace("forbidden", "required")) or set()
        both = sorted((value or set()) & required)
        if both:
            raise schema.invalid(
                Reason.POLICY_BAD_VALUE, f"{both} are required too: no report could pass"
            )
        return value

    def evaluate(self, claims: VerifiedClaims) -> bytes:
        """Checks SNP claims in the documented order; returns the allowed measurement."""
        if not isinstance(claims, SnpClaims):
            raise TypeError(f"SEV-SNP rules cannot judge {claims.tee_type.value} claims")
        c = claims
        if c.simulated and not self.allow_simulated:
            raise _deny(
                "evidence from a simulated TEE is not allowed", Reason.SIMULATED_TEE_NOT_ALLOWED
            )
        if c.measurement not in self.measurements:
            raise _deny(
                f"measurement {c.measurement.hex()} is not allowed", Reason.MEASUREMENT_NOT_ALLOWED
            )
        if c.policy.debug and not self.allow_debug:
            raise _deny("guest policy allows debugging", Reason.DEBUG_FORBIDDEN)
        if c.vmpl != self.vmpl:
            raise _deny(
                f"report is from VMPL {c.vmpl}, policy requires {self.vmpl}",
                Reason.VMPL_NOT_ALLOWED,
            )
        if c.policy.smt and not self.allow_smt:
            raise _deny("guest policy allows SMT", Reason.SMT_FORBIDDEN)
        if c.policy.migrate_ma and not self.allow_migrate_ma:
            raise _deny("guest policy allows a migration agent", Reason.MIGRATE_MA_FORBIDDEN)
        _check_flags(
            c.policy.flags(),
            "guest policy",
            self.required_guest_policy_flags,
            self.forbidden_guest_policy_flags,
            (Reason.GUEST_POLICY_FLAG_MISSING, Reason.GUEST_POLICY_FLAG_FORBIDDEN),
        )
        _check_flags(
            c.platform_info.flags(),
            "platform info",
            self.required_platform_flags,
            self.forbidden_platform_flags,
            (Reason.PLATFORM_FLAG_MISSING, Reason.PLATFORM_FLAG_FORBIDDEN),
        )
        if c.signing_key not in self.signing_keys:
            raise _deny(
                f"{c.signing_key}-signed reports are not allowed", Reason.SIGNING_KEY_NOT_ALLOWED
            )
        if (
            c.signing_key == "VLEK"
            and self.vlek_csp_ids is not None
            and c.vlek_csp_id not in self.vlek_csp_ids
        ):
            raise _deny(
                f"the report's VLEK was issued to cloud {c.vlek_csp_id!r}, not one of "
                f"{sorted(self.vlek_csp_ids)} (sev_snp.vlek_csp_ids)",
                Reason.VLEK_CSP_NOT_ALLOWED,
            )
        if self.products is not None and c.product not in self.products:
            raise _deny(f"product {c.product} is not allowed", Reason.PRODUCT_NOT_ALLOWED)
        if self.id_key_digests is not None and c.id_key_digest not in self.id_key_digests:
            raise _deny(f"ID key {c.id_key_digest.hex()} is not allowed", Reason.ID_KEY_NOT_ALLOWED)
        if (
            self.author_key_digests is not None
            and c.author_key_digest not in self.author_key_digests
        ):
            raise _deny(
                f"author key {c.author_key_digest.hex()} is not allowed",
                Reason.AUTHOR_KEY_NOT_ALLOWED,
            )
        if c.guest_svn < self.min_guest_svn:
            raise _deny(f"guest SVN {c.guest_svn} < {self.min_guest_svn}", Reason.GUEST_SVN_TOO_OLD)
        reported_minimum = _for_product(self.min_reported_tcb, c.product, "min_reported_tcb")
        if reported_minimum is not None:
            _check_tcb(c.reported_tcb, reported_minimum, "reported TCB", Reason.TCB_TOO_OLD)
        launch_minimum, source = reported_minimum, "min_reported_tcb"
        if self.min_launch_tcb is not None and (
            not isinstance(self.min_launch_tcb, ProductTcbMinimums)
            or c.product in self.min_launch_tcb.stated()
        ):
            launch_minimum = _for_product(self.min_launch_tcb, c.product, "min_launch_tcb")
            source = "min_launch_tcb"
        if launch_minimum is not None:
            _check_tcb(
                c.launch_tcb,
                launch_minimum,
                "launch TCB",
                Reason.LAUNCH_TCB_TOO_OLD,
                f" ({source}): the VM was started on older firmware; relaunch it",
            )
        if reported_minimum is not None:
            # Firmware updated live stays provisional until committed, and the host may roll it
            # back to the committed version under the running VM (after the key was released):
            # what it can go back to must meet the minimum too.
            _check_tcb(
                c.committed_tcb,
                reported_minimum,
                "committed TCB",
                Reason.COMMITTED_TCB_TOO_OLD,
                " (min_reported_tcb): the platform runs provisional firmware that the host can "
                "roll back below the minimum",
            )
        if self.host_data is not None and c.host_data not in self.host_data:
            raise _deny("host data is not allowed", Reason.HOST_DATA_NOT_ALLOWED)
        return c.measurement


class _SnpPolicy:
    """The SEV-SNP entry of the rules registry."""

    section = SECTION

    def parse(self, section: Any, *, production: bool) -> SnpRules:
        """Strictly validates a ``sev_snp`` section (``min_reported_tcb: any`` only in development)."""
        return schema.load(SnpRules, SECTION, section, production=production)


SNP_POLICY = _SnpPolicy()
"""Registered for ``TeeType.SEV_SNP`` in ``strongroom.attestation.rules``."""
