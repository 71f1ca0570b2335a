"""The rules for replacing a stored artifact's key slot, shared by every storage backend.

A re-wrap moves a format-2 artifact's data key to a newer KEK version. The store cannot check that
the new wrapped key unwraps to the same data key (it holds no key); what it checks is everything
that can be checked without one, so that a mistaken or hostile call can at worst make the model
undecryptable (DATA_LOSS on load, never plaintext), and never change what the model *is*:

* the artifact is format 2 (format 1 binds the wrapped key into the body);
* the header — hence the body's context: name, version, key id, sizes, digest — is unchanged,
  since only the slot bytes are replaced (``with_key_slot``);
* the slot is still the one the caller saw (compare-and-swap on the KEK version, and on the
  wrapped data key when the caller names it), so two concurrent re-wraps cannot interleave, and a
  model deleted and published again at the same version and KEK version while it was being
  re-wrapped does not receive the data key of the artifact it replaced;
* the KEK version only moves forward: the store cannot be used to roll a model back to an older,
  possibly retired, KEK version;
* the new KEK version is one a broker numbers (1..``MAX_KEY_VERSION``, the rule the broker applies;
  the wire field is 32 bits unsigned): a slot at 2**31 or above names a version no broker can
  release, and would stop every later forward re-wrap;
* the new wrapped data key is not the stored one: AES-KWP under another KEK version never gives
  the same bytes, so the same key again as a "new" version was not re-wrapped, and the slot would
  name a KEK that does not unwrap it.

Replaying the same replacement (a second run after a crash) is a no-op, not an error; so is the
same replacement made by another call while this one copied the artifact (two rotation runs: the
broker re-wraps a data key to the same bytes), which the backends recognise by the digest.
"""

from __future__ import annotations

import logging

from strongroom.artifact import ArtifactHeader, KeySlot, with_key_slot
from strongroom.artifact.format import KEY_SLOT_FORMATS
from strongroom.errors import InvalidArgument
from strongroom.identifiers import validate_key_version
from strongroom.modelstore._heads import stored_header
from strongroom.modelstore.errors import KeySlotRejected
from strongroom.modelstore.records import ModelRecord
from strongroom.reasons import Reason


def plan(
    record: ModelRecord,
    head: bytes,
    *,
    expected_key_version: int,
    new_key_version: int,
    new_wrapped_dek: bytes,
    expected_wrapped_dek: bytes = b"",
) -> ArtifactHeader | None:
    """The new head to store, or None if the artifact already carries exactly this slot.

    ``head`` is the stored artifact's first ``record.header_size`` bytes; ``expected_wrapped_dek``
    (empty: not checked) is the wrapped data key the caller read from the slot and re-wrapped. Raises KeySlotRejected
    (KEY_SLOT_CHANGED, KEY_VERSION_NOT_NEWER, KEY_SLOT_NOT_REPLACEABLE), InvalidArgument for a
    KEK version no broker numbers (KEY_VERSION_INVALID) or a wrapped key that is the stored one
    under a new version (KEY_SLOT_NOT_REWRAPPED), InvalidArtifact for a slot outside the format's
    limits, StoredDataCorrupt if the stored head does not parse.
    """
    validate_key_version(new_key_version)
    # The record may have been edited to name another model's blob: re-wrapping it would put
    # that model's artifact under this record and then delete the other model's blob.
    current = stored_header(record, head)
    if current.format_version not in KEY_SLOT_FORMATS:
        raise KeySlotRejected(
            f"model {record.name} {record.version} is format {current.format_version}: its wrapped "
            "data key is bound into the body; re-publish it to make it re-wrappable",
            reason=Reason.KEY_SLOT_NOT_REPLACEABLE,
        )
    if current.key_version == new_key_version and current.wrapped_dek == new_wrapped_dek:
        return None
    # The version alone does not identify the slot: a re-published model under the same KEK
    # version carries another data key, which the caller's re-wrapped one is not.
    if current.key_version != expected_key_version or (
        expected_wrapped_dek and current.wrapped_dek != expected_wrapped_dek
    ):
        raise KeySlotRejected(
            f"model {record.name} {record.version} is at KEK version {current.key_version}, "
            f"not the expected {expected_key_version}"
            if current.key_version != expected_key_version
            else f"model {record.name} {record.version} holds another wrapped data key than the "
            "one re-wrapped (it was replaced meanwhile)",
            reason=Reason.KEY_SLOT_CHANGED,
        )
    if new_key_version <= current.key_version:
        raise KeySlotRejected(
            f"KEK version {new_key_version} is not newer than the stored {current.key_version}",
            reason=Reason.KEY_VERSION_NOT_NEWER,
        )
    if bytes(new_wrapped_dek) == current.wrapped_dek:
        raise InvalidArgument(
            f"the wrapped data key for KEK version {new_key_version} is the one stored under "
            f"version {current.key_version}: it was not re-wrapped (KeyBrokerService.ReWrap)",
            reason=Reason.KEY_SLOT_NOT_REWRAPPED,
        )
    return with_key_slot(current, KeySlot(current.key_id, new_key_version, bytes(new_wrapped_dek)))


def log_replaced(
    log: logging.Logger, name: str, version: str, record: ModelRecord, key_version: int
) -> None:
    """Logs, to the backend's ``log``, a key slot it replaced: ``record``'s, moved to
    ``key_version``; one line for every backend."""
    log.info(
        "replaced key slot",
        extra={
            "model": name,
            "version": version,
            "key_id": record.key_id,
            "from_key_version": record.key_version,
            "to_key_version": key_version,
        },
    )
