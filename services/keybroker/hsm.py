"""The PKCS#11 HSM backend: a login session, recycled work sessions, one worker thread, deadlines
and recovery.

**Concurrency.** python-pkcs11 0.10 calls ``C_Initialize(NULL)``, which by the PKCS#11 spec tells
the module that the application will *not* call it from several threads at once; SoftHSM2 then
uses no internal locks, and two threads on two sessions fail with ``CKR_GENERAL_ERROR`` within
milliseconds (measured here). So every PKCS#11 call runs on one worker thread that owns the module,
the token and one logged-in R/W session. Measured on this machine, the same unwrap + OAEP re-wrap
done from 16 threads reaches ~2,100 ops/s either way: serialised on one session, or on 2-16 sessions
after re-initialising the module with ``CKF_OS_LOCKING_OK`` — SoftHSM2's own locks serialise the
work anyway — so a session pool buys nothing here and the worker keeps the spec's contract.

**Sessions and memory.** The user logs in on a *login session* that only holds the login (PKCS#11
login state belongs to the application, so every other session of the token shares it) and runs no
operation. Operations run on *work sessions* opened without a PIN, handed out and taken back by
:class:`_WorkSessions` (at most one today, because one worker runs every call; a pool of several
fits behind the same two calls, and closing one never logs the others out). Operations destroy
every object they create. That is not enough with SoftHSM2 2.6.1: its session object store keeps
every object ever created — destroyed, or on a closed session — until ``C_Finalize`` (so stale
pointers stay valid), ~0.4 KB per key release, measured; closing and reopening sessions frees
nothing, re-initialising the module frees it all. So after ``recycle_after_operations`` operations
(0: never) the connection is *recycled*: closed, and re-established (``C_Finalize`` + ``C_Initialize``, log
in, probe) by the next operation, which waits for it (a few milliseconds). Only operations that can
create objects count: health checks do not, so the readiness probe (two a second in the broker)
neither recycles an idle broker nor shifts where recycles fall in a run of releases. Object handles
from an earlier session are void: :attr:`HsmSession.serial` tells them apart.

**Deadlines.** :meth:`Hsm.call` queues an operation and waits at most ``timeout`` seconds for it
(:meth:`Hsm.submit` queues it and returns; the caller waits later, until the same deadline);
a caller whose deadline passes gets ``HsmUnavailable(HSM_TIMEOUT)`` even if the module hangs inside
a C call (the job is cancelled if it has not started, and skipped if its deadline passed while it
was queued).

**Failure and recovery.** Any device-class error (``CKR_DEVICE_REMOVED``, ``CKR_TOKEN_NOT_PRESENT``,
``CKR_SESSION_HANDLE_INVALID``, a ``CKR_GENERAL_ERROR`` while the token no longer answers, ...)
raises ``HsmUnavailable`` and drops the session. The next operation reconnects: ``C_Finalize`` +
``C_Initialize`` (SoftHSM2 needs both to see a token whose files came back), find the token by
label, log in, re-probe the OAEP hashes. Attempts are spaced by ``reconnect_interval``, doubled
after each failed attempt up to ``reconnect_max_interval``, so a dead HSM costs callers a fast
failure, not a reconnect each. A session dropped again before any operation succeeded on its
re-established connection counts as a failed attempt (an HSM that connects but fails its operations
re-initialised the module at every call); the back-off ends when an operation succeeds, not when a
connection does, nor, after an operation's drop, when a health check does (a token answers it while
it fails every operation); a run that only health checks met (failed connections, sessions the HSM
lost while an idle broker ran only checks) ends at a check that passes. Drops and failed attempts
are logged once per failure, then counted (:class:`OutageLines`). A ``CKR_GENERAL_ERROR`` or
``CKR_FUNCTION_FAILED`` from a token that still answers (a corrupted object file, a token hiccup)
also drops the connection — SoftHSM2 re-reads its object files only when re-initialised — and is
reported as ``HsmUnavailable(HSM_OPERATION_FAILED)``, never as INTERNAL;
:class:`~strongroom.keybroker.keys.KeyManager` decides whether a key that keeps failing on fresh
connections is unusable (``DataLoss``). A refused PIN is never retried automatically (that would
burn the token's PIN counter): reopen the :class:`Hsm` with a corrected configuration.

What SoftHSM2 2.6.1 does when its token directory is moved away (measured; the tests rely on it):
an open session still answers ``C_FindObjects`` but finds only session objects (token objects
silently vanish), handles of token keys fail with ``CKR_*_HANDLE_INVALID``, ``C_GetSlotList`` and
``C_OpenSession`` fail with ``CKR_GENERAL_ERROR``. When the directory returns, the running library
does not notice until it is re-initialised. ``chmod 000`` cannot simulate this when running as root.
Because of the first point, a key lookup that finds nothing checks that the token still answers
and that the session is still logged in (:meth:`HsmSession.require_token`; a session that lost its
login finds no private object either) before it reports ``NotFound``.

One :class:`Hsm` owns its module for the whole process (re-initialising it would break any other
user), so opening a second one on the same module file raises ``FailedPrecondition(HSM_ALREADY_OPEN)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.attributes import AttributeMapper

from strongroom.closing import Closing
from strongroom.errors import FailedPrecondition, Internal, InvalidArgument, StrongroomError
from strongroom.keybroker import _hsm_hints as _hints
from strongroom.keybroker import _pkcs11_errors as errs
from strongroom.keybroker.errors import OPERATORS_LOG, HsmUnavailable
from strongroom.keybroker.outage_lines import OutageLines
from strongroom.keybroker.p11direct import (
    OAEP_HASHES,
    USER_SESSION_STATES,
    DirectModule,
    DirectSession,
)
from strongroom.oaep import PROBE_ORDER, OaepHash
from strongroom.reasons import Reason
from strongroom.runtime.secrets import Secret

_log = logging.getLogger(__name__)


def _unreachable(more: str = "") -> str:
    """What a remote caller is told of a failed connection to the HSM (its message names the
    PKCS#11 module's path, SoftHSM2's configuration and the token's labels: the operator's)."""
    return f"the key broker cannot connect to its HSM{more}{OPERATORS_LOG}"


def _failing(more: str = "") -> str:
    """What a remote caller is told while reconnects are spaced after sessions dropped under
    operations: the HSM connects, so "cannot connect" would send its operator to another fault."""
    return f"the key broker's HSM connects but fails its operations{more}{OPERATORS_LOG}"


PIN_REFUSED = f"the key broker cannot log in to its HSM: its PIN was refused{OPERATORS_LOG}"
"""What a remote caller is told, at the refusal and at every call after it (nothing is retried
until the broker is restarted with the right PIN): once it was told a failed connection, then
to restart the backend, which is its operator's to do."""

T = TypeVar("T")

_OAEP_PARAMS: dict[OaepHash, tuple[Mechanism, MGF, None]] = {
    choice: (digest, mgf, None) for choice, (digest, mgf) in OAEP_HASHES.items()
}

# A fixed RSA-2048 public key (no private key exists anywhere) used only to ask the token which
# OAEP hashes C_WrapKey accepts; importing it is instant, generating a key pair is not.
_PROBE_MODULUS = bytes.fromhex(
    "a8fdc1b364e588216166ab6482ab95005f9ff00a34871e9b5fb731f49ddc729b"
    "29c049fb839093dcb337235e856bbdc1f9cd0ea634cca5caf7db8c9d05588429"
    "515bfdd161aa1c24c406478c98583b2e3de7ffb06cc5becef9ba1282178a94ee"
    "e56d1a444e4f1cb8d5984e4070dd911fb97d2ca42df386ae7977b1ced2194fd9"
    "02e506101dbf89310d47d73c9917c7dfa4524ca9485ba4ba0ce5bc8e635909da"
    "513470871b646ab83b2a3359d60084c13b0474d499b595b4564869185f3829ca"
    "7704412f83b72c143b468832d8d523a9d0f0d440a313788b12d2fe4cc8043558"
    "f09307eb189f076f827590dd2f3cecbae66d15094786976e16e0bbaf874f22e7"
)
_OAEP_REFUSALS: tuple[type[p11x.PKCS11Error], ...] = (
    p11x.ArgumentsBad,
    p11x.MechanismInvalid,
    p11x.MechanismParamInvalid,
    p11x.FunctionNotSupported,
    p11x.KeySizeRange,
)

_ENV_LOCK = threading.Lock()
_OPEN_LOCK = threading.Lock()
_OPEN_MODULES: set[str] = set()


def oaep_mechanism_param(choice: OaepHash) -> tuple[Mechanism, MGF, None]:
    """The python-pkcs11 ``CKM_RSA_PKCS_OAEP`` parameter for ``choice`` (empty OAEP label)."""
    return _OAEP_PARAMS[choice]


def _attribute_mapper() -> AttributeMapper:
    """python-pkcs11's mapper plus CKA_ALLOWED_MECHANISMS (an array of CK_ULONG)."""
    mapper = AttributeMapper()
    width = ctypes.sizeof(ctypes.c_ulong)

    def pack(value: Any) -> bytes:
        return b"".join(int(m).to_bytes(width, sys.byteorder) for m in value)

    def unpack(raw: bytes) -> list[int]:
        return [
            int.from_bytes(raw[i : i + width], sys.byteorder) for i in range(0, len(raw), width)
        ]

    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, pack, unpack)
    return mapper


