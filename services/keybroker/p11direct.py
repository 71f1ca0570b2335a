"""Direct PKCS#11 calls for the data-key path of a release, beside python-pkcs11.

python-pkcs11 turns every object handle a call returns into a Python object: it reads ten
attributes (one bulk ``C_GetAttributeValue``, which SoftHSM2 refuses because two of them are
PKCS#11 3.2 names, then ten single reads), builds a new class from mixins, and gives up and
retakes the interpreter lock around each call. A release's re-wrap returns two such objects (the
unwrapped data key and the caller's imported public key) and uses neither as more than a handle:
a re-wrap took 222 µs of CPU through python-pkcs11 and takes 90 µs with the same calls made
directly (one thread, in a loop, on this machine). :class:`DirectSession` makes the same PKCS#11
calls with the same templates and mechanisms through ctypes, on the same module instance and the
same session (the handles python-pkcs11 opened), and hands back plain handles.

**One call per re-wrap.** ctypes gives up the interpreter lock around each foreign call and takes
it back afterwards; with sixteen request threads running Python, every retake is a wait and two
context switches of the HSM's worker thread (13.9 per release at 16 callers, against 1.7 alone).
So a release's eight calls (read whether the key version is enabled, unwrap, read the new key's
length, import the caller's key, OAEP wrap, destroy both, then read again whether the key version
is still enabled: an :class:`AttributeRead`) are made by one C function, ``sr_rewrap_read`` in
``_p11release.c``, built with the package: the lock is given up once for the whole sequence
(never *held* through a PKCS#11 call: an HSM that hangs must not freeze the broker's other
threads). :meth:`DirectSession.rewrap_oaep` calls it with the same
templates and mechanisms the single calls take. The library says which behaviour it was built with
(``sr_p11release_version``): one that is not :data:`RELEASE_CALLS_VERSION` is refused, never
called (:func:`load_release_calls`); a stale build keeps the function's name and arguments.

**Finding KEKs.** A key lookup (``keys._search``) finds a key's objects and reads nine attributes
of each. Through python-pkcs11 every object found left its manufactured class behind (cyclic
garbage, freed only by a collection: six objects per lookup of a KEK and its enabler) and cost
thirteen ``C_GetAttributeValue`` calls; here (:meth:`DirectSession.find_objects`, bounded batches
of plain handles, and :meth:`DirectSession.read_attributes`, one call for a fixed
:class:`AttributeQuery`) it leaves nothing and costs one. With 20 other keys in the token a
lookup went from 500-585 µs (570-600 µs of CPU) to 400-440 µs (450-465 µs), and ``list_keys``
from 3.7-4.3 ms to 1.9-2.6 ms; most of what is left is SoftHSM2's own search (~350 µs, ~215
without a CKA_ID to compare: it scans every object).

Only what the data-key path and the lookups need is here: unwrap (``CKM_AES_KEY_WRAP_PAD`` into a
session object), wrap (the same mechanism, or ``CKM_RSA_PKCS_OAEP``), import an RSA public key,
read an integer attribute or a fixed set of them, set attributes, find objects, generate an AES
session key (a new data key, a probe's scratch key), create an object, destroy, and the session's
state (is the user still logged in). Everything else — connecting, logging in, generating KEKs and
their enablers (lifecycle changes) — stays with python-pkcs11. Failures
raise python-pkcs11's own exception classes, mapped from the return code exactly as python-pkcs11
maps them (a test checks the table against the installed python-pkcs11), so
:mod:`strongroom.keybroker._pkcs11_errors` classifies them alike; an unmapped code is a
``PKCS11Error("Unmapped error code 0x..")``, as python-pkcs11 reports it.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import importlib.machinery
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pkcs11.exceptions as p11x
from pkcs11 import MGF, Attribute, Mechanism

from strongroom.keybroker import _pkcs11_errors as errs
from strongroom.oaep import OaepHash

_ULONG = ctypes.c_ulong
_ULONG_BYTES = ctypes.sizeof(_ULONG)
_CKZ_DATA_SPECIFIED = 1
_CKR_OK = 0
# The largest wrapped key asked for: an RSA-8192 OAEP block (releases go up to RSA-4096). One
# fixed buffer class, so that a wrap makes no ctypes class (see _attribute_array).
_MAX_WRAPPED = 1024
_WrapOutput = ctypes.c_char * _MAX_WRAPPED
# Handles asked for per C_FindObjects: one fixed array class (see _attribute_array), and a bound on
# what one call can write whatever the token holds.
_FIND_BATCH = 64
_FoundHandles = _ULONG * _FIND_BATCH
#: ``CK_UNAVAILABLE_INFORMATION``: the length C_GetAttributeValue gives an attribute it could not
#: return (absent, sensitive, or longer than the buffer).
_UNAVAILABLE = _ULONG(-1).value
# The answers of C_GetAttributeValue that still fill in every attribute it could return, each
# other one marked _UNAVAILABLE (PKCS#11 2.40, section 5.7.5): CKR_ATTRIBUTE_SENSITIVE,
# CKR_ATTRIBUTE_TYPE_INVALID and CKR_BUFFER_TOO_SMALL.
_PER_ATTRIBUTE_ANSWERS = frozenset({_CKR_OK, 0x011, 0x012, 0x150})

#: ``CKR_*`` value -> (name, python-pkcs11 exception class), as python-pkcs11 0.10 maps them.
RETURN_CODES: dict[int, tuple[str, type[p11x.PKCS11Error]]] = {
    0x002: ("CKR_HOST_MEMORY", p11x.HostMemory),
    0x003: ("CKR_SLOT_ID_INVALID", p11x.SlotIDInvalid),
    0x005: ("CKR_GENERAL_ERROR", p11x.GeneralError),
    0x006: ("CKR_FUNCTION_FAILED", p11x.FunctionFailed),
    0x007: ("CKR_ARGUMENTS_BAD", p11x.ArgumentsBad),
    0x008: ("CKR_NO_EVENT", p11x.NoEvent),
    0x010: ("CKR_ATTRIBUTE_READ_ONLY", p11x.AttributeReadOnly),
    0x011: ("CKR_ATTRIBUTE_SENSITIVE", p11x.AttributeSensitive),
    0x012: ("CKR_ATTRIBUTE_TYPE_INVALID", p11x.AttributeTypeInvalid),
    0x013: ("CKR_ATTRIBUTE_VALUE_INVALID", p11x.AttributeValueInvalid),
    0x020: ("CKR_DATA_INVALID", p11x.DataInvalid),
    0x021: ("CKR_DATA_LEN_RANGE", p11x.DataLenRange),
    0x030: ("CKR_DEVICE_ERROR", p11x.DeviceError),
    0x031: ("CKR_DEVICE_MEMORY", p11x.DeviceMemory),
    0x032: ("CKR_DEVICE_REMOVED", p11x.DeviceRemoved),
    0x040: ("CKR_ENCRYPTED_DATA_INVALID", p11x.EncryptedDataInvalid),
    0x041: ("CKR_ENCRYPTED_DATA_LEN_RANGE", p11x.EncryptedDataLenRange),
    0x050: ("CKR_FUNCTION_CANCELED", p11x.FunctionCancelled),
    0x054: ("CKR_FUNCTION_NOT_SUPPORTED", p11x.FunctionNotSupported),
    0x060: ("CKR_KEY_HANDLE_INVALID", p11x.KeyHandleInvalid),
    0x062: ("CKR_KEY_SIZE_RANGE", p11x.KeySizeRange),
    0x063: ("CKR_KEY_TYPE_INCONSISTENT", p11x.KeyTypeInconsistent),
    0x064: ("CKR_KEY_NOT_NEEDED", p11x.KeyNotNeeded),
    0x066: ("CKR_KEY_NEEDED", p11x.KeyNeeded),
    0x067: ("CKR_KEY_INDIGESTIBLE", p11x.KeyIndigestible),
    0x069: ("CKR_KEY_NOT_WRAPPABLE", p11x.KeyNotWrappable),
    0x06A: ("CKR_KEY_UNEXTRACTABLE", p11x.KeyUnextractable),
    0x070: ("CKR_MECHANISM_INVALID", p11x.MechanismInvalid),
    0x071: ("CKR_MECHANISM_PARAM_INVALID", p11x.MechanismParamInvalid),
    0x082: ("CKR_OBJECT_HANDLE_INVALID", p11x.ObjectHandleInvalid),
    0x090: ("CKR_OPERATION_ACTIVE", p11x.OperationActive),
    0x091: ("CKR_OPERATION_NOT_INITIALIZED", p11x.OperationNotInitialized),
    0x0A0: ("CKR_PIN_INCORRECT", p11x.PinIncorrect),
    0x0A1: ("CKR_PIN_INVALID", p11x.PinInvalid),
    0x0A2: ("CKR_PIN_LEN_RANGE", p11x.PinLenRange),
    0x0A3: ("CKR_PIN_EXPIRED", p11x.PinExpired),
    0x0A4: ("CKR_PIN_LOCKED", p11x.PinLocked),
    0x0B0: ("CKR_SESSION_CLOSED", p11x.SessionClosed),
    0x0B1: ("CKR_SESSION_COUNT", p11x.SessionCount),
    0x0B3: ("CKR_SESSION_HANDLE_INVALID", p11x.SessionHandleInvalid),
    0x0B5: ("CKR_SESSION_READ_ONLY", p11x.SessionReadOnly),
    0x0B6: ("CKR_SESSION_EXISTS", p11x.SessionExists),
    0x0B7: ("CKR_SESSION_READ_ONLY_EXISTS", p11x.SessionReadOnlyExists),
    0x0B8: ("CKR_SESSION_READ_WRITE_SO_EXISTS", p11x.SessionReadWriteSOExists),
    0x0C0: ("CKR_SIGNATURE_INVALID", p11x.SignatureInvalid),
    0x0C1: ("CKR_SIGNATURE_LEN_RANGE", p11x.SignatureLenRange),
    0x0D0: ("CKR_TEMPLATE_INCOMPLETE", p11x.TemplateIncomplete),
    0x0D1: ("CKR_TEMPLATE_INCONSISTENT", p11x.TemplateInconsistent),
    0x0E0: ("CKR_TOKEN_NOT_PRESENT", p11x.TokenNotPresent),
    0x0E1: ("CKR_TOKEN_NOT_RECOGNIZED", p11x.TokenNotRecognised),
    0x0E2: ("CKR_TOKEN_WRITE_PROTECTED", p11x.TokenWriteProtected),
    0x0F0: ("CKR_UNWRAPPING_KEY_HANDLE_INVALID", p11x.UnwrappingKeyHandleInvalid),
    0x0F1: ("CKR_UNWRAPPING_KEY_SIZE_RANGE", p11x.UnwrappingKeySizeRange),
    0x0F2: ("CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT", p11x.UnwrappingKeyTypeInconsistent),
    0x100: ("CKR_USER_ALREADY_LOGGED_IN", p11x.UserAlreadyLoggedIn),
    0x101: ("CKR_USER_NOT_LOGGED_IN", p11x.UserNotLoggedIn),
    0x102: ("CKR_USER_PIN_NOT_INITIALIZED", p11x.UserPinNotInitialized),
    0x104: ("CKR_USER_ANOTHER_ALREADY_LOGGED_IN", p11x.AnotherUserAlreadyLoggedIn),
    0x105: ("CKR_USER_TOO_MANY_TYPES", p11x.UserTooManyTypes),
    0x110: ("CKR_WRAPPED_KEY_INVALID", p11x.WrappedKeyInvalid),
    0x112: ("CKR_WRAPPED_KEY_LEN_RANGE", p11x.WrappedKeyLenRange),
    0x113: ("CKR_WRAPPING_KEY_HANDLE_INVALID", p11x.WrappingKeyHandleInvalid),
    0x114: ("CKR_WRAPPING_KEY_SIZE_RANGE", p11x.WrappingKeySizeRange),
    0x115: ("CKR_WRAPPING_KEY_TYPE_INCONSISTENT", p11x.WrappingKeyTypeInconsistent),
    0x120: ("CKR_RANDOM_SEED_NOT_SUPPORTED", p11x.RandomSeedNotSupported),
    0x121: ("CKR_RANDOM_NO_RNG", p11x.RandomNoRNG),
    0x130: ("CKR_DOMAIN_PARAMS_INVALID", p11x.DomainParamsInvalid),
    0x1C0: ("CKR_EXCEEDED_MAX_ITERATIONS", p11x.ExceededMaxIterations),
    0x1C3: ("CKR_PIN_TOO_WEAK", p11x.PinTooWeak),
    0x1C4: ("CKR_PUBLIC_KEY_INVALID", p11x.PublicKeyInvalid),
    0x200: ("CKR_FUNCTION_REJECTED", p11x.FunctionRejected),
}


class _Attribute(ctypes.Structure):
    _fields_ = [("type", _ULONG), ("value", ctypes.c_void_p), ("length", _ULONG)]


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", _ULONG), ("parameter", ctypes.c_void_p), ("length", _ULONG)]


class _OaepParams(ctypes.Structure):
    _fields_ = [
        ("hash", _ULONG),
        ("mgf", _ULONG),
        ("source", _ULONG),
        ("source_data", ctypes.c_void_p),
        ("source_length", _ULONG),
    ]


class _SessionInfo(ctypes.Structure):
    _fields_ = [("slot", _ULONG), ("state", _ULONG), ("flags", _ULONG), ("device_error", _ULONG)]


#: ``CKS_RO_USER_FUNCTIONS`` and ``CKS_RW_USER_FUNCTIONS``: the states of a session whose
#: application has the normal user logged in.
USER_SESSION_STATES = frozenset({1, 3})

# CK_FUNCTION_LIST (PKCS#11 2.40, section 5.16): a CK_VERSION, then the 68 entry points in this
# order. Only those used here get prototypes; the rest are placeholders that keep the offsets.
_ENTRY_POINTS = [
    "Initialize",
    "Finalize",
    "GetInfo",
    "GetFunctionList",
    "GetSlotList",
    "GetSlotInfo",
    "GetTokenInfo",
    "GetMechanismList",
    "GetMechanismInfo",
    "InitToken",
    "InitPIN",
    "SetPIN",
    "OpenSession",
    "CloseSession",
    "CloseAllSessions",
    "GetSessionInfo",
    "GetOperationState",
    "SetOperationState",
    "Login",
    "Logout",
    "CreateObject",
    "CopyObject",
    "DestroyObject",
    "GetObjectSize",
    "GetAttributeValue",
    "SetAttributeValue",
    "FindObjectsInit",
    "FindObjects",
    "FindObjectsFinal",
    "EncryptInit",
    "Encrypt",
    "EncryptUpdate",
    "EncryptFinal",
    "DecryptInit",
    "Decrypt",
    "DecryptUpdate",
    "DecryptFinal",
    "DigestInit",
    "Digest",
    "DigestUpdate",
    "DigestKey",
    "DigestFinal",
    "SignInit",
    "Sign",
    "SignUpdate",
    "SignFinal",
    "SignRecoverInit",
    "SignRecover",
    "VerifyInit",
    "Verify",
    "VerifyUpdate",
    "VerifyFinal",
    "VerifyRecoverInit",
    "VerifyRecover",
    "DigestEncryptUpdate",
    "DecryptDigestUpdate",
    "SignEncryptUpdate",
    "DecryptVerifyUpdate",
    "GenerateKey",
    "GenerateKeyPair",
    "WrapKey",
    "UnwrapKey",
    "DeriveKey",
    "SeedRandom",
    "GenerateRandom",
    "GetFunctionStatus",
    "CancelFunction",
    "WaitForSlotEvent",
]


class _FunctionList(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (f"C_{name}", ctypes.c_void_p) for name in _ENTRY_POINTS
    ]


_P = ctypes.POINTER
# Byte buffers (a wrapped key in, a wrap's output) are c_void_p, never c_char_p: nothing here is a
# NUL-terminated string, and a callback built from a c_char_p prototype (the fault-injection tests
# stand in for the token with one) receives a *copy* cut at the first NUL, so it saw a blob
# shortened and, passing the copy on, had the token read past it or write a wrap into it.
_BUFFER = ctypes.c_void_p
_PROTOTYPES = {
    "C_CreateObject": ctypes.CFUNCTYPE(_ULONG, _ULONG, _P(_Attribute), _ULONG, _P(_ULONG)),
    "C_DestroyObject": ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG),
    "C_GetSessionInfo": ctypes.CFUNCTYPE(_ULONG, _ULONG, _P(_SessionInfo)),
    "C_GetAttributeValue": ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, _P(_Attribute), _ULONG),
    "C_SetAttributeValue": ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, _P(_Attribute), _ULONG),
    "C_FindObjectsInit": ctypes.CFUNCTYPE(_ULONG, _ULONG, _P(_Attribute), _ULONG),
    "C_FindObjects": ctypes.CFUNCTYPE(_ULONG, _ULONG, _P(_ULONG), _ULONG, _P(_ULONG)),
    "C_FindObjectsFinal": ctypes.CFUNCTYPE(_ULONG, _ULONG),
    "C_GenerateKey": ctypes.CFUNCTYPE(
        _ULONG, _ULONG, _P(_Mechanism), _P(_Attribute), _ULONG, _P(_ULONG)
    ),
    "C_WrapKey": ctypes.CFUNCTYPE(
        _ULONG, _ULONG, _P(_Mechanism), _ULONG, _ULONG, _BUFFER, _P(_ULONG)
    ),
    "C_UnwrapKey": ctypes.CFUNCTYPE(
        _ULONG,
        _ULONG,
        _P(_Mechanism),
        _ULONG,
        _BUFFER,
        _ULONG,
        _P(_Attribute),
        _ULONG,
        _P(_ULONG),
    ),
}


class _EntryPoints(ctypes.Structure):
    """``sr_entry_points`` in ``_p11release.c``: the five entry points ``sr_rewrap_read`` calls."""

    _fields_ = [
        ("unwrap_key", ctypes.c_void_p),
        ("get_attribute_value", ctypes.c_void_p),
        ("create_object", ctypes.c_void_p),
        ("wrap_key", ctypes.c_void_p),
        ("destroy_object", ctypes.c_void_p),
    ]


# ``*step`` values of sr_rewrap_read: which call failed (or SR_WRONG_LENGTH, which is not a failure).
_STEP_DONE = 0
_STEP_UNWRAP = 1
_STEP_WRONG_LENGTH = 2
_STEP_IMPORT = 3
_STEP_WRAP = 4
_STEP_DESTROY_PUBLIC = 5
_STEP_DESTROY_KEY = 6
_STEP_READ_LENGTH = 7  # reading the new key's CKA_VALUE_LEN failed (not "cannot tell")
_STEP_READ_STATE = 8  # the AttributeRead after the wrap failed (the answer is not returned)
_STEP_CHECK_STATE = 9  # the AttributeRead before the unwrap failed (nothing was unwrapped)
_STEP_STATE_CHANGED = 10  # it read another value than the enabled one (nothing was unwrapped)
#: What a token that cannot tell an object's CKA_VALUE_LEN answers: it is not held to a length.
LENGTH_UNREPORTED: tuple[type[p11x.PKCS11Error], ...] = (
    p11x.AttributeTypeInvalid,
    p11x.AttributeSensitive,
)


class UnwrapFailed(Exception):
    """:meth:`DirectSession.rewrap_oaep`'s unwrap was refused; ``error`` is the python-pkcs11
    exception its return code maps to (the steps after it raise theirs directly)."""

    def __init__(self, error: p11x.PKCS11Error) -> None:
        super().__init__(error)
        self.error = error


class TargetRefused(Exception):
    """:meth:`DirectSession.rewrap_oaep` unwrapped the key but the token would not import the
    caller's public key or wrap to it; ``error`` is the python-pkcs11 exception. The unwrapping key
    worked, so this says nothing about it: it is the caller's key the token refused."""

    def __init__(self, error: p11x.PKCS11Error) -> None:
        super().__init__(error)
        self.error = error


