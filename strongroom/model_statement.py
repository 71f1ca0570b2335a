"""What a model signature's in-toto statement must say, for the publisher and the servers alike.

``model-signing`` signs a DSSE envelope whose payload is an in-toto statement listing the model's
files and their digests. The publisher reads the digest its own bundle signs to hold the bytes it
uploads to it (:func:`strongroom.client.signing.signed_digest`), and the inference servers compare
it with the decrypted plaintext (``services/inference/signature.py``): one rule, so that a publisher
never stores a bundle every server would refuse.
"""

from __future__ import annotations

import re
from typing import Any

PAYLOAD_TYPE = "application/vnd.in-toto+json"
"""The DSSE payload type of a model signature."""
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def signed_file_digest(statement: object) -> str:
    """The SHA-256 (64 lowercase hex digits) of the one model file ``statement`` describes.

    ValueError unless it is a model-signing statement of exactly one file hashed with SHA-256
    (the servers hash the whole plaintext: a statement of several files, or of another hash,
    describes something they cannot check). Signed is not well-formed: any member may be of any
    JSON type, so each is checked for its type."""
    document = _object(statement)
    predicate = _object(document.get("predicate"))
    serialization = _object(predicate.get("serialization"))
    resources = predicate.get("resources")
    if (
        document.get("_type") != STATEMENT_TYPE
        or document.get("predicateType") != PREDICATE_TYPE
        or serialization.get("method") != "files"
        or serialization.get("hash_type") != "sha256"
        or not isinstance(resources, list)
        or len(resources) != 1
        or not isinstance(resources[0], dict)
        or resources[0].get("algorithm") != "sha256"
    ):
        raise ValueError("the signed statement does not describe one SHA-256-hashed model file")
    digest = resources[0].get("digest")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise ValueError("the signed statement's digest is not a SHA-256 in lowercase hex")
    return digest


def _object(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (so a wrong type fails the checks)."""
    return value if isinstance(value, dict) else {}