@dataclass(frozen=True)
class HsmConfig:
    """How to reach the token. Build it from the service configuration; the PIN is a :class:`Secret`.

    ``module_env`` is applied to ``os.environ`` only around ``C_Initialize`` (SoftHSM2 reads
    ``SOFTHSM2_CONF`` there); leave it empty for modules configured otherwise.
    ``allowed_oaep_hashes`` limits what the broker may ever use, whatever the token supports.
    """

    module_path: Path
    token_label: str
    pin: Secret
    module_env: Mapping[str, str] = field(default_factory=dict)
    operation_timeout: float = 5.0
    connect_timeout: float = 15.0
    reconnect_interval: float = 0.5
    reconnect_max_interval: float = 5.0
    recycle_after_operations: int = 2000
    allowed_oaep_hashes: tuple[OaepHash, ...] = PROBE_ORDER

    def __post_init__(self) -> None:
        object.__setattr__(self, "module_path", Path(self.module_path))
        object.__setattr__(self, "module_env", MappingProxyType(dict(self.module_env)))
        if not self.module_path.is_absolute():
            raise InvalidArgument("hsm.module_path must be absolute", reason=Reason.CONFIG_INVALID)
        if not 1 <= len(self.token_label) <= 32:
            raise InvalidArgument(
                "hsm.token_label must be 1-32 characters", reason=Reason.CONFIG_INVALID
            )
        if not isinstance(self.pin, Secret):
            raise InvalidArgument("hsm.pin must be a Secret", reason=Reason.CONFIG_INVALID)
        for name in (
            "operation_timeout",
            "connect_timeout",
            "reconnect_interval",
            "reconnect_max_interval",
        ):
            if not 0 < getattr(self, name) <= 3600:
                raise InvalidArgument(
                    f"hsm.{name} must be in (0, 3600]", reason=Reason.CONFIG_INVALID
                )
        if self.reconnect_max_interval < self.reconnect_interval:
            raise InvalidArgument(
                "hsm.reconnect_max_interval must be at least hsm.reconnect_interval",
                reason=Reason.CONFIG_INVALID,
            )
        operations = self.recycle_after_operations
        if isinstance(operations, bool) or not isinstance(operations, int) or operations < 0:
            raise InvalidArgument(
                "hsm.recycle_after_operations must be 0 (never) or a positive integer",
                reason=Reason.CONFIG_INVALID,
            )
        if not self.allowed_oaep_hashes or not all(
            isinstance(h, OaepHash) for h in self.allowed_oaep_hashes
        ):
            raise InvalidArgument(
                "hsm.allowed_oaep_hashes must list OaepHash values", reason=Reason.CONFIG_INVALID
            )


