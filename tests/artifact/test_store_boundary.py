"""Where the format's protection against a hostile model store ends: a data key the store knows.

Every artifact names its KEK (``key_id``) and carries a wrapped data key the reader sends to the
broker. What the body binds (name, version, key id, sizes, bundle, ...) is bound *under the data
key*; so an attacker who knows **some** data key wrapped under that KEK, with its wrapped form —
every publisher learns one per publish (``GenerateDataKey`` returns both), and the broker's
``ReWrap`` keeps an old one current — can write a complete, valid artifact for any name and
version under that key. These tests pin down both sides of that line (ARTIFACT_FORMAT.md §9.3):

* swapping only the key slot (format 2) to one that unwraps to the known key releases nothing:
  the body's key commitment refuses it before any chunk;
* a whole artifact re-encrypted under the known key, with the victim's header bytes unchanged, is
  accepted by every reader and by the loader's own pipeline (its only check is name/version),
  keyless parties included, since the clear head and length are identical;
* what does tell them apart is a digest recomputed over the plaintext against a signature over
  the genuine model (the inference server's ``require_model_signature``).
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

from .conftest import CHUNK, header_for, unwrap_for, wrap

SIZE = 2 * CHUNK + 123


@dataclass
class _Key:
    dek: bytearray


@pytest.fixture(scope="module")
def case(artifact_format: int) -> dict[str, Any]:
    victim_dek = bytearray(os.urandom(32))
    plaintext = os.urandom(SIZE)
    # A signed model: the bundle (here just the digest it would sign) travels in the header.
    bundle = b'{"digest":"' + hashlib.sha256(plaintext).hexdigest().encode() + b'"}'
    fields = {
        "signature_bundle": bundle,
        "signature_bundle_media_type": "application/vnd.dev.sigstore.bundle.v0.3+json",
    }
    header = header_for(SIZE, wrapped_dek=wrap(victim_dek), **fields)
    # The attacker's own publish under the same KEK: it knows this key and its wrapped form.
    known_dek = bytearray(os.urandom(32))
    return {
        "format": artifact_format,
        "plaintext": plaintext,
        "header": header,
        "fields": fields,
        "artifact": encrypt_bytes(plaintext, victim_dek, header=header),
        "known_dek": known_dek,
        "known_wrapped": wrap(known_dek),
    }


def _forge(case: dict[str, Any], payload: bytes) -> bytes:
    """The victim's name, version, key id, size, time and bundle, under the attacker's key."""
    forged = header_for(SIZE, wrapped_dek=case["known_wrapped"], **case["fields"])
    return encrypt_bytes(payload, case["known_dek"], header=forged)


def _load(artifact: bytes, name: str, version: str) -> bytes:
    """What the inference loader does with a download (its name/version check included)."""

    def check_header(header: ArtifactHeader) -> None:
        assert (header.model_name, header.model_version) == (name, version)

    def release(header: ArtifactHeader) -> _Key:
        dek = unwrap_for(artifact)  # the broker unwraps whatever slot the artifact carries
        assert dek is not None
        return _Key(dek)

    pieces = [artifact[i : i + 7000] for i in range(0, len(artifact), 7000)]
    with decrypt_download(pieces, release, check_header=check_header) as result:
        return bytes(bytearray(result.plaintext))  # a copy: closing wipes the buffer in place


def test_a_slot_swapped_to_a_key_the_store_knows_releases_nothing(case: dict[str, Any]) -> None:
    header: ArtifactHeader = case["header"]
    body = case["artifact"][header.header_size :]
    if case["format"] == 2:
        swapped = (
            with_key_slot(header, KeySlot(header.key_id, 3, case["known_wrapped"])).head + body
        )
    else:
        # Format 1 has no slot: the wrapped key is in the header the body is bound to. The same
        # swap there is the victim's header with the known wrapped key, before the victim's body.
        forged = header_for(SIZE, wrapped_dek=case["known_wrapped"], **case["fields"])
        head = encrypt_bytes(b"x" * SIZE, case["known_dek"], header=forged)[: forged.header_size]
        swapped = head + body
    assert unwrap_for(swapped) == case["known_dek"]  # the HSM unwraps it: the slot is genuine
    with pytest.raises(DecryptionFailed):
        ArtifactReader(swapped).decrypt_all(bytearray(case["known_dek"]))
    stream = StreamDecryptor(bytearray(case["known_dek"]))
    with pytest.raises(DecryptionFailed):
        stream.feed(swapped)
    with pytest.raises(DecryptionFailed):
        _load(swapped, "acme/fraud-detector", "1.4.0")


def test_a_whole_artifact_under_a_key_the_store_knows_is_accepted(case: dict[str, Any]) -> None:
    header: ArtifactHeader = case["header"]
    payload = os.urandom(SIZE)
    forged = _forge(case, payload)
    # Format 1 binds the wrapped key, so its head differs in those bytes; format 2's bound header
    # (the context) is byte for byte the victim's. Length and keyless summary match either way.
    forged_header = ArtifactReader(forged).header
    if case["format"] == 2:
        assert forged_header.context == header.context
    assert len(forged) == len(case["artifact"])
    victim, fake = summarize(case["artifact"]), summarize(forged)
    assert (fake.name, fake.version, fake.key_id, fake.plaintext_size, fake.created_at) == (
        victim.name,
        victim.version,
        victim.key_id,
        victim.plaintext_size,
        victim.created_at,
    )
    # Nothing in the format or the loader's pipeline can refuse it: it is a valid artifact.
    assert _load(forged, "acme/fraud-detector", "1.4.0") == payload
    assert forged_header.signature_bundle == header.signature_bundle


def test_only_a_recomputed_digest_against_the_signature_tells_them_apart(
    case: dict[str, Any],
) -> None:
    forged = _forge(case, os.urandom(SIZE))
    signed = case["header"].signature_bundle
    for artifact, genuine in ((case["artifact"], True), (forged, False)):
        plaintext = _load(artifact, "acme/fraud-detector", "1.4.0")
        recomputed = hashlib.sha256(plaintext).hexdigest().encode()
        assert (recomputed in signed) is genuine
