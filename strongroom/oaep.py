"""The RSA-OAEP hash used to wrap a data key to a TEE's ephemeral key: a negotiated parameter.

OAEP uses one hash for the label and MGF1 with the same hash. Tokens differ: SoftHSM2 2.6.1 accepts
only SHA-1 (``CKR_ARGUMENTS_BAD`` otherwise), hardware HSMs take SHA-256. The broker probes the token
once per connection (the key broker's ``Hsm.oaep_hashes``) and :func:`negotiate` picks
the first hash *the caller* listed that the token supports, never one the caller did not list.
OAEP with SHA-1 remains sound for key transport (its security does not rest on collision
resistance), but a caller that wants SHA-256 only simply does not list SHA-1 and gets a clear refusal.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives import hashes

from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.reasons import Reason


class OaepHash(enum.Enum):
    """An OAEP hash; MGF1 always uses the same hash and the OAEP label is empty."""

    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    @property
    def mechanism_label(self) -> str:
        """A stable, explicit name for logs and audit records, e.g. ``RSA-OAEP/SHA-256/MGF1-SHA-256``."""
        name = {"sha1": "SHA-1", "sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}[
            self.value
        ]
        return f"RSA-OAEP/{name}/MGF1-{name}"

    @property
    def digest_size(self) -> int:
        """The hash output length in bytes."""
        return {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}[self.value]

    @property
    def algorithm(self) -> hashes.HashAlgorithm:
        """The ``cryptography`` hash, for unwrapping on the receiving side."""
        return _ALGORITHMS[self]()

    @property
    def mechanism(self) -> int:
        """The key broker API's ``WrapMechanism`` number for this hash; only SHA-1 and SHA-256
        have one."""
        for mechanism, oaep_hash in _MECHANISMS.items():
            if oaep_hash is self:
                return mechanism
        raise InvalidArgument(
            f"OAEP with {self.value} has no wire mechanism", reason=Reason.OAEP_MECHANISM_INVALID
        )

    @classmethod
    def from_mechanism(cls, mechanism: int) -> OaepHash:
        """The hash of a key broker API ``WrapMechanism`` number; InvalidArgument for anything but
        RSA-OAEP."""
        try:
            return _MECHANISMS[mechanism]
        except KeyError:
            raise InvalidArgument(
                f"{mechanism} is not an RSA-OAEP wrap mechanism",
                reason=Reason.OAEP_MECHANISM_INVALID,
            ) from None

    @classmethod
    def parse(cls, value: str) -> OaepHash:
        """Parses ``sha256``/``SHA256``/``SHA-256`` (case-insensitive); raises InvalidArgument."""
        normalised = value.strip().lower().replace("-", "").replace("_", "")
        for member in cls:
            if member.value == normalised:
                return member
        raise InvalidArgument(
            f"unknown OAEP hash {value[:32]!r}", reason=Reason.OAEP_MECHANISM_INVALID
        )


_ALGORITHMS: dict[OaepHash, type[hashes.HashAlgorithm]] = {
    OaepHash.SHA1: hashes.SHA1,
    OaepHash.SHA256: hashes.SHA256,
    OaepHash.SHA384: hashes.SHA384,
    OaepHash.SHA512: hashes.SHA512,
}
RSA_OAEP_SHA1_MECHANISM = 2
"""``WRAP_MECHANISM_RSA_OAEP_SHA1`` in the key broker API (keybroker.proto)."""
RSA_OAEP_SHA256_MECHANISM = 3
"""``WRAP_MECHANISM_RSA_OAEP_SHA256`` in the key broker API (keybroker.proto)."""

# The one table between the API's mechanisms and OAEP hashes (it defines SHA-1 and SHA-256 only).
# Numbers, not the generated enum: this library imports no RPC API (tests check they agree).
_MECHANISMS: dict[int, OaepHash] = {
    RSA_OAEP_SHA1_MECHANISM: OaepHash.SHA1,
    RSA_OAEP_SHA256_MECHANISM: OaepHash.SHA256,
}

#: The order in which a token is probed, strongest first.
PROBE_ORDER: tuple[OaepHash, ...] = (
    OaepHash.SHA256,
    OaepHash.SHA384,
    OaepHash.SHA512,
    OaepHash.SHA1,
)


def check_accepted(accepted: Iterable[object]) -> tuple[OaepHash, ...]:
    """Validates a caller's list of acceptable hashes, keeping its order; raises InvalidArgument."""
    result: list[OaepHash] = []
    for item in accepted:
        if not isinstance(item, OaepHash):
            raise InvalidArgument(
                "accepted OAEP mechanisms must be OaepHash values",
                reason=Reason.OAEP_MECHANISM_INVALID,
            )
        if item not in result:
            result.append(item)
    if not result:
        raise InvalidArgument(
            "the caller accepted no OAEP mechanism", reason=Reason.OAEP_MECHANISM_INVALID
        )
    return tuple(result)


def negotiate(accepted: Sequence[OaepHash], supported: Iterable[OaepHash]) -> OaepHash:
    """The first hash in the caller's ``accepted`` order that the token ``supported``.

    ``accepted`` is a list :func:`check_accepted` returned (a release target's mechanisms): it is
    not checked again. Raises FailedPrecondition(OAEP_MECHANISM_UNSUPPORTED) naming both lists
    when there is none.
    """
    available = frozenset(supported)
    for choice in accepted:
        if choice in available:
            return choice
    raise FailedPrecondition(
        "no OAEP hash acceptable to the caller is supported by the HSM: caller accepts "
        f"[{', '.join(h.value for h in accepted)}], HSM supports "
        f"[{', '.join(h.value for h in PROBE_ORDER if h in available) or 'none'}]",
        reason=Reason.OAEP_MECHANISM_UNSUPPORTED,
    )