@dataclass(frozen=True)
class HsmStatus:
    """A snapshot for health checks and operators."""

    token_label: str
    connected: bool
    generation: int  # how many times a connection (module initialised, logged in) was made
    oaep_hashes: tuple[OaepHash, ...]
    last_error: str | None
    recycles: int = 0  # planned re-initialisations that returned the module's memory


class HsmSession:
    """The work session an operation runs with. Valid only on the HSM worker thread."""

    def __init__(
        self,
        lib: Any,
        token: Any,
        session: Any,
        direct: DirectModule,
        *,
        generation: int,
        serial: int,
        closing: threading.Event,
    ) -> None:
        self._lib = lib
        self._token = token
        self._closing = closing
        #: the python-pkcs11 ``Session`` (R/W; the user is logged in through the login session)
        self.session = session
        #: the same session for direct calls (the data-key path and key lookups, see ``p11direct``)
        self.direct: DirectSession = direct.session(session.handle)
        #: increases with every (re)connection
        self.generation = generation
        #: unique per work session: object handles found on another session are void here
        self.serial = serial
        #: operations run on this session so far
        self.operations = 0

    def token_answers(self) -> bool:
        """Whether the module still lists the slot and the token answers ``C_GetTokenInfo``."""
        try:
            self._lib.get_slots()
            self._token.slot.get_token()
        except p11x.PKCS11Error:
            return False
        return True

    def logged_in(self) -> bool:
        """Whether this session still has the user logged in (``C_GetSessionInfo``)."""
        try:
            return self.direct.state() in USER_SESSION_STATES
        except p11x.PKCS11Error:
            return False

    def require_token(self) -> None:
        """Raises ``HsmUnavailable`` unless the token still answers (see :meth:`token_answers`)
        and the user is still logged in: a session that lost its login finds no private object,
        so every key would look missing (``NotFound``) or vanished (``DataLoss``)."""
        if not self.token_answers():
            raise HsmUnavailable("the HSM token stopped answering")
        if not self.logged_in():
            raise HsmUnavailable("the HSM session is no longer logged in")

    def stop_if_closing(self) -> None:
        """Raises ``HsmUnavailable(HSM_CLOSED)`` once :meth:`Hsm.close` was called: an operation
        that makes many PKCS#11 calls (a search through every object of the token) looks between
        them, so that the close waits for the one call under way, not for all of them."""
        if self._closing.is_set():
            raise HsmUnavailable("the HSM backend is closing", reason=Reason.HSM_CLOSED)

    def close(self) -> None:
        """Closes the session, ignoring errors (the device may already be gone)."""
        with contextlib.suppress(p11x.PKCS11Error):
            self.session.close()


@dataclass
class _Job:
    op: Callable[[HsmSession], Any]
    call: HsmCall[Any]
    deadline: float
    name: str
    creates_objects: bool = True  # counts toward ``recycle_after_operations``
    reread_token: bool = False  # re-initialise the module first (:meth:`Hsm.submit`)
    then: Callable[[Any], None] | None = None  # given the result, on the worker (Hsm.submit)
    ends_failures: bool = True  # its success ends a run of drops (Hsm.submit)


class _WorkSessions:
    """Work sessions of one connection: :meth:`acquire` one, run an operation, :meth:`release` it.

    Keeps at most ``size`` idle sessions (1 with one worker thread); they live until the
    connection is closed.
    """

    def __init__(
        self,
        open_session: Callable[[], Any],
        lib: Any,
        direct: DirectModule,
        token: Any,
        generation: int,
        *,
        closing: threading.Event,
        size: int = 1,
    ) -> None:
        self._open = open_session
        self._lib = lib
        self._direct = direct
        self._token = token
        self._generation = generation
        self._closing = closing
        self._size = size
        self._idle: list[HsmSession] = []

    def acquire(self) -> HsmSession:
        """An idle session, or a new one (raises ``p11x.PKCS11Error`` if it cannot be opened)."""
        if self._idle:
            return self._idle.pop()
        return HsmSession(
            self._lib,
            self._token,
            self._open(),
            self._direct,
            generation=self._generation,
            serial=_next_serial(),
            closing=self._closing,
        )

    def release(self, hs: HsmSession) -> None:
        """Takes a session back after an operation."""
        hs.operations += 1
        if len(self._idle) >= self._size:
            hs.close()
        else:
            self._idle.append(hs)

    def close(self) -> None:
        """Closes every idle session (never logs out: these sessions did not log in)."""
        idle, self._idle = self._idle, []
        for hs in idle:
            hs.close()


