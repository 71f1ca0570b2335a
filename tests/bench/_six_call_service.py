"""Runs ``strongroom serve ...`` with a release's re-wrap made one PKCS#11 call at a time.

The reference side of ``releasecpu_bench``'s one-call A/B: the seven calls (unwrap, read the key's
length, import the caller's key, OAEP wrap, destroy both, read whether the version is still
enabled) as the broker made them before they became one C call
(``p11direct.DirectSession.rewrap_oaep``), each through ctypes on its own, with the same
templates, checks and classification of an unwrap refusal or a disabled version. Usage:
``python -m tests.bench._six_call_service serve keybroker --config C``.
"""

from __future__ import annotations

import sys

from pkcs11 import Attribute

from strongroom.keybroker import keys
from strongroom.keybroker._kek import KekVersion
from strongroom.keybroker.ephemeral import EphemeralPublicKey
from strongroom.keybroker.hsm import HsmSession
from strongroom.oaep import OaepHash


def six_calls(
    hs: HsmSession,
    version: KekVersion,
    blob: bytes,
    ephemeral: EphemeralPublicKey,
    choice: OaepHash,
) -> bytes:
    """What ``keys._release_with`` does, one PKCS#11 call at a time."""
    out = _rewrap(hs, version, blob, ephemeral, choice)
    keys._still_enabled(hs, version)  # after the wrap, as the one call reads it
    return out


def _rewrap(
    hs: HsmSession,
    version: KekVersion,
    blob: bytes,
    ephemeral: EphemeralPublicKey,
    choice: OaepHash,
) -> bytes:
    dek = keys._unwrap_session_dek(hs, version, blob)
    try:
        public = hs.direct.create_object(
            keys.EPHEMERAL_KEY_IMPORT.with_bytes(
                {
                    Attribute.MODULUS: ephemeral.modulus,
                    Attribute.PUBLIC_EXPONENT: ephemeral.public_exponent,
                }
            )
        )
        try:
            return hs.direct.wrap_oaep(public, dek, choice, len(ephemeral.modulus))
        finally:
            hs.direct.destroy(public)
    finally:
        hs.direct.destroy(dek)


def main(argv: list[str] | None = None) -> int:
    """Swaps the release's re-wrap for the six single calls and runs the CLI."""
    from strongroom.cli.main import main as cli_main

    keys._release_with = six_calls
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
