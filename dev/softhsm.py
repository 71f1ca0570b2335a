"""SoftHSM2 tokens for development, tests and the demo (never for production keys).

:func:`init_softhsm_token` makes a self-contained token directory::

    DIR/softhsm2.conf     points SoftHSM2 at DIR/tokens
    DIR/tokens/<uuid>/    the token's object files
    DIR/libsofthsm2.so    a private copy of the PKCS#11 module (see below)

**PINs never appear on a command line.** ``softhsm2-util --init-token`` takes PINs only on argv
(visible in ``ps``) or from a terminal, so tokens are initialised by calling the PKCS#11 module
directly (:func:`init_token`: C_InitToken, then C_InitPIN as the security officer). The same
function is the ``softhsm-init-token`` command the development image runs, with PINs read from files:

    softhsm-init-token --module /usr/lib/softhsm/libsofthsm2.so --label strongroom \
        --pin-file /run/secrets/hsm-pin --so-pin-file /run/secrets/hsm-so-pin

Its exit codes: 0 initialised or already present, 1 PKCS#11 failure, 2 bad arguments or PIN files.

**Why a private module copy.** SoftHSM2 reads ``SOFTHSM2_CONF`` once, in ``C_Initialize``, and keeps
one global state per loaded library: a process that has loaded ``libsofthsm2.so`` does not see tokens
created later by another process, and a second ``C_Initialize`` with another configuration is
impossible while the first one is in use. Loading a *copy* of the module from a different path gives
an independent library instance (its own globals and its own ``C_Initialize``), so every test owns an
independent HSM with its own token and configuration, in one pytest process, without
``C_Finalize``-ing anyone else's module. :meth:`SoftHsmToken.replica_module` makes further copies
that open the *same* token, which is how tests model several broker replicas sharing one HSM.

The configuration reaches the module through :attr:`SoftHsmToken.module_env`, which
:class:`~strongroom.keybroker.hsm.HsmConfig` applies around ``C_Initialize`` only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.reasons import Reason
from strongroom.runtime.secrets import Secret

#: Where Debian's ``softhsm2`` package installs the module (a symlink into the multiarch dir).
SYSTEM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")

_LABEL_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,30}[\x21-\x7e])?$")
_MIN_PIN, _MAX_PIN = 4, 255
_ENV_LOCK = threading.Lock()


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token that lives entirely inside :attr:`directory`."""

    directory: Path
    conf_path: Path
    module_path: Path
    label: str

    @property
    def tokens_dir(self) -> Path:
        """The ``directories.tokendir`` of :attr:`conf_path`."""
        return self.directory / "tokens"

    @property
    def module_env(self) -> dict[str, str]:
        """The environment the module must see when it is initialised."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def token_store(self) -> Path:
        """The directory holding this token's object files (``tokens/<uuid>``).

        Tests move it away and back to make the token disappear and return.
        """
        stores = [p for p in self.tokens_dir.iterdir() if p.is_dir()]
        if len(stores) != 1:
            raise FailedPrecondition(
                f"expected one token store in {self.tokens_dir}, found {len(stores)}",
                reason=Reason.SOFTHSM_LAYOUT,
            )
        return stores[0]

    def replica_module(self, name: str) -> Path:
        """Another private copy of the module, opening the same token as an independent instance.

        Two :class:`~strongroom.keybroker.hsm.Hsm` objects built from two copies behave like two
        broker processes sharing one HSM.
        """
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
            raise InvalidArgument(
                f"replica name {name!r} is not [a-z0-9-]", reason=Reason.INVALID_NAME
            )
        path = self.directory / f"libsofthsm2-{name}.so"
        if not path.exists():
            shutil.copyfile(self.module_path, path)
        return path


def init_softhsm_token(
    directory: Path | str,
    *,
    label: str,
    pin: Secret,
    so_pin: Secret,
    system_module: Path = SYSTEM_MODULE,
) -> SoftHsmToken:
    """Creates ``directory`` (which must not exist or be empty) holding one initialised token.

    ``label`` is the token label (1-32 printable ASCII characters). The user PIN is set, so the
    token is ready for :class:`~strongroom.keybroker.hsm.Hsm`. Raises ``FailedPrecondition`` with
    ``SOFTHSM_NOT_INSTALLED`` when SoftHSM2 is missing and ``SOFTHSM_INIT_FAILED`` when PKCS#11 fails.
    """
    directory = Path(directory)
    if not _LABEL_RE.match(label):
        raise InvalidArgument(
            "a token label is 1-32 printable ASCII characters without leading or trailing spaces",
            reason=Reason.TOKEN_LABEL_INVALID,
        )
    pins = {"so": so_pin.reveal_text(), "user": pin.reveal_text()}
    for kind, value in pins.items():
        if not _MIN_PIN <= len(value.encode()) <= _MAX_PIN or "\n" in value or "\r" in value:
            raise InvalidArgument(
                f"the {kind} PIN must be {_MIN_PIN}-{_MAX_PIN} bytes on one line",
                reason=Reason.PIN_INVALID,
            )
    if not system_module.exists():
        raise FailedPrecondition(
            "SoftHSM2 is not installed (Debian package softhsm2)",
            reason=Reason.SOFTHSM_NOT_INSTALLED,
        )
    if directory.exists() and any(directory.iterdir()):
        raise FailedPrecondition(f"{directory} is not empty", reason=Reason.SOFTHSM_DIR_NOT_EMPTY)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
    )
    module = directory / "libsofthsm2.so"
    shutil.copyfile(system_module.resolve(), module)
    _init_private_token(module, conf, label, pins)
    return SoftHsmToken(directory=directory, conf_path=conf, module_path=module, label=label)


def _init_private_token(module: Path, conf: Path, label: str, pins: dict[str, str]) -> None:
    # SoftHSM2 reads SOFTHSM2_CONF in C_Initialize only: set it for that call, under a lock.
    with _ENV_LOCK:
        previous = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        try:
            init_token(str(module), label, pins["user"].encode(), pins["so"].encode())
        except Pkcs11Failure as exc:
            raise FailedPrecondition(
                f"initialising the SoftHSM2 token failed: {exc}", reason=Reason.SOFTHSM_INIT_FAILED
            ) from None
        finally:
            if previous is None:
                os.environ.pop("SOFTHSM2_CONF", None)
            else:
                os.environ["SOFTHSM2_CONF"] = previous


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