class StateReadFailed(Exception):
    """:meth:`DirectSession.rewrap_oaep`'s :class:`AttributeRead` failed: after the wrap (both
    objects destroyed, the wrapped key not returned), or before the unwrap when the call checks
    the state first (nothing unwrapped). ``error`` is the python-pkcs11 exception, as
    :meth:`DirectSession.read` would raise it."""

    def __init__(self, error: p11x.PKCS11Error) -> None:
        super().__init__(error)
        self.error = error


class StateChanged(Exception):
    """:meth:`DirectSession.rewrap_oaep`'s first :class:`AttributeRead` read another value than
    the enabled one it was given: nothing was unwrapped, and the read's value is the state's for
    the caller to judge."""


class CleanupFailed(Exception):
    """:meth:`DirectSession.rewrap_oaep` could not destroy the unwrapped data key or the imported
    public key: it may still exist in the session, so the session must not be used again (closing
    it destroys its objects). ``error`` is the python-pkcs11 exception of the failed destroy."""

    def __init__(self, error: p11x.PKCS11Error) -> None:
        super().__init__(error)
        self.error = error


#: The ``sr_p11release_version()`` this module was written for (``SR_P11RELEASE_VERSION`` in
#: ``_p11release.c``): bumped with it whenever the library's behaviour changes.
RELEASE_CALLS_VERSION = 2
# How to rebuild the library, for the messages that refuse one.
_REBUILD = (
    "rebuild it (`make setup` in a source checkout; otherwise reinstall the package or rebuild "
    "the image)"
)


