"""The field types of a release-policy document, as pydantic annotations, and the one translation
from pydantic's validation errors to :class:`PolicyInvalid` (field path, what is wrong, reason).

The document's common part and each TEE's section are frozen pydantic models that refuse unknown
keys (:class:`Section`). Nothing is coerced: ``"1"`` is not an integer, ``"no"`` is not a boolean,
``null`` is not an absent list, and an empty allow-list is an error, never "allow everything".
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, ValidationError
from pydantic_core import PydanticCustomError

from strongroom.attestation.errors import PolicyInvalid
from strongroom.reasons import Reason

_HEX = re.compile(r"\A[0-9a-fA-F]*\Z")


class Section(BaseModel):
    """Base of a policy section: strict, unknown keys refused, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_TAG_MARK = "\x00"


def tag(name: str) -> str:
    """A tag for one form of a discriminated union. pydantic puts the tag in an error's location;
    :func:`load` leaves it out, so the path names only the document's keys."""
    return _TAG_MARK + name


def invalid(reason: str, message: str) -> PydanticCustomError:
    """The error a field validator raises; ``reason`` is a ``Reason.POLICY_*`` code."""
    return PydanticCustomError(reason, message)


def allow_list(value: Any) -> list[Any]:
    """``value`` as a non-empty list."""
    if not isinstance(value, list):
        raise invalid(Reason.POLICY_BAD_TYPE, "must be a list")
    if not value:
        raise invalid(
            Reason.POLICY_EMPTY_ALLOW_LIST,
            "is an empty allow-list, which would allow nothing; remove it or list values",
        )
    return value


def hex_set(size: int) -> BeforeValidator:
    """An allow-list of ``size``-byte values written as hex, read into a frozenset of bytes."""

    def check(value: Any) -> frozenset[bytes]:
        items = allow_list(value)
        if not all(isinstance(i, str) and _HEX.match(i) and len(i) == 2 * size for i in items):
            raise invalid(
                Reason.POLICY_BAD_HEX, f"entries must be {2 * size} hex characters ({size} bytes)"
            )
        return frozenset(bytes.fromhex(i) for i in items)

    return BeforeValidator(check)


def check_one_of(value: Any, allowed: tuple[str, ...]) -> frozenset[str]:
    """``value`` as a non-empty allow-list whose entries are drawn from ``allowed``."""
    for item in allow_list(value):
        if item not in allowed:
            raise invalid(Reason.POLICY_BAD_VALUE, f"{item!r} is not one of {list(allowed)}")
    return frozenset(value)


def one_of(allowed: tuple[str, ...]) -> BeforeValidator:
    """An allow-list whose entries are drawn from ``allowed``, read into a frozenset."""
    return BeforeValidator(lambda value: check_one_of(value, allowed))


def uint(hi: int) -> BeforeValidator:
    """An integer ``0..hi`` (a boolean is not an integer here)."""

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
            raise invalid(Reason.POLICY_BAD_VALUE, f"must be an integer 0..{hi}")
        return value

    return BeforeValidator(check)


# Optional allow-lists carry the validator outside "| None": an explicit null is refused ("must
# be a list"); only an absent key takes the default None, which means "unconstrained".
Bool = StrictBool
Hex48 = Annotated[frozenset[bytes], hex_set(48)]
OptionalHex48 = Annotated[frozenset[bytes] | None, hex_set(48)]
OptionalHex32 = Annotated[frozenset[bytes] | None, hex_set(32)]
OptionalHex6 = Annotated[frozenset[bytes] | None, hex_set(6)]
OptionalHex8 = Annotated[frozenset[bytes] | None, hex_set(8)]
U8 = Annotated[int, uint(0xFF)]
U32 = Annotated[int, uint(0xFFFFFFFF)]

# pydantic's own error types; every other error is raised by the validators above with a reason.
_BUILT_IN = {
    "missing": (Reason.POLICY_MISSING_KEY, "is required"),
    "extra_forbidden": (Reason.POLICY_UNKNOWN_KEY, "is not a known key"),
    "bool_type": (Reason.POLICY_BAD_TYPE, "must be true or false"),
    "string_type": (Reason.POLICY_BAD_TYPE, "must be a string"),
    "model_type": (Reason.POLICY_BAD_TYPE, "must be a mapping"),
}

S = TypeVar("S", bound=Section)


def load(model: type[S], where: str, value: Any, **context: Any) -> S:
    """Validates ``value`` as ``model``. One error (an unknown key if there is one, else the first
    in field order) becomes a :class:`PolicyInvalid` naming the field path under ``where`` (""
    at the document's top level): ``tdx.mrtds``, ``sev_snp.min_reported_tcb.snp``; what is wrong;
    and its ``POLICY_*`` reason code. ``context`` reaches the field validators."""
    try:
        return model.model_validate(value, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Unknown keys first: a misspelt key ("ucode") must not read as a missing one.
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = (str(p) for p in error["loc"] if not str(p).startswith(_TAG_MARK))
        path = ".".join([where, *loc]).lstrip(".")
        reason, message = _BUILT_IN.get(error["type"], (error["type"], error["msg"]))
        if reason not in Reason.__members__:  # an error type nobody mapped: say what pydantic said
            reason = Reason.POLICY_BAD_VALUE
        raise PolicyInvalid(f"policy {path}: {message}", reason=reason) from None
