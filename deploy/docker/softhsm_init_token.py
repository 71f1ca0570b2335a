#!/usr/bin/env python3
"""Initialises the DEVELOPMENT HSM's token (SoftHSM2) once, reading both PINs from files.

``softhsm2-util --init-token`` takes PINs only on argv or from a terminal; a one-shot container has
neither a terminal nor a good reason to put a PIN on a command line. This calls the PKCS#11 module
directly (C_InitToken, then C_InitPIN as the security officer). It is idempotent: when a token with
the label already exists it changes nothing.

    python3 softhsm_init_token.py --module /usr/lib/softhsm/libsofthsm2.so --label strongroom \
        --pin-file /run/secrets/hsm-pin --so-pin-file /run/secrets/hsm-so-pin

Exit codes: 0 initialised or already present, 1 PKCS#11 failure, 2 bad arguments or PIN files.
Only SoftHSM2 is a target: a real HSM's token is initialised with the vendor's tools and ceremony.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

CKR_OK = 0
CKF_SERIAL_SESSION = 0x4
CKF_RW_SESSION = 0x2
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
PIN_MIN, PIN_MAX = 4, 255

_ULONG = ctypes.c_ulong


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _TokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO (PKCS#11 v2.40 section 3.2), laid out as the C header defines it."""

    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturer_id", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serial_number", ctypes.c_char * 16),
        ("flags", _ULONG),
        ("max_session_count", _ULONG),
        ("session_count", _ULONG),
        ("max_rw_session_count", _ULONG),
        ("rw_session_count", _ULONG),
        ("max_pin_len", _ULONG),
        ("min_pin_len", _ULONG),
        ("total_public_memory", _ULONG),
        ("free_public_memory", _ULONG),
        ("total_private_memory", _ULONG),
        ("free_private_memory", _ULONG),
        ("hardware_version", _Version),
        ("firmware_version", _Version),
        ("utc_time", ctypes.c_char * 16),
    ]


class Pkcs11Failure(Exception):
    """A PKCS#11 call returned an error code (the message names the call, never an argument)."""


def _check(name: str, rv: int) -> None:
    if rv != CKR_OK:
        raise Pkcs11Failure(f"{name} failed with CKR 0x{rv:08x}")


def _padded_label(label: str) -> bytes:
    raw = label.encode("utf-8")
    if not 1 <= len(raw) <= 32:
        raise ValueError("token label must be 1 to 32 bytes of UTF-8")
    return raw.ljust(32, b" ")


def _read_pin(path: Path, what: str) -> bytes:
    pin = path.read_bytes().strip()
    if not PIN_MIN <= len(pin) <= PIN_MAX:
        raise ValueError(f"{what} in {path} must be {PIN_MIN} to {PIN_MAX} bytes")
    return pin


def _slots(lib: ctypes.CDLL) -> list[int]:
    count = _ULONG(0)
    _check("C_GetSlotList", lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)))
    ids = (_ULONG * count.value)()
    _check("C_GetSlotList", lib.C_GetSlotList(ctypes.c_ubyte(1), ids, ctypes.byref(count)))
    return list(ids[: count.value])


def _token_info(lib: ctypes.CDLL, slot: int) -> _TokenInfo:
    info = _TokenInfo()
    _check("C_GetTokenInfo", lib.C_GetTokenInfo(_ULONG(slot), ctypes.byref(info)))
    return info


def _find(lib: ctypes.CDLL, label: bytes) -> tuple[int | None, int | None]:
    """Returns (slot of the initialised token with ``label``, first free slot)."""
    found = free = None
    for slot in _slots(lib):
        info = _token_info(lib, slot)
        if info.flags & CKF_TOKEN_INITIALIZED:
            if bytes(info.label) == label and found is None:
                found = slot
        elif free is None:
            free = slot
    return found, free


def init_token(module: str, label: str, pin: bytes, so_pin: bytes) -> bool:
    """Initialises a token called ``label`` unless one exists; returns True when it created one."""
    padded = _padded_label(label)
    lib = ctypes.CDLL(module)
    _check("C_Initialize", lib.C_Initialize(None))
    try:
        existing, free = _find(lib, padded)
        if existing is not None:
            return False
        if free is None:
            raise Pkcs11Failure("no free slot to initialise a token in")
        _check(
            "C_InitToken",
            lib.C_InitToken(_ULONG(free), so_pin, _ULONG(len(so_pin)), padded),
        )
        # SoftHSM2 moves a freshly initialised token to a new slot id: look it up again.
        slot, _ = _find(lib, padded)
        if slot is None:
            raise Pkcs11Failure("the initialised token did not appear in the slot list")
        session = _ULONG(0)
        _check(
            "C_OpenSession",
            lib.C_OpenSession(
                _ULONG(slot),
                _ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION),
                None,
                None,
                ctypes.byref(session),
            ),
        )
        try:
            _check("C_Login", lib.C_Login(session, _ULONG(CKU_SO), so_pin, _ULONG(len(so_pin))))
            _check("C_InitPIN", lib.C_InitPIN(session, pin, _ULONG(len(pin))))
            _check("C_Logout", lib.C_Logout(session))
        finally:
            lib.C_CloseSession(session)
        return True
    finally:
        lib.C_Finalize(None)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--module", default="/usr/lib/softhsm/libsofthsm2.so")
    parser.add_argument("--label", required=True)
    parser.add_argument("--pin-file", type=Path, required=True)
    parser.add_argument("--so-pin-file", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        pin = _read_pin(args.pin_file, "user PIN")
        so_pin = _read_pin(args.so_pin_file, "SO PIN")
        created = init_token(args.module, args.label, pin, so_pin)
    except (OSError, ValueError) as exc:
        print(f"softhsm-init-token: {exc}", file=sys.stderr)
        return 2
    except Pkcs11Failure as exc:
        print(f"softhsm-init-token: {exc}", file=sys.stderr)
        return 1
    print(f"token {args.label!r}: {'initialised' if created else 'already present'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