@functools.lru_cache(maxsize=1)
def _release_calls() -> Any:
    """``sr_rewrap_read`` from the C library built beside this module (see the module doc)."""
    return load_release_calls(Path(__file__).parent)


def load_release_calls(folder: Path) -> Any:
    """``sr_rewrap_read`` from the ``_p11release`` library in ``folder``, with its prototype.

    Raises ``ImportError`` when there is none, or when its ``sr_p11release_version()`` is not
    :data:`RELEASE_CALLS_VERSION` (a stale build: the same function, another behaviour), naming
    the file, both versions and how to rebuild it. Nothing falls back to another path.
    """
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"_p11release{suffix}"
        if candidate.is_file():
            library = ctypes.CDLL(str(candidate))
            break
    else:
        raise ImportError(
            f"the key broker's release calls (_p11release, built from _p11release.c) are missing "
            f"in {folder}: install the package with a C compiler present (`make setup`)"
        )
    # Asked before anything else is looked up: the same function names and arguments may do
    # something else in a stale build (and a build from before sr_rewrap_read, whose sr_rewrap
    # took two arguments fewer, has no version at all: called with today's arguments it would
    # take the state read's handle for its step pointer, and write through it).
    version = getattr(library, "sr_p11release_version", None)
    found: int | None = None
    if version is not None:
        version.restype = ctypes.c_int
        version.argtypes = []
        found = version()
    if found != RELEASE_CALLS_VERSION:
        what = (
            "have no version (built from an older _p11release.c, before sr_p11release_version)"
            if found is None
            else f"are version {found}"
        )
        raise ImportError(
            f"the key broker's release calls in {candidate} {what}; this broker expects "
            f"version {RELEASE_CALLS_VERSION}: {_REBUILD} and start the broker again"
        )
    function = library.sr_rewrap_read
    function.restype = _ULONG
    function.argtypes = [
        _P(_EntryPoints),
        _ULONG,  # session
        _P(_Mechanism),  # unwrap mechanism
        _ULONG,  # unwrapping key
        _BUFFER,  # wrapped
        _ULONG,
        _P(_Attribute),  # the unwrapped key's template
        _ULONG,
        _ULONG,  # the unwrapped key's length, when the token reports it
        _P(_Attribute),  # the public key's template
        _ULONG,
        _P(_Mechanism),  # wrap mechanism
        _BUFFER,  # out
        _P(_ULONG),
        _ULONG,  # the object whose attribute is read last (AttributeRead)
        _P(_Attribute),  # that read, or NULL for none
        _BUFFER,  # its value while enabled, to read first; NULL: no read before
        _ULONG,
        _P(ctypes.c_int),  # step
    ]
    return function