_SERIALS = iter(range(1, 2**63))
_SERIAL_LOCK = threading.Lock()


def _next_serial() -> int:
    with _SERIAL_LOCK:
        return next(_SERIALS)


@dataclass
class _Connection:
    """An initialised module, the token, the login session, and the work sessions."""

    lib: Any
    token: Any
    login: Any
    sessions: _WorkSessions
    operations: int = 0

    def token_answers(self) -> bool:
        try:
            self.lib.get_slots()
            self.token.slot.get_token()
        except p11x.PKCS11Error:
            return False
        return True

    def close(self) -> None:
        self.sessions.close()
        with contextlib.suppress(p11x.PKCS11Error):
            self.login.close()  # logs out, then closes


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# An HsmCall's states: queued, taken by the worker, ended (result or exception), cancelled.
_QUEUED, _RUNNING, _ENDED, _CANCELLED = range(4)


class HsmCall(Generic[T]):
    """An operation queued by :meth:`Hsm.submit`.

    The caller blocks on a lock of its own that the call holds until it ends (or is cancelled)
    and the worker releases then: one hand-off per operation, the worker waking the caller once.
    (A ``concurrent.futures.Future`` woke it under the future's condition lock, which the caller
    then had to take back, often while the worker still held it: a second sleep and wake-up.)
    """

    __slots__ = (
        "_deadline",
        "_ended",
        "_error",
        "_limit",
        "_name",
        "_result",
        "_state",
        "_state_lock",
        "finished_at",
    )

    def __init__(self, name: str, limit: float, deadline: float) -> None:
        self._name = name
        self._limit = limit
        self._deadline = deadline
        self._state = _QUEUED
        # Orders the worker taking the call against its caller (or close) cancelling it.
        self._state_lock = threading.Lock()
        # Held until the call ends or is cancelled; whoever ends it releases it, once.
        self._ended = threading.Lock()
        self._ended.acquire()
        self._result: T | None = None
        self._error: BaseException | None = None
        #: ``time.perf_counter()`` when the worker finished the operation (None until then).
        self.finished_at: float | None = None

    # The worker's side.

    def _begin(self) -> bool:
        """Marks the call taken by the worker; False if it was cancelled first (then skip it)."""
        with self._state_lock:
            if self._state != _QUEUED:
                return False
            self._state = _RUNNING
            return True

    def _complete(self, produce: Callable[[], T], then: Callable[[T], None] | None = None) -> None:
        """Runs ``produce`` and hands its result, or what it raised, to the waiting caller;
        ``then`` is given a result first (what it raises is logged: the caller has its result)."""
        try:
            self._result = produce()
        except BaseException as exc:
            self._error = exc
        self.finished_at = time.perf_counter()
        if then is not None and self._error is None:
            try:
                then(self._result)  # type: ignore[arg-type]
            except BaseException:
                # Not only Exception: pyo3 raises a Rust panic (the signature's) as a
                # BaseException, which ended this thread, the one worker every HSM call shares,
                # before the call was ended: HSM_TIMEOUT for it and every call after.
                _log.exception("the step after the HSM's %s raised", self._name)
        # Only the worker moves a running call on, so no state lock: the release publishes it.
        self._state = _ENDED
        self._ended.release()

    def _cancel(self) -> None:
        """Cancels the call unless the worker took it (then a no-op)."""
        with self._state_lock:
            if self._state != _QUEUED:
                return
            self._state = _CANCELLED
        self._ended.release()

    @property
    def started(self) -> bool:
        """Whether the worker took the operation before it could be cancelled: it then runs to its
        end (or refuses it as past its deadline) whatever its caller does."""
        return self._state in (_RUNNING, _ENDED)

    def finish(self) -> T:
        """After :meth:`result` raised ``HSM_TIMEOUT`` for an operation that had already started
        (the worker runs it to its end regardless), waits once more up to the operation's limit for
        its outcome; raises as :meth:`result` if it still has none."""
        return self._wait(self._limit, 2 * self._limit)

    def result(self) -> T:
        """Waits until the operation's deadline for its result; raises as :meth:`Hsm.call`."""
        return self._wait(max(0.0, self._deadline - time.monotonic()), self._limit)

    def _wait(self, timeout: float, waited: float) -> T:
        if not self._ended.acquire(timeout=timeout):
            self._cancel()  # a no-op once the worker has started it
            raise HsmUnavailable(
                f"the HSM did not complete {self._name} within {waited:.3f}s",
                reason=Reason.HSM_TIMEOUT,
            )
        self._ended.release()  # ended for good: a later wait returns at once
        if self._state == _CANCELLED:
            raise HsmUnavailable("the HSM backend is closed", reason=Reason.HSM_CLOSED)
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class Hsm(Closing):
    """A PKCS#11 token reached through one worker thread; see the module docstring.

    Use :meth:`open`, then :meth:`call` with a function of :class:`HsmSession`; :meth:`close` when done
    (or use it as a context manager).
    """

    def __init__(self, config: HsmConfig, module_key: str) -> None:
        """Internal: use :meth:`open`."""
        self._config = config
        self._module_key = module_key
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        # Set by close(): the operation under way stops at its next look (stop_if_closing).
        self._closing = threading.Event()
        self._lib: Any = None
        self._direct: DirectModule | None = None
        self._conn: _Connection | None = None
        self._recycles = 0
        self._recycling = False  # the connection was dropped on purpose, not by a failure
        self._failed_attempts = 0
        # Sessions dropped for the HSM's failure since an operation last succeeded: the second
        # one, on a session re-established after the first, backs the reconnects off.
        self._drops = 0
        # Every session dropped since an operation last succeeded, one failing object's included
        # (those reconnect at once, at the pace of the calls that meet it): their lines.
        self._dropped = 0
        # An operation's session (not a health check's) was among them: only another operation
        # ends the run then, a check passing on a token that fails every operation. A run only
        # checks met (an idle broker's HSM timing its session out) ends at a check that passes.
        self._operation_dropped = False
        # The reconnects are spaced after a dropped session, not a failed connection: what a
        # caller refused meanwhile is told.
        self._dropping = False
        self._generation = 0
        self._oaep_hashes: tuple[OaepHash, ...] = ()
        self._last_error: str | None = None
        self._last_attempt: float | None = None
        self._login_refused = False
        # The failed connection attempts' and the dropped sessions' lines: each failure once,
        # then counted (an attempt came every reconnect_max_interval while callers kept asking,
        # each an ERROR; a drop came at the callers' pace, each a WARNING).
        self._outage = OutageLines(_log)
        self._thread = threading.Thread(
            target=self._work, name=f"hsm-{config.token_label}", daemon=True
        )
        self._thread.start()

    @classmethod
    def open(cls, config: HsmConfig, *, wait: bool = True) -> Hsm:
        """Starts the backend. With ``wait`` (the default) it connects, logs in and probes the
        token within ``config.connect_timeout`` or raises ``HsmUnavailable`` (and is closed);
        without, it connects on first use and :meth:`check_health` reports readiness.
        """
        key = os.path.realpath(config.module_path)
        with _OPEN_LOCK:
            if key in _OPEN_MODULES:
                raise FailedPrecondition(
                    f"the PKCS#11 module {key} is already opened by this process",
                    reason=Reason.HSM_ALREADY_OPEN,
                )
            _OPEN_MODULES.add(key)
        hsm = cls(config, key)
        if wait:
            try:
                hsm.call(
                    lambda _s: None,
                    timeout=config.connect_timeout,
                    name="connect",
                    creates_objects=False,
                )
            except BaseException:
                hsm.close()
                raise
        return hsm

    def __repr__(self) -> str:
        return f"Hsm(token={self._config.token_label!r}, connected={self._conn is not None})"

    @property
    def config(self) -> HsmConfig:
        """The configuration this backend was opened with."""
        return self._config

    @property
    def oaep_hashes(self) -> tuple[OaepHash, ...]:
        """OAEP hashes the token accepted in the last probe (strongest first), limited to
        ``config.allowed_oaep_hashes``; empty before the first successful connection."""
        return self._oaep_hashes

    def status(self) -> HsmStatus:
        """A snapshot of the connection state (no HSM call)."""
        return HsmStatus(
            token_label=self._config.token_label,
            connected=self._conn is not None,
            generation=self._generation,
            oaep_hashes=self._oaep_hashes,
            last_error=self._last_error,
            recycles=self._recycles,
        )

    def call(
        self,
        op: Callable[[HsmSession], T],
        *,
        timeout: float | None = None,
        name: str = "operation",
        creates_objects: bool = True,
        reread_token: bool = False,
        ends_failures: bool = True,
    ) -> T:
        """Runs ``op`` on the worker thread with the logged-in session; returns its result.

        ``creates_objects`` False marks an operation that creates no PKCS#11 objects (a health
        check): it does not count toward the recycle quota (module doc). ``ends_failures`` False
        marks one whose success says nothing of the HSM's operations (a health check: a token
        answers it while it fails every operation): it does not end a run of failures in which
        an operation's session was dropped, nor its back-off (a run that only such calls met,
        it does: failed connections, sessions lost under health checks). ``reread_token`` re-
        initialises the module before ``op`` (a few milliseconds, as a recycle), so that its
        searches find every object in the token: a SoftHSM2 instance re-reads the token's object
        files only when initialised or when another instance has written to the token since its
        own last write, so it can miss, for good, an object another instance made just before it
        wrote one itself (measured: two replicas enabling a version at once).

        Raises ``HsmUnavailable`` when the HSM cannot serve it (``HSM_TIMEOUT`` once ``timeout``
        seconds, default ``config.operation_timeout``, have passed), a ``StrongroomError`` raised by
        ``op`` unchanged, and ``Internal(HSM_ERROR)`` for any other PKCS#11 error.
        """
        return self.submit(
            op,
            timeout=timeout,
            name=name,
            creates_objects=creates_objects,
            reread_token=reread_token,
            ends_failures=ends_failures,
        ).result()

    def submit(
        self,
        op: Callable[[HsmSession], T],
        *,
        timeout: float | None = None,
        name: str = "operation",
        creates_objects: bool = True,
        reread_token: bool = False,
        then: Callable[[T], None] | None = None,
        ends_failures: bool = True,
    ) -> HsmCall[T]:
        """Queues ``op`` as :meth:`call` does and returns at once; :meth:`HsmCall.result` waits
        for it, so the caller can do other work (the key broker's audit commit) meanwhile.
        ``then`` is called with its result on the worker, once the module's part is done (the
        session given back), before the caller hears of it: work of the caller's own (no
        PKCS#11: the worker is the module's only thread) that needs the result while the caller
        is still busy elsewhere. It runs only for a result, never for a failure.
        ``ends_failures`` as for :meth:`call`."""
        limit = self._config.operation_timeout if timeout is None else timeout
        if not limit > 0:
            raise HsmUnavailable(f"no time left for {name}", reason=Reason.HSM_TIMEOUT)
        if self._closed:
            raise HsmUnavailable("the HSM backend is closed", reason=Reason.HSM_CLOSED)
        deadline = time.monotonic() + limit
        call: HsmCall[T] = HsmCall(name, limit, deadline)
        self._queue.put(
            _Job(op, call, deadline, name, creates_objects, reread_token, then, ends_failures)
        )
        return call

    def check_health(self, *, timeout: float | None = None) -> None:
        """Raises ``HsmUnavailable`` unless the token is reachable and logged in (reconnecting if
        needed). Suitable for a readiness probe. Its success does not end a run in which an
        operation's session was dropped (:meth:`call`'s ``ends_failures``): the broker's probe,
        twice a second, ended the back-off of an HSM that answers it but loses the session under
        every operation. It ends a run that only checks met (failed connections, sessions the HSM
        lost while an idle broker ran only checks), as any operation does: otherwise each such
        loss after the first backed the reconnects off, the probe saying not ready meanwhile."""
        self.call(
            lambda s: s.require_token(),
            timeout=timeout,
            name="health check",
            creates_objects=False,
            ends_failures=False,
        )

    def close(self, *, timeout: float = 5.0) -> None:
        """Closes the session, finalises and unloads the module; idempotent. An operation under
        way that makes many PKCS#11 calls stops at its next look
        (:meth:`HsmSession.stop_if_closing`; its caller gets ``HSM_CLOSED``): a SIGTERM during
        the broker's first scan of the token's keys waited for the whole scan (up to
        ``timeout``) before the process could stop."""
        with self._close_lock:
            if self._closed:
                return
            self._closing.set()
            self._closed = True
        self._queue.put(None)
        self._outage.closing()  # the failed attempts counted since their last line, said
        # What is waited for: the worker to return from the PKCS#11 call it is in, then to log
        # out, close the sessions, C_Finalize and unload the module itself. Nothing but the
        # worker may call the module (C_Initialize(NULL) promised no concurrent calls), no call
        # may be under way when C_Finalize runs, and code still running in the module must not be
        # unloaded; a process that ended meanwhile would run the module's own exit handlers
        # under that call. One call of a token that answers takes milliseconds; one that hangs
        # is given up on at ``timeout`` (the module is then left loaded, never unloaded under it).
        self._thread.join(timeout)
        if self._thread.is_alive():
            _log.error("HSM worker did not stop within %.1fs; the module stays loaded", timeout)
            return
        with _OPEN_LOCK:
            _OPEN_MODULES.discard(self._module_key)

    # --- worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            if job.call._begin():
                job.call._complete(functools.partial(self._run, job), job.then)
        self._teardown()
        while True:  # jobs queued while closing: their callers get HSM_CLOSED, not a timeout
            try:
                leftover = self._queue.get_nowait()
            except queue.Empty:
                break
            if leftover is not None:
                leftover.call._cancel()

    def _run(self, job: _Job) -> Any:
        if time.monotonic() >= job.deadline:
            raise HsmUnavailable(
                f"{job.name} waited past its deadline for the HSM", reason=Reason.HSM_TIMEOUT
            )
        if job.reread_token and self._conn is not None:
            self._reread_token(job.name)
        conn = self._ensure_connected()
        try:
            hs = conn.sessions.acquire()
        except p11x.PKCS11Error as exc:
            what = errs.describe(exc)
            self._disconnect(f"cannot open a work session ({what})", by_operation=job.ends_failures)
            raise HsmUnavailable(f"the HSM cannot open a session ({what})") from exc
        try:
            result = job.op(hs)
            # A health check says the token answers: all a run of failed connections or of
            # sessions lost under checks was about, but nothing of the operations a run of
            # drops lost their sessions under.
            if self._unwell() and (job.ends_failures or not self._operation_dropped):
                self._operations_succeed(by_check=not job.ends_failures)
            return result
        except HsmUnavailable as exc:
            if exc.reason != Reason.HSM_CLOSED:  # closing: the teardown comes next anyway
                self._disconnect(
                    exc.message,
                    backs_off=exc.reason != Reason.HSM_OPERATION_FAILED,
                    by_operation=job.ends_failures,
                )
            raise
        except StrongroomError:
            raise
        except p11x.PKCS11Error as exc:
            raise self._translate(exc, conn, job.name, by_operation=job.ends_failures) from exc
        finally:
            if self._conn is conn:
                conn.sessions.release(hs)
                if job.creates_objects:
                    conn.operations += 1
                quota = self._config.recycle_after_operations
                if quota and conn.operations >= quota:
                    self._recycle()
            else:
                hs.close()  # the connection was dropped during the operation

    def _recycle(self) -> None:
        """A planned reconnect that lets the module free its session objects (module doc)."""
        assert self._conn is not None
        self._conn.close()
        self._conn = None
        self._recycling = True
        self._recycles += 1
        _log.info(
            "HSM connection recycled to free the module's session objects",
            extra={"token": self._config.token_label, "recycles": self._recycles},
        )

    def _reread_token(self, name: str) -> None:
        """Closes the connection so that the next operation's re-initialisation re-reads every
        object of the token (:meth:`call`'s ``reread_token``); planned, as a recycle is."""
        assert self._conn is not None
        self._conn.close()
        self._conn = None
        self._recycling = True
        _log.info(
            "HSM connection re-initialised to re-read the token's objects",
            extra={"token": self._config.token_label, "operation": name},
        )

    def _translate(
        self, exc: p11x.PKCS11Error, conn: _Connection, name: str, *, by_operation: bool
    ) -> StrongroomError:
        what = errs.describe(exc)
        if errs.is_device_failure(exc) or not conn.token_answers():
            self._disconnect(f"{what} during {name}", by_operation=by_operation)
            return HsmUnavailable(f"the HSM failed during {name} ({what})")
        if errs.is_stale_handle(exc):
            return HsmUnavailable(f"an HSM object changed during {name}; retry")
        if isinstance(exc, errs.AMBIGUOUS):
            # The token answers but failed the operation: a damaged object or a token hiccup.
            # SoftHSM2 re-reads its object files only when re-initialised, so reconnect, at
            # once: one damaged key must not hold the others back (KeyManager bounds its own
            # retries of a key that keeps failing).
            self._disconnect(f"{what} during {name}", backs_off=False, by_operation=by_operation)
            return HsmUnavailable(
                f"the HSM failed {name} ({what}); the session is being re-initialised",
                reason=Reason.HSM_OPERATION_FAILED,
            )
        _log.error("unexpected PKCS#11 error during %s: %s", name, what)
        return Internal(f"the HSM refused {name} ({what})", reason=Reason.HSM_ERROR)

    def _ensure_connected(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        if self._login_refused:
            raise HsmUnavailable(
                "the HSM refused the PIN; fix the configuration and restart the backend",
                reason=Reason.HSM_LOGIN_FAILED,
                public=PIN_REFUSED,
            )
        now = time.monotonic()
        if self._last_attempt is not None:
            wait = self._last_attempt + self._backoff() - now
            if wait > 0:
                told = _failing if self._dropping else _unreachable
                raise HsmUnavailable(
                    f"the HSM is unavailable ({self._last_error}); next attempt in {wait:.2f}s",
                    public=told(f"; next attempt in {wait:.2f}s"),
                )
        self._last_attempt = now
        try:
            self._conn = self._connect()
        except HsmUnavailable as exc:
            self._last_error = exc.message
            self._failed_attempts += 1
            self._dropping = False
            refused = exc.reason == Reason.HSM_LOGIN_FAILED
            if not refused:  # logged as the refusal it is
                self._outage.failed(
                    "connect", f"cannot connect to the HSM: {exc.message}", reason=exc.reason
                )
            # Its message names the module's and the configuration's paths and the token's
            # labels: the operator's, in the line above; a caller is told the failure's class
            # (a refused PIN in the words of every call after it).
            raise HsmUnavailable(
                exc.message, reason=exc.reason, public=PIN_REFUSED if refused else _unreachable()
            ) from exc.__cause__
        # The failures' tallies and the back-off end once an operation succeeds, not here: a
        # connection that works for no operation is no recovery (its next failure would be
        # logged anew and reconnected at once, at the callers' pace).
        self._last_attempt = None
        self._generation += 1
        if self._generation > 1 and not self._recycling and self._dropped <= 1:
            _log.warning(
                "HSM session re-established",
                extra={"token": self._config.token_label, "generation": self._generation},
            )
        self._recycling = False
        self._last_error = None
        return self._conn

    def _backoff(self) -> float:
        """The wait before the next connection attempt: doubled per failed attempt, capped."""
        cfg = self._config
        exponent = min(max(self._failed_attempts - 1, 0), 16)
        return float(min(cfg.reconnect_interval * (1 << exponent), cfg.reconnect_max_interval))

    def _connect(self) -> _Connection:
        cfg = self._config
        try:
            with _environment(cfg.module_env):
                if self._lib is None:
                    self._lib = pkcs11.lib(self._module_key)
                else:
                    with contextlib.suppress(p11x.PKCS11Error):
                        self._lib.finalize()
                    self._lib.initialize()
        except p11x.PKCS11Error as exc:
            hints = _hints.joined(
                _hints.module_problem(cfg.module_path, exc),
                _hints.softhsm_conf_problem(cfg.module_path, cfg.module_env),
            )
            raise HsmUnavailable(
                f"cannot initialise the PKCS#11 module ({errs.describe(exc)}){hints}"
            ) from exc
        if self._direct is None:
            try:
                self._direct = DirectModule(self._module_key)
            except (ImportError, OSError, p11x.PKCS11Error) as exc:
                # ImportError: _p11release (ours, not the HSM's) missing or of another version.
                raise HsmUnavailable(
                    f"cannot set up the broker's direct PKCS#11 calls: {exc}"
                ) from exc
        try:
            token = self._lib.get_token(token_label=cfg.token_label)
        except (p11x.NoSuchToken, p11x.MultipleTokensReturned) as exc:
            hints = _hints.joined(
                _hints.present_labels(self._lib),
                _hints.softhsm_conf_problem(cfg.module_path, cfg.module_env),
            )
            raise HsmUnavailable(
                f"token {cfg.token_label!r} not found ({errs.describe(exc)}){hints}"
            ) from exc
        except p11x.PKCS11Error as exc:
            raise HsmUnavailable(f"cannot list tokens ({errs.describe(exc)})") from exc
        try:
            login = token.open(rw=True, user_pin=cfg.pin.reveal_text())
        except errs.LOGIN_REFUSED as exc:
            self._login_refused = True
            _log.error("HSM login refused: %s; not retrying", errs.describe(exc))
            raise HsmUnavailable(
                f"the HSM refused the PIN ({errs.describe(exc)})", reason=Reason.HSM_LOGIN_FAILED
            ) from exc
        except p11x.PKCS11Error as exc:
            raise HsmUnavailable(f"cannot open a session ({errs.describe(exc)})") from exc
        lib = self._lib
        sessions = _WorkSessions(
            lambda: token.open(rw=True, attribute_mapper=_attribute_mapper()),
            lib,
            self._direct,
            token,
            self._generation + 1,
            closing=self._closing,
        )
        conn = _Connection(lib, token, login, sessions)
        try:
            probe = sessions.acquire()
            try:
                supported = _probe_oaep(probe.session)
            finally:
                sessions.release(probe)
        except p11x.PKCS11Error as exc:
            conn.close()
            raise HsmUnavailable(f"cannot probe the token ({errs.describe(exc)})") from exc
        self._oaep_hashes = tuple(
            h for h in PROBE_ORDER if h in supported and h in cfg.allowed_oaep_hashes
        )
        _log.log(
            logging.DEBUG if self._dropped > 1 else logging.INFO,  # a flap's are counted as drops
            "HSM session open",
            extra={
                "token": cfg.token_label,
                "oaep_hashes": [h.value for h in self._oaep_hashes],
                "oaep_hashes_token": [h.value for h in supported],
            },
        )
        if not self._oaep_hashes:
            _log.warning("the HSM supports no allowed OAEP hash: every key release will fail")
        return conn

    def _disconnect(self, why: str, *, backs_off: bool = True, by_operation: bool = True) -> None:
        """Drops the connection after a failure. The first drop since an operation last
        succeeded lets the next call reconnect at once (a transient drop costs nothing more);
        a drop on a session re-established since (``backs_off``: the HSM's failure, not one
        object's) spaces the reconnects as failed connection attempts are, so that an HSM that
        connects but fails its operations is not re-initialised by every call.
        ``by_operation`` False: a health check met it (:meth:`call`'s ``ends_failures``)."""
        if self._conn is None:
            return
        self._outage.failed(
            "drop",
            f"HSM session dropped: {why}",
            level=logging.WARNING,
            fields={"token": self._config.token_label},
        )
        self._conn.close()
        self._conn = None
        self._last_error = why
        self._dropped += 1
        self._operation_dropped = self._operation_dropped or by_operation
        if backs_off:
            self._drops += 1
        if backs_off and self._drops > 1:
            self._failed_attempts += 1
            self._last_attempt = time.monotonic()
            self._dropping = True
        else:
            self._last_attempt = None

    def _unwell(self) -> bool:
        """Whether a session was dropped or a connection failed since an operation last
        succeeded (both counts end together, in :meth:`_operations_succeed`)."""
        return self._dropped > 0 or self._failed_attempts > 0

    def _operations_succeed(self, *, by_check: bool = False) -> None:
        """An operation succeeded after drops or failed connections (``by_check``: a health
        check, after failures only checks met): the back-off ends, the counts not yet said are
        said, and the next failure is logged and reconnected at once."""
        drops, self._dropped = self._dropped, 0
        self._drops = 0
        self._operation_dropped = False
        self._failed_attempts = 0
        self._outage.committed()
        if drops > 1:
            _log.warning(
                "HSM health checks pass again after %d dropped sessions"
                if by_check
                else "HSM operations succeed again after %d dropped sessions",
                drops,
                extra={"token": self._config.token_label, "generation": self._generation},
            )

    def _teardown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._direct is not None:
            self._direct.close()  # our loader reference first; python-pkcs11 drops the last
            self._direct = None
        if self._lib is not None:
            with contextlib.suppress(p11x.PKCS11Error):
                pkcs11.unload(self._module_key)
            self._lib = None


def _probe_oaep(session: Any) -> tuple[OaepHash, ...]:
    """Asks the token, by trial C_WrapKey, which OAEP hashes it supports (in PROBE_ORDER)."""
    public = session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.MODULUS: _PROBE_MODULUS,
            Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
            Attribute.WRAP: True,
            Attribute.ENCRYPT: False,
            Attribute.VERIFY: False,
        }
    )
    try:
        key = session.generate_key(
            KeyType.AES,
            256,
            store=False,
            template={
                Attribute.TOKEN: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True,
                Attribute.ENCRYPT: False,
                Attribute.DECRYPT: False,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
            },
        )
        try:
            supported = []
            for choice in PROBE_ORDER:
                try:
                    public.wrap_key(
                        key,
                        mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=oaep_mechanism_param(choice),
                    )
                except _OAEP_REFUSALS:
                    continue
                supported.append(choice)
            return tuple(supported)
        finally:
            key.destroy()
    finally:
        public.destroy()
