"""A hostile model store, and the publishers' data keys it may know (ARTIFACT_FORMAT.md §9.3, §10).

Every artifact names its KEK (``key_id``) and carries a wrapped data key (the *slot key*) the
reader sends to the broker. Before format 3, GenerateDataKey gave every publisher the slot key
itself, and the body was encrypted under it: whoever knew one slot key under a KEK and its wrapped
form could write a valid artifact for *any* name and version, and every reader accepted it. Format
3 encrypts the body under a key bound to the model's name and version; a publisher receives only
that bound key, and the reader derives it for the model it asked for. These tests pin down:

* swapping only the key slot to one that unwraps to another key releases nothing (the body's
  key commitment refuses it before any chunk);
* a whole artifact written under a publisher's key (its own model's bound key and that model's
  wrapped slot key), with the victim's header, is refused: in format 3 by the key commitment (the
  reader derives another key), in format 1 at once (ARTIFACT_KEY_UNBOUND), and even when unbound
  artifacts are accepted, since the publisher never held the slot key;
* where the protection ends: a *slot key* known to the attacker (handed out before format 3)
  forges any format; only re-publishing under fresh keys, or a signature over the genuine model
  checked against a recomputed digest (``require_model_signature``), refuses that.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import pytest

from strongroom.artifact import (
    ArtifactHeader,
    ArtifactReader,
    DecryptionFailed,
    KeySlot,
    StreamDecryptor,
    decrypt_download,
    encrypt_bytes,
    summarize,
    with_key_slot,
)
from strongroom.artifact.format import FORMAT_V3
from strongroom.artifact.keybinding import bind_data_key, body_key
from strongroom.errors import FailedPrecondition

from .conftest import CHUNK, header_for, unwrap_for, wrap

SIZE = 2 * CHUNK + 123


@dataclass
class _Key:
    dek: bytearray


VICTIM = ("acme/fraud-detector", "1.4.0")
ATTACKER = ("attacker/model", "1")


@pytest.fixture(scope="module")
def case(artifact_format: int) -> dict[str, Any]:
    victim_slot_key = bytearray(os.urandom(32))
    plaintext = os.urandom(SIZE)
    # A signed model: the bundle (here just the digest it would sign) travels in the header.
    bundle = b'{"digest":"' + hashlib.sha256(plaintext).hexdigest().encode() + b'"}'
    fields = {
        "signature_bundle": bundle,
        "signature_bundle_media_type": "application/vnd.dev.sigstore.bundle.v0.3+json",
    }
    header = header_for(SIZE, wrapped_dek=wrap(victim_slot_key), **fields)
    # The attacker's own publish under the same KEK: it got the wrapped slot key and, from the
    # broker, the body key of its own model (never the slot key, whatever format it writes).
    attacker_slot_key = bytearray(os.urandom(32))
    return {
        "format": artifact_format,
        "plaintext": plaintext,
        "header": header,
        "fields": fields,
        "artifact": encrypt_bytes(
            plaintext, _publisher_key(header, victim_slot_key, VICTIM), header=header
        ),
        "known_dek": bind_data_key(attacker_slot_key, *ATTACKER),
        "known_wrapped": wrap(attacker_slot_key),
        "attacker_slot_key": attacker_slot_key,
    }


def _publisher_key(
    header: ArtifactHeader, slot_key: bytearray, model: tuple[str, str]
) -> bytearray:
    """The body key a publisher of ``model`` encrypts with: what GenerateDataKey returns in format
    3 (bound to the model), the slot key itself before."""
    if header.format_version == FORMAT_V3:
        return bind_data_key(slot_key, *model)
    return bytearray(slot_key)


def _forge(case: dict[str, Any], payload: bytes, key: bytearray | None = None) -> bytes:
    """The victim's name, version, key id, size, time and bundle, under the attacker's key, with
    the attacker's wrapped slot key."""
    forged = header_for(SIZE, wrapped_dek=case["known_wrapped"], **case["fields"])
    return encrypt_bytes(payload, key if key is not None else case["known_dek"], header=forged)


