"""Format 3's body key: the data key in the key slot, bound to one model name and version.

In formats 1 and 2 the key the broker wraps (the *slot key*) encrypts the body itself, and
GenerateDataKey hands it to the publisher. Whoever holds one such key and its wrapping can then
write a valid artifact for *any* model name and version under that KEK, and every reader accepts
it: a model store (or a publisher with write access to it) can substitute one model for another.

In format 3 the body is encrypted under ::

    body_key = HKDF-Expand-SHA-256(PRK = slot_key, info = LABEL || u16(len(name)) || name
                                                         || u16(len(version)) || version, L = 32)

The broker computes it when it generates the data key (GenerateDataKey names the model) and gives
the publisher only ``body_key``; the slot key is released only to attested inference servers,
which derive ``body_key`` for the model *they asked for*. A publisher's ``body_key`` for one model
says nothing about the body key of any other name or version (HKDF-Expand is a PRF keyed by the
slot key, which the publisher never sees), so a body written for another model fails the key
commitment before one chunk is decrypted.

The slot key is 32 uniformly random bytes from the HSM, a valid PRK without an Extract step. With
L = 32 the expansion is one block, ``HMAC-SHA-256(slot_key, info || 0x01)``: computed by OpenSSL
straight into the caller's buffer, because every Python HMAC and HKDF API returns its output (or
its last block) as an immutable ``bytes`` object that no wipe reaches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
from collections.abc import Callable

from strongroom.artifact._memory import buffer_address
from strongroom.artifact.format import FORMAT_V3, ArtifactHeader
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.identifiers import validate_name, validate_version
from strongroom.reasons import Reason

__all__ = ["KEY_SIZE", "LABEL", "bind_data_key", "binding_info", "body_key"]

KEY_SIZE = 32
"""Bytes of the slot key and of the body key."""
LABEL = b"strongroom artifact body key v1\x00"
"""The domain-separation prefix of the HKDF info."""
_LENGTH = struct.Struct(">H")


def binding_info(model_name: str, model_version: str) -> bytes:
    """The HKDF info for ``model_name``/``model_version`` (both validated: InvalidArgument)."""
    name = validate_name(model_name).encode("ascii")
    version = validate_version(model_version).encode("ascii")
    return LABEL + _LENGTH.pack(len(name)) + name + _LENGTH.pack(len(version)) + version


def bind_data_key(slot_key: bytes | bytearray, model_name: str, model_version: str) -> bytearray:
    """The format-3 body key of ``model_name``/``model_version`` under ``slot_key``.

    Written straight into a new bytearray (the caller wipes it): no immutable copy of the key is
    left behind. InvalidArgument for a slot key that is not 32 bytes or an invalid name/version.
    """
    if len(slot_key) != KEY_SIZE:
        raise InvalidArgument(
            f"a data key is {KEY_SIZE} bytes, got {len(slot_key)}",
            reason=Reason.DATA_KEY_INVALID,
        )
    message = binding_info(model_name, model_version) + b"\x01"  # HKDF's first block counter
    out = bytearray(KEY_SIZE)
    written = ctypes.c_uint(0)
    key = slot_key if isinstance(slot_key, bytes) else buffer_address(memoryview(slot_key))
    target = buffer_address(memoryview(out))
    hmac, sha256 = _openssl_hmac()
    if (
        not hmac(sha256(), key, KEY_SIZE, message, len(message), target, ctypes.byref(written))
        or written.value != KEY_SIZE
    ):
        raise RuntimeError("OpenSSL's HMAC-SHA-256 failed")  # not reachable with valid inputs
    return out


_Hmac = Callable[..., int]


@functools.lru_cache(maxsize=1)
def _openssl_hmac() -> tuple[_Hmac, Callable[[], int]]:
    """OpenSSL's one-shot ``HMAC()`` and ``EVP_sha256()`` (the libcrypto Python itself links)."""
    library = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    hmac = library.HMAC
    hmac.restype = ctypes.c_void_p
    hmac.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint),
    ]
    sha256 = library.EVP_sha256
    sha256.restype = ctypes.c_void_p
    sha256.argtypes = []
    return hmac, sha256


def body_key(
    header: ArtifactHeader,
    slot_key: bytearray,
    model_name: str,
    model_version: str,
    *,
    accept_unbound: bool = False,
) -> bytearray:
    """The key that opens ``header``'s body, for the model the reader asked for.

    ``slot_key`` is the released key (unwrapped from the slot); ``model_name``/``model_version``
    are what the reader requested (never taken from the artifact: the binding is to the request).
    Format 3 derives the body key; formats 1 and 2 use the slot key itself, which anyone who ever
    held a key of that KEK could have written for this name, so they are refused
    (FailedPrecondition ARTIFACT_KEY_UNBOUND) unless ``accept_unbound`` (while re-publishing older
    models). Returns a new bytearray either way; the caller wipes both.
    """
    if header.format_version == FORMAT_V3:
        return bind_data_key(slot_key, model_name, model_version)
    if not accept_unbound:
        raise FailedPrecondition(
            f"{model_name}/{model_version} is a format-{header.format_version} artifact, whose data "
            "key is not bound to its model: anyone who ever held a data key of its KEK could have "
            "written it; re-publish it (format 3), or accept unbound artifacts while migrating",
            reason=Reason.ARTIFACT_KEY_UNBOUND,
        )
    return bytearray(slot_key)