def error_for(rv: int) -> p11x.PKCS11Error:
    """The python-pkcs11 exception for return code ``rv`` (not raised)."""
    known = RETURN_CODES.get(rv)
    if known is None:
        return p11x.PKCS11Error(f"Unmapped error code {hex(rv)}")
    return known[1]()


def _check(rv: int) -> None:
    if rv != _CKR_OK:
        raise error_for(rv)


@functools.lru_cache(maxsize=8)
def _attribute_array(count: int) -> Any:
    # ctypes makes a new class for every ``_Attribute * n`` expression, and a class is cyclic
    # garbage once dropped: one per template size, made once (the sizes are this code's own).
    return _Attribute * count


@functools.lru_cache(maxsize=4)
def _byte_array(size: int) -> Any:
    # One class per size, made once (see _attribute_array); the sizes are this code's own.
    return ctypes.c_char * size


def _bytes_value(value: bytes) -> tuple[Any, int | None, int]:
    held = ctypes.c_char_p(value)  # keeps ``value`` alive; C reads it in place
    return held, ctypes.cast(held, ctypes.c_void_p).value, len(value)


class Template:
    """A CK_ATTRIBUTE array, with the values its pointers refer to kept alive as long as it is.

    Byte values are passed by pointer into the (immutable) ``bytes`` objects themselves: no copy,
    and no per-length ctypes class (see :func:`_attribute_array`). A template built once can be
    reused with new byte values (:meth:`with_bytes`), which costs a copy of the array, not a
    rebuild.
    """

    __slots__ = ("_positions", "_values", "array", "count")

    def __init__(self, items: Iterable[tuple[Attribute, bool | int | bytes]]) -> None:
        pairs = list(items)
        self._values: list[Any] = []
        self._positions = {int(attribute): i for i, (attribute, _) in enumerate(pairs)}
        self.array = _attribute_array(len(pairs))()
        for i, (attribute, value) in enumerate(pairs):
            address: int | None
            if isinstance(value, bool):
                held: Any = ctypes.c_ubyte(1 if value else 0)  # CK_BBOOL
                address, length = ctypes.addressof(held), 1
            elif isinstance(value, int):
                held = _ULONG(value)
                address, length = ctypes.addressof(held), _ULONG_BYTES
            else:
                held, address, length = _bytes_value(value)
            self._values.append(held)
            self.array[i] = _Attribute(int(attribute), address, length)
        self.count = _ULONG(len(pairs))

    def with_bytes(self, values: dict[Attribute, bytes]) -> Template:
        """A copy of this template whose ``values`` attributes (each already in it) hold new
        bytes; this template is left as it is."""
        copy = Template.__new__(Template)
        copy._positions = self._positions
        copy._values = [self]  # the copy points at this template's other values
        copy.array = type(self.array).from_buffer_copy(self.array)
        copy.count = self.count
        for attribute, value in values.items():
            held, address, length = _bytes_value(value)
            copy._values.append(held)
            copy.array[self._positions[int(attribute)]] = _Attribute(
                int(attribute), address, length
            )
        return copy


