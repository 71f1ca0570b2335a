"""Optional OpenSSF model signing at publish time (the bundle travels in the artifact header).

The publisher signs the plaintext model file with an EC key using ``model-signing`` (a DSSE-wrapped
in-toto statement listing the file's SHA-256, in a Sigstore bundle). Only the bundle is written to
a private temporary directory; the model file is read where it is. Signing reads the file once
more (a second pass; publishing without a signature stays one pass).
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from strongroom import jsonparse
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.model_statement import PAYLOAD_TYPE, signed_file_digest
from strongroom.reasons import Reason
from strongroom.runtime.secrets import require_private

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"


def sign_model(model: Path, private_key: Path) -> bytes:
    """The Sigstore bundle signing ``model`` with the EC private key in ``private_key`` (PEM)."""
    import model_signing  # imported on use: it pulls in the Sigstore stack

    if not private_key.is_file():
        raise FailedPrecondition(
            f"signing key {private_key} is not a file", reason=Reason.SIGNING_KEY_MISSING
        )
    _check_signing_key(private_key)
    with tempfile.TemporaryDirectory(prefix="strongroom-sign-") as tmp:
        signature = Path(tmp) / "model.sig"
        try:
            model_signing.signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
                private_key=private_key
            ).sign(model, signature)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(
                f"cannot sign {model.name}: {exc}", reason=Reason.SIGNING_FAILED
            ) from None
        return signature.read_bytes()


def signed_digest(bundle: bytes) -> bytes:
    """The plaintext SHA-256 a bundle :func:`sign_model` made signs (the one file its in-toto
    statement lists, by the servers' own rule: :mod:`strongroom.model_statement`), to hold the bytes published to it. Not a verification: the bundle is ours,
    and the inference servers verify it (services/inference/signature.py)."""
    try:
        envelope = jsonparse.loads(bundle)["dsseEnvelope"]
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise ValueError("not an in-toto statement")
        statement = jsonparse.loads(base64.b64decode(envelope["payload"], validate=True))
        digest = bytes.fromhex(signed_file_digest(statement))
    except (ValueError, KeyError, TypeError, binascii.Error):
        # model-signing of another version, writing another statement: no server could check it.
        raise InvalidArgument(
            "the signature model-signing made does not name one SHA-256-hashed file",
            reason=Reason.SIGNING_FAILED,
        ) from None
    return digest


def _check_signing_key(private_key: Path) -> None:
    """Refuses, with SIGNING_KEY_INVALID, a file that is not an unencrypted PEM EC private key.

    model-signing raised AttributeError (no ``curve``) for an RSA or Ed25519 key, which the
    command line does not catch: a traceback instead of one line. The key is loaded here only to
    be checked; model-signing loads it again to sign (and refuses an EC curve it does not support).

    A key that group or others may read is refused first (SECRET_FILE_PERMISSIONS), as the
    services refuse such secret files: whoever else reads it can sign models the inference
    servers will accept as the publisher's.
    """
    try:
        require_private(private_key, "signing key")
        key = load_pem_private_key(private_key.read_bytes(), password=None)
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read signing key {private_key}: {exc.strerror}",
            reason=Reason.SIGNING_KEY_MISSING,
        ) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # TypeError: an encrypted key; UnsupportedAlgorithm: a curve cryptography cannot load.
        raise InvalidArgument(
            f"signing key {private_key} is not an unencrypted PEM private key",
            reason=Reason.SIGNING_KEY_INVALID,
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(
            f"signing key {private_key} is not an EC private key (model signing needs P-256, "
            "P-384 or P-521)",
            reason=Reason.SIGNING_KEY_INVALID,
        )