def _load(artifact: bytes, *, accept_unbound: bool = False) -> bytes:
    """What the inference loader does with a download of the victim's model: its name/version
    check, the broker's unwrap of whatever slot the artifact carries, the body key derived for the
    model it asked for."""

    def check_header(header: ArtifactHeader) -> None:
        assert (header.model_name, header.model_version) == VICTIM

    def release(header: ArtifactHeader) -> _Key:
        slot_key = unwrap_for(artifact)
        assert slot_key is not None
        return _Key(body_key(header, slot_key, *VICTIM, accept_unbound=accept_unbound))

    pieces = [artifact[i : i + 7000] for i in range(0, len(artifact), 7000)]
    with decrypt_download(pieces, release, check_header=check_header) as result:
        return bytes(bytearray(result.plaintext))  # a copy: closing wipes the buffer in place


def test_the_genuine_artifact_loads(case: dict[str, Any]) -> None:
    assert _load(case["artifact"], accept_unbound=True) == case["plaintext"]


def test_a_slot_swapped_to_a_key_the_store_knows_releases_nothing(case: dict[str, Any]) -> None:
    header: ArtifactHeader = case["header"]
    body = case["artifact"][header.header_size :]
    if case["format"] != 1:
        swapped = (
            with_key_slot(header, KeySlot(header.key_id, 3, case["known_wrapped"])).head + body
        )
    else:
        # Format 1 has no slot: the wrapped key is in the header the body is bound to. The same
        # swap there is the victim's header with the known wrapped key, before the victim's body.
        forged = header_for(SIZE, wrapped_dek=case["known_wrapped"], **case["fields"])
        head = encrypt_bytes(b"x" * SIZE, case["known_dek"], header=forged)[: forged.header_size]
        swapped = head + body
    assert unwrap_for(swapped) == case["attacker_slot_key"]  # the HSM unwraps: a genuine slot
    with pytest.raises(DecryptionFailed):
        ArtifactReader(swapped).decrypt_all(bytearray(case["known_dek"]))
    stream = StreamDecryptor(bytearray(case["known_dek"]))
    with pytest.raises(DecryptionFailed):
        stream.feed(swapped)
    with pytest.raises(DecryptionFailed):
        _load(swapped, accept_unbound=True)


def test_a_whole_artifact_under_a_publishers_key_is_refused(case: dict[str, Any]) -> None:
    """Before format 3 this artifact loaded as the victim's model: the store (or a publisher
    writing to it) substituted any model it liked."""
    header: ArtifactHeader = case["header"]
    forged = _forge(case, os.urandom(SIZE))
    # Indistinguishable without a key: the bound header is the victim's (format 3: byte for byte)
    # and length and keyless summary match.
    if case["format"] != 1:
        assert ArtifactReader(forged).header.context == header.context
    assert len(forged) == len(case["artifact"])
    victim, fake = summarize(case["artifact"]), summarize(forged)
    assert (fake.name, fake.version, fake.key_id, fake.plaintext_size, fake.created_at) == (
        victim.name,
        victim.version,
        victim.key_id,
        victim.plaintext_size,
        victim.created_at,
    )
    # The reader derives the victim's body key from the slot key: not the key the body is under.
    with pytest.raises(DecryptionFailed if case["format"] == FORMAT_V3 else FailedPrecondition):
        _load(forged)
    with pytest.raises(DecryptionFailed):
        _load(forged, accept_unbound=True)


def test_a_slot_key_the_attacker_holds_still_forges_any_format(case: dict[str, Any]) -> None:
    """The boundary: a slot key itself (every publisher got one before format 3) derives any
    model's body key. Only fresh keys (re-publishing) or the signature check end that."""
    payload = os.urandom(SIZE)
    header = header_for(SIZE, wrapped_dek=case["known_wrapped"], **case["fields"])
    forged = _forge(case, payload, _publisher_key(header, case["attacker_slot_key"], VICTIM))
    assert _load(forged, accept_unbound=True) == payload


def test_only_a_recomputed_digest_against_the_signature_tells_them_apart(
    case: dict[str, Any],
) -> None:
    header = header_for(SIZE, wrapped_dek=case["known_wrapped"], **case["fields"])
    forged = _forge(
        case, os.urandom(SIZE), _publisher_key(header, case["attacker_slot_key"], VICTIM)
    )
    signed = case["header"].signature_bundle
    for artifact, genuine in ((case["artifact"], True), (forged, False)):
        plaintext = _load(artifact, accept_unbound=True)
        recomputed = hashlib.sha256(plaintext).hexdigest().encode()
        assert (recomputed in signed) is genuine