class AttributeRead:
    """One byte-string attribute of object ``handle`` (at most ``size`` bytes), read into a buffer
    of its own by :meth:`DirectSession.read`, or as the last call of
    :meth:`DirectSession.rewrap_oaep`. Made per read: a read overwrites its state."""

    __slots__ = ("_buffer", "_query", "_size", "handle")

    def __init__(self, handle: int, attribute: Attribute, size: int) -> None:
        self.handle = handle
        self._size = size
        self._buffer = _byte_array(size)()
        self._query = _Attribute(int(attribute), ctypes.addressof(self._buffer), size)

    def _ready(self) -> Any:
        """The CK_ATTRIBUTE to hand the token, its length reset (a read overwrites it)."""
        self._query.length = self._size
        return ctypes.byref(self._query)

    def value(self) -> bytes:
        """The bytes the last read returned; only meaningful once a read succeeded."""
        return ctypes.string_at(self._buffer, min(self._query.length, self._size))


#: What an :class:`AttributeQuery` attribute holds: a ``CK_BBOOL``, a ``CK_ULONG``, or a byte string
#: of at most that many bytes.
AttributeKind = Literal["bool", "ulong"] | int


class AttributeQuery:
    """A fixed set of attributes read from an object in one ``C_GetAttributeValue``
    (:meth:`DirectSession.read_attributes`).

    Built once (the broker's at import): the two ctypes classes a read needs (a structure with one field per
    value, and the attribute array pointing into it) are made here, never per read (a ctypes
    class is cyclic garbage once dropped, see :func:`_attribute_array`). ``spec`` pairs each
    attribute with its :data:`AttributeKind`; a byte string longer than its maximum reads as
    absent (the token answers ``CKR_BUFFER_TOO_SMALL`` for it and still returns the others).
    """

    __slots__ = ("_array", "_entries", "_values")

    def __init__(self, spec: Sequence[tuple[Attribute, AttributeKind]]) -> None:
        fields: list[tuple[str, Any]] = []
        for i, (attribute, kind) in enumerate(spec):
            if kind == "bool":
                fields.append((f"v{i}", ctypes.c_ubyte))
            elif kind == "ulong":
                fields.append((f"v{i}", _ULONG))
            elif isinstance(kind, int) and not isinstance(kind, bool) and kind > 0:
                fields.append((f"v{i}", ctypes.c_char * kind))
            else:
                raise ValueError(f"{attribute!r}: {kind!r} is not an attribute kind")
        self._values: Any = type("_Values", (ctypes.Structure,), {"_fields_": fields})
        self._array: Any = _Attribute * len(spec)
        #: (attribute, kind, field name, offset in the structure, buffer size) per attribute
        self._entries = tuple(
            (
                attribute,
                kind,
                name,
                getattr(self._values, name).offset,
                getattr(self._values, name).size,
            )
            for (attribute, kind), (name, _) in zip(spec, fields, strict=True)
        )


