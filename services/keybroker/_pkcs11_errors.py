"""Classifies python-pkcs11 exceptions: device gone, stale handle, or a genuine request error.

python-pkcs11 0.10 maps most ``CKR_*`` codes to exception classes and the rest to a bare
``PKCS11Error("Unmapped error code 0x..")``; :func:`return_code` recovers the code from those.
"""

from __future__ import annotations

import re

import pkcs11.exceptions as p11x

CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190

# The module, slot, token, session or login is gone: nothing about the request is wrong.
_DEVICE_FAILURES: tuple[type[p11x.PKCS11Error], ...] = (
    p11x.DeviceError,
    p11x.DeviceMemory,
    p11x.DeviceRemoved,
    p11x.TokenNotPresent,
    p11x.TokenNotRecognised,
    p11x.SessionHandleInvalid,
    p11x.SessionClosed,
    p11x.SessionCount,
    p11x.SlotIDInvalid,
    p11x.UserNotLoggedIn,
    p11x.NoSuchToken,
    p11x.FunctionCancelled,
)

# A handle found a moment ago no longer names an object: the token changed under us.
_STALE_HANDLES: tuple[type[p11x.PKCS11Error], ...] = (
    p11x.ObjectHandleInvalid,
    p11x.KeyHandleInvalid,
    p11x.WrappingKeyHandleInvalid,
    p11x.UnwrappingKeyHandleInvalid,
)

# Ambiguous: SoftHSM2 returns CKR_GENERAL_ERROR both for a failed AES-KWP integrity check and for
# a token whose files vanished. The caller must probe the token to tell them apart.
AMBIGUOUS: tuple[type[p11x.PKCS11Error], ...] = (p11x.GeneralError, p11x.FunctionFailed)

# The PIN is wrong or locked: retrying would only burn the token's PIN counter.
LOGIN_REFUSED: tuple[type[p11x.PKCS11Error], ...] = (
    p11x.PinIncorrect,
    p11x.PinInvalid,
    p11x.PinLenRange,
    p11x.PinExpired,
    p11x.PinLocked,
    p11x.UserPinNotInitialized,
)

_UNMAPPED = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+)")


def return_code(exc: BaseException) -> int | None:
    """The ``CKR_*`` value of an exception python-pkcs11 did not map to a class, if recoverable."""
    match = _UNMAPPED.search(str(exc))
    if match:
        return int(match.group(1), 16)
    if isinstance(exc, p11x.PKCS11Error) and "not initialized" in str(exc):
        return CKR_CRYPTOKI_NOT_INITIALIZED
    return None


def is_device_failure(exc: BaseException) -> bool:
    """True when the exception means the HSM, its token or our session/login is gone."""
    return isinstance(exc, _DEVICE_FAILURES) or return_code(exc) == CKR_CRYPTOKI_NOT_INITIALIZED


def is_stale_handle(exc: BaseException) -> bool:
    """True when an object handle stopped being valid between lookup and use."""
    return isinstance(exc, _STALE_HANDLES)


def is_function_not_permitted(exc: BaseException) -> bool:
    """True for ``CKR_KEY_FUNCTION_NOT_PERMITTED`` (e.g. CKA_UNWRAP is false: a disabled key)."""
    return return_code(exc) == CKR_KEY_FUNCTION_NOT_PERMITTED


def describe(exc: BaseException) -> str:
    """A short, secret-free description for logs: the class name and any recovered CKR code."""
    code = return_code(exc)
    return f"{type(exc).__name__}" + (f"(CKR 0x{code:x})" if code is not None else "")
