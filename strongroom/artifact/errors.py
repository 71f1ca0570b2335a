"""The artifact library's exceptions: malformed (keyless checks) versus failed decryption.

* :class:`InvalidArtifact` — the bytes are not a well-formed artifact. Anyone can tell, without a key:
  bad magic, unknown format version, a non-canonical or out-of-limits header, a length that does not
  match what the header implies. Carries a precise ``reason`` code.
* :class:`ArtifactTooLarge` — well formed, but bigger than the caller's configured limit.
* :class:`DecryptionFailed` — a keyed operation could not authenticate the data: wrong key, wrong
  context (another header), a modified, truncated, reordered or extended body, a footer that does
  not match the encrypted digest. Deliberately opaque: one reason, one message; the precise cause
  goes to the debug log only, never to the caller.
"""

from __future__ import annotations

from strongroom.errors import DataLoss, InvalidArgument, ResourceExhausted
from strongroom.reasons import Reason


class InvalidArtifact(InvalidArgument):
    """The input is not a well-formed artifact (structure, limits, canonical encoding, lengths)."""

    default_reason = Reason.INVALID_ARTIFACT


class ArtifactTooLarge(ResourceExhausted):
    """The artifact declares a size above the caller's configured limit."""

    default_reason = Reason.ARTIFACT_TOO_LARGE


class DecryptionFailed(DataLoss):
    """Authenticated decryption failed. Opaque on purpose: the cause is only logged at debug level."""

    default_reason = Reason.DECRYPTION_FAILED

    def __init__(self) -> None:
        super().__init__("the artifact could not be decrypted and authenticated")