def _mechanism(mechanism: Mechanism, parameter: ctypes.Structure | None = None) -> _Mechanism:
    if parameter is None:
        return _Mechanism(int(mechanism), None, 0)
    return _Mechanism(int(mechanism), ctypes.addressof(parameter), ctypes.sizeof(parameter))


_AES_KWP = _mechanism(Mechanism.AES_KEY_WRAP_PAD)
_AES_KEY_GEN = _mechanism(Mechanism.AES_KEY_GEN)
#: The OAEP hash and MGF1 hash python-pkcs11 names for each choice (the same hash for both).
OAEP_HASHES: dict[OaepHash, tuple[Mechanism, MGF]] = {
    OaepHash.SHA1: (Mechanism.SHA_1, MGF.SHA1),
    OaepHash.SHA256: (Mechanism.SHA256, MGF.SHA256),
    OaepHash.SHA384: (Mechanism.SHA384, MGF.SHA384),
    OaepHash.SHA512: (Mechanism.SHA512, MGF.SHA512),
}
# The parameters live as long as the mechanisms that point at them (module lifetime).
_OAEP_PARAMS = {
    choice: _OaepParams(int(digest), int(mgf), _CKZ_DATA_SPECIFIED, None, 0)
    for choice, (digest, mgf) in OAEP_HASHES.items()
}
_OAEP = {
    choice: _mechanism(Mechanism.RSA_PKCS_OAEP, params) for choice, params in _OAEP_PARAMS.items()
}


class DirectModule:
    """The entry points of a loaded PKCS#11 module, for :class:`DirectSession`."""

    def __init__(self, path: str) -> None:
        # The same path python-pkcs11 loaded: the dynamic loader hands back the same instance,
        # so the sessions and handles python-pkcs11 made are valid here.
        library = ctypes.CDLL(path)
        get_list = library.C_GetFunctionList
        get_list.argtypes = [_P(_P(_FunctionList))]
        get_list.restype = _ULONG
        functions = _P(_FunctionList)()
        _check(get_list(ctypes.byref(functions)))
        table = functions.contents
        self._library = library  # keeps the module loaded as long as the table is used
        self.create_object = _PROTOTYPES["C_CreateObject"](table.C_CreateObject)
        self.destroy_object = _PROTOTYPES["C_DestroyObject"](table.C_DestroyObject)
        self.get_attribute_value = _PROTOTYPES["C_GetAttributeValue"](table.C_GetAttributeValue)
        self.set_attribute_value = _PROTOTYPES["C_SetAttributeValue"](table.C_SetAttributeValue)
        self.find_objects_init = _PROTOTYPES["C_FindObjectsInit"](table.C_FindObjectsInit)
        self.find_objects = _PROTOTYPES["C_FindObjects"](table.C_FindObjects)
        self.find_objects_final = _PROTOTYPES["C_FindObjectsFinal"](table.C_FindObjectsFinal)
        self.generate_key = _PROTOTYPES["C_GenerateKey"](table.C_GenerateKey)
        self.get_session_info = _PROTOTYPES["C_GetSessionInfo"](table.C_GetSessionInfo)
        self.wrap_key = _PROTOTYPES["C_WrapKey"](table.C_WrapKey)
        self.unwrap_key = _PROTOTYPES["C_UnwrapKey"](table.C_UnwrapKey)
        self.rewrap = _release_calls()
        self.entry_points = _EntryPoints(
            table.C_UnwrapKey,
            table.C_GetAttributeValue,
            table.C_CreateObject,
            table.C_WrapKey,
            table.C_DestroyObject,
        )

    def close(self) -> None:
        """Drops this loader reference to the module (python-pkcs11 holds its own until it
        unloads). Sessions made from this object must not be used afterwards."""
        _ctypes.dlclose(self._library._handle)

    def session(self, handle: int) -> DirectSession:
        """Direct calls on the open session ``handle``."""
        return DirectSession(self, handle)


