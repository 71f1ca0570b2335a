"""Optional OpenSSF model signing at publish time (the bundle travels in the artifact header).

The publisher signs the plaintext model file with an EC key using ``model-signing`` (a DSSE-wrapped
in-toto statement listing the file's SHA-256, in a Sigstore bundle). Only the bundle is written to
a private temporary directory; the model file is read where it is. Signing reads the file once
more (a second pass; publishing without a signature stays one pass).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.reasons import Reason

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"


def sign_model(model: Path, private_key: Path) -> bytes:
    """The Sigstore bundle signing ``model`` with the EC private key in ``private_key`` (PEM)."""
    import model_signing  # imported on use: it pulls in the Sigstore stack

    if not private_key.is_file():
        raise FailedPrecondition(
            f"signing key {private_key} is not a file", reason=Reason.SIGNING_KEY_MISSING
        )
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