class DirectSession:
    """Direct calls on one open session; object handles in and out are plain integers.

    Like the python-pkcs11 session it shares, it is used by one thread at a time.
    """

    __slots__ = ("_handle", "_module")

    def __init__(self, module: DirectModule, handle: int) -> None:
        self._module = module
        self._handle = _ULONG(handle)

    def unwrap_aes_kwp(self, unwrapping_key: int, wrapped: bytes, template: Template) -> int:
        """``C_UnwrapKey`` with ``CKM_AES_KEY_WRAP_PAD``; the new object's handle."""
        key = _ULONG()
        _check(
            self._module.unwrap_key(
                self._handle,
                ctypes.byref(_AES_KWP),
                unwrapping_key,
                wrapped,
                len(wrapped),
                template.array,
                template.count,
                ctypes.byref(key),
            )
        )
        return key.value

    def rewrap_oaep(
        self,
        unwrapping_key: int,
        wrapped: bytes,
        *,
        key_template: Template,
        key_length: int,
        public_template: Template,
        choice: OaepHash,
        size: int,
        state: AttributeRead | None,
        enabled: bytes | None = None,
    ) -> bytes | None:
        """A release's eight calls in one (see the module doc): with ``state`` and ``enabled``,
        ``state`` read first as :meth:`read` reads it, and the call stopped, nothing unwrapped,
        unless it holds exactly ``enabled``; :meth:`unwrap_aes_kwp` of
        ``wrapped`` under ``unwrapping_key``; the new key's ``CKA_VALUE_LEN`` checked against
        ``key_length`` (a token that does not report it, reading 0 or answering one of
        :data:`LENGTH_UNREPORTED`, is not held to it; any other failure to read it is raised); the caller's public key
        created from ``public_template``; the key wrapped to it as :meth:`wrap_oaep` does into at
        most ``size`` bytes; both objects destroyed, also on failure; then, once all that
        succeeded, ``state`` read as :meth:`read` reads it (``None``: no read), for the caller to
        judge before it uses the answer.

        Returns the wrapped key, or None when the unwrapped key had another length (the blob is
        not this key's). Raises :class:`StateChanged` when the first read found another value
        than ``enabled``, :class:`UnwrapFailed` when the unwrap is refused,
        :class:`TargetRefused` when importing the public key or wrapping to it is (unless the
        session or device is gone), :class:`CleanupFailed` when either object could not be
        destroyed, :class:`StateReadFailed` when ``state`` could not be read (either time), and the
        python-pkcs11 exception of the failing call otherwise; ``ValueError`` for ``enabled``
        without ``state``.
        """
        if size > _MAX_WRAPPED:
            raise ValueError(f"a wrapped key of {size} bytes is more than this path handles")
        if enabled is not None and state is None:
            # The C call reads first only with both: it would skip the check, and unwrap.
            raise ValueError("an enabled value without a state read to compare it with")
        module = self._module
        out = _WrapOutput()
        length = _ULONG(size)
        step = ctypes.c_int(-1)
        rv = module.rewrap(
            ctypes.byref(module.entry_points),
            self._handle,
            ctypes.byref(_AES_KWP),
            unwrapping_key,
            wrapped,
            len(wrapped),
            key_template.array,
            key_template.count,
            key_length,
            public_template.array,
            public_template.count,
            ctypes.byref(_OAEP[choice]),
            out,
            ctypes.byref(length),
            0 if state is None else state.handle,
            None if state is None else state._ready(),
            enabled,
            0 if enabled is None else len(enabled),
            ctypes.byref(step),
        )
        if rv != _CKR_OK:
            error = error_for(rv)
            if step.value == _STEP_UNWRAP:
                raise UnwrapFailed(error)
            if step.value in (_STEP_CHECK_STATE, _STEP_READ_STATE):
                raise StateReadFailed(error)
            if step.value in (_STEP_IMPORT, _STEP_WRAP) and not errs.is_device_failure(error):
                raise TargetRefused(error)
            if step.value in (_STEP_DESTROY_PUBLIC, _STEP_DESTROY_KEY):
                raise CleanupFailed(error)
            raise error
        if step.value == _STEP_WRONG_LENGTH:
            return None
        if step.value == _STEP_STATE_CHANGED:
            raise StateChanged()
        if step.value != _STEP_DONE:
            raise AssertionError(f"sr_rewrap_read returned 0 at step {step.value}")
        return out.raw[: length.value]

    def wrap_aes_kwp(self, wrapping_key: int, key: int, size: int) -> bytes:
        """``C_WrapKey`` with ``CKM_AES_KEY_WRAP_PAD`` into at most ``size`` bytes."""
        return self._wrap(_AES_KWP, wrapping_key, key, size)

    def wrap_oaep(self, wrapping_key: int, key: int, choice: OaepHash, size: int) -> bytes:
        """``C_WrapKey`` with ``CKM_RSA_PKCS_OAEP`` (``choice`` as hash and MGF1 hash, no label)
        into at most ``size`` bytes (the modulus length)."""
        return self._wrap(_OAEP[choice], wrapping_key, key, size)

    def _wrap(self, mechanism: _Mechanism, wrapping_key: int, key: int, size: int) -> bytes:
        if size > _MAX_WRAPPED:
            raise ValueError(f"a wrapped key of {size} bytes is more than this path handles")
        out = _WrapOutput()
        length = _ULONG(size)
        _check(
            self._module.wrap_key(
                self._handle, ctypes.byref(mechanism), wrapping_key, key, out, ctypes.byref(length)
            )
        )
        return out.raw[: length.value]

    def generate_aes_key(self, template: Template) -> int:
        """``C_GenerateKey`` with ``CKM_AES_KEY_GEN`` and ``template``; the new key's handle."""
        key = _ULONG()
        _check(
            self._module.generate_key(
                self._handle,
                ctypes.byref(_AES_KEY_GEN),
                template.array,
                template.count,
                ctypes.byref(key),
            )
        )
        return key.value

    def create_object(self, template: Template) -> int:
        """``C_CreateObject`` with ``template``; the new object's handle."""
        handle = _ULONG()
        _check(
            self._module.create_object(
                self._handle, template.array, template.count, ctypes.byref(handle)
            )
        )
        return handle.value

    def ulong_attribute(self, handle: int, attribute: Attribute) -> int:
        """An integer attribute (``CK_ULONG``) of object ``handle``."""
        value = _ULONG()
        query = _Attribute(int(attribute), ctypes.addressof(value), _ULONG_BYTES)
        _check(self._module.get_attribute_value(self._handle, handle, ctypes.byref(query), 1))
        return value.value

    def read_into(self, handle: int, attribute: Attribute, out: bytearray) -> int:
        """Reads a byte-string attribute of object ``handle`` straight into ``out`` (the token
        writes into its buffer: no other copy is made in this process) and returns its length,
        which is at most ``len(out)`` (``CKR_BUFFER_TOO_SMALL`` otherwise)."""
        buffer = _byte_array(len(out)).from_buffer(out)
        try:
            query = _Attribute(int(attribute), ctypes.addressof(buffer), len(out))
            _check(self._module.get_attribute_value(self._handle, handle, ctypes.byref(query), 1))
            return int(query.length)
        finally:
            del buffer  # releases ``out``'s buffer export

    def read(self, state: AttributeRead) -> None:
        """``C_GetAttributeValue`` of ``state``'s one attribute into its buffer."""
        _check(self._module.get_attribute_value(self._handle, state.handle, state._ready(), 1))

    def read_attributes(
        self, handle: int, query: AttributeQuery
    ) -> dict[Attribute, bool | int | bytes]:
        """``query``'s attributes of object ``handle``, in one ``C_GetAttributeValue``: each
        attribute the token returned, as ``bool``, ``int`` or ``bytes`` (its kind); one it did not
        (absent, sensitive, or longer than its buffer) is left out, as python-pkcs11's
        ``get_attributes`` leaves it out. Any other failure of the call is raised."""
        values = query._values()
        base = ctypes.addressof(values)
        array = query._array()
        for i, (attribute, _, _, offset, size) in enumerate(query._entries):
            entry = array[i]
            entry.type, entry.value, entry.length = int(attribute), base + offset, size
        rv = self._module.get_attribute_value(self._handle, handle, array, len(query._entries))
        if rv not in _PER_ATTRIBUTE_ANSWERS:
            raise error_for(rv)
        found: dict[Attribute, bool | int | bytes] = {}
        for i, (attribute, kind, name, offset, size) in enumerate(query._entries):
            length = array[i].length
            if length == _UNAVAILABLE or length > size:
                continue
            if kind == "bool":
                if length == 1:  # a token that answers otherwise has not given a CK_BBOOL
                    found[attribute] = getattr(values, name) != 0
            elif kind == "ulong":
                if length == _ULONG_BYTES:
                    found[attribute] = int(getattr(values, name))
            else:
                # Not the field itself: ctypes cuts a char array's value at its first NUL.
                found[attribute] = ctypes.string_at(base + offset, length)
        return found

    def set_attributes(self, handle: int, template: Template) -> None:
        """``C_SetAttributeValue`` of ``template`` on object ``handle``."""
        _check(
            self._module.set_attribute_value(self._handle, handle, template.array, template.count)
        )

    def find_objects(self, template: Template) -> list[int]:
        """The handles of every object matching ``template``: ``C_FindObjectsInit``, then
        ``C_FindObjects`` for at most :data:`_FIND_BATCH` handles at a time until it finds no
        more, then ``C_FindObjectsFinal`` — also when a call in between fails (a search left
        open would make the session refuse the next one, ``CKR_OPERATION_ACTIVE``)."""
        module = self._module
        _check(module.find_objects_init(self._handle, template.array, template.count))
        found: list[int] = []
        try:
            batch = _FoundHandles()
            count = _ULONG()
            while True:
                _check(module.find_objects(self._handle, batch, _FIND_BATCH, ctypes.byref(count)))
                if count.value == 0:
                    break
                found.extend(batch[: min(count.value, _FIND_BATCH)])
        except BaseException:
            module.find_objects_final(self._handle)  # the search's own failure is the one raised
            raise
        _check(module.find_objects_final(self._handle))
        return found

    def state(self) -> int:
        """The session's ``CKS_*`` state (``C_GetSessionInfo``); see :data:`USER_SESSION_STATES`."""
        info = _SessionInfo()
        _check(self._module.get_session_info(self._handle, ctypes.byref(info)))
        return int(info.state)

    def destroy(self, handle: int) -> None:
        """``C_DestroyObject``."""
        _check(self._module.destroy_object(self._handle, handle))
