"""The set of served models: several names, several versions, atomic swap to a new version.

Readers take one snapshot of an immutable table (a single attribute read) and never lock; writers
build a new table under a lock and swap it in. A request that already holds a model keeps using it
after a newer version is published — the old session lives until its last in-flight request
returns — so a swap never fails a request. A version whose load failed is recorded with its
reason and is never ready; if an older version is serving, it keeps serving.

**Failed loads are kept, but not for ever.** A failed version stays listed (with its reason, for
ModelReady/metadata and :meth:`ModelRepository.status`) until the next attempt to load that version
replaces it, an unload of the version (or of the model) removes it, or it is among the oldest
beyond :data:`MAX_FAILED_LOADS` failed versions kept across all models: each failure beyond the
cap drops the oldest one (then a model with nothing else to show, and not configured, is no
longer listed), except a failure whose load waits to be retried (:meth:`ModelRepository.retrying`:
a configured model's, or a LoadModel's in its back-off): the retry takes a version that is no
longer listed for one an operator unloaded, and would stop for good. LoadModel is admin-only, but an admin script asking for version after version of
names that do not exist grew the table without limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType

from strongroom.errors import (
    FailedPrecondition,
    NotFound,
    StrongroomError,
    Unavailable,
)
from strongroom.identifiers import validate_name, validate_version
from strongroom.inference.models._loaded import LoadedModel, ModelBuffer, RuntimeOptions
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

MAX_FAILED_LOADS = 64
"""Failed versions kept across all models; beyond it the oldest failure is dropped."""

REPEAT_LOG_SECONDS = 3600.0
"""How often a failure a retry waits for is logged in full again with the same reason, whatever
reasons came between (between, at DEBUG)."""


class ModelNotFound(NotFound):
    """No model (or no such version of it) is configured."""

    default_reason = Reason.MODEL_NOT_FOUND


class ModelNotReady(Unavailable):
    """The model is configured but still loading; retrying later may succeed."""

    default_reason = Reason.MODEL_NOT_READY


class ModelLoadFailed(FailedPrecondition):
    """The model's load failed; the message carries the recorded reason."""

    default_reason = Reason.MODEL_LOAD_FAILED


class ModelUnloaded(FailedPrecondition):
    """The version was unloaded while it was loading: the load's result is dropped."""

    default_reason = Reason.MODEL_UNLOADED


def _unloaded(name: str, version: str) -> ModelUnloaded:
    return ModelUnloaded(
        f"model {name!r} version {version!r} was unloaded while it was loading; it is not served"
    )


class ModelState(enum.Enum):
    """Where a model version stands."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class LoadFailure:
    """Why a load failed: a stable reason code (shown to OIP callers) and the message (the
    broker's or the store's words, addresses included: logged, never shown to OIP callers)."""

    reason: str
    message: str
    at: float


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """One version's state; ``failure`` is its load's (FAILED) or, LOADING, the failure of the
    version's last load, which this one tries again (a retry's, or an operator's LoadModel)."""

    version: str
    state: ModelState
    failure: LoadFailure | None = None


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """A model's state: whether it serves, which version by default, and every known version."""

    name: str
    ready: bool
    default_version: str | None
    versions: tuple[VersionStatus, ...]


@dataclasses.dataclass(frozen=True)
class _Entry:
    ready: Mapping[str, LoadedModel]  # oldest first
    default: str | None
    pending: Mapping[str, VersionStatus]  # LOADING or FAILED, most recent last


_EMPTY = _Entry(MappingProxyType({}), None, MappingProxyType({}))


class RetryWatch:
    """One :meth:`ModelRepository.retrying` block's: whether an :meth:`~ModelRepository.unload`
    of its version (or of its model) came while the block ran. The version's state alone does
    not say: a LoadModel after the unload that failed lists it FAILED again, as if the unload
    had never been. Per block, not per version: an unload before a block began (while another
    block of the version ran: a configured model's, held while any configured model is
    retried) does not end the retries of a LoadModel that came after it."""

    __slots__ = ("unloaded",)

    def __init__(self) -> None:
        self.unloaded = False


class ModelRepository:
    """Models by name and version; ``expected`` names make the server unready until they load.
    ``options`` are the ONNX Runtime settings of the sessions :meth:`load` makes."""

    def __init__(
        self,
        expected: Iterable[str] = (),
        *,
        retain_versions: int = 1,
        max_failed: int = MAX_FAILED_LOADS,
        options: RuntimeOptions | None = None,
    ) -> None:
        if retain_versions < 1:
            raise ValueError("retain_versions must be at least 1")
        if max_failed < 1:
            raise ValueError("max_failed must be at least 1")
        self._retain = retain_versions
        self._options = options or RuntimeOptions()
        self._max_failed = max_failed
        # Every FAILED version, oldest failure first (module docstring: the cap drops from here).
        self._failed: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Versions whose loads wait to be retried (retrying()): their failures are not dropped.
        # Each block's own watch, which an unload of the version marks.
        self._retrying: dict[tuple[str, str], list[RetryWatch]] = {}
        # Of those, when each reason of their failures was last logged in full (_log_failure).
        self._failure_logged: dict[tuple[str, str], dict[str, float]] = {}
        self._lock = threading.Lock()
        self._expected: frozenset[str] = frozenset()
        self._entries: Mapping[str, _Entry] = MappingProxyType({})
        for name in expected:
            self.expect(name)

    # -- writers ------------------------------------------------------------------------------
    def expect(self, name: str) -> None:
        """Declares a configured model: the server is not ready until a version of it is."""
        validate_name(name)
        with self._lock:
            self._expected = self._expected | {name}
            if name not in self._entries:
                self._put(name, _EMPTY)

    def begin_load(self, name: str, version: str) -> VersionStatus:
        """Records that ``version`` is being loaded (downloaded, decrypted, ...). Returns the
        load's status: passed back to :meth:`load`, :meth:`fail` and :meth:`publish`, it makes
        them give way to an :meth:`unload` (or a newer load) that came meanwhile. A version whose
        last load failed keeps that failure in its status while it loads again: an operator
        watching a configured model's retries sees why it is retried, not just LOADING."""
        loading = self._set_pending(
            name, version, VersionStatus(version, ModelState.LOADING), keep_failure=True
        )
        assert loading is not None
        return loading

    def fail(
        self,
        name: str,
        version: str,
        error: StrongroomError,
        *,
        loading: VersionStatus | None = None,
    ) -> None:
        """Records that loading ``version`` failed with ``error``; it will not become ready.
        Nothing is recorded for a ``loading`` that is no longer current (see :meth:`begin_load`)."""
        failure = LoadFailure(error.reason, error.message, time.time())
        status = VersionStatus(version, ModelState.FAILED, failure)
        if self._set_pending(name, version, status, replacing=loading) is None:
            return
        if not self._log_failure(name, version, error.reason):
            log.debug("model load failed", extra={"model": name, "reason": error.reason})
            return
        log.error(
            "model load failed",
            extra={
                "model": name,
                "version": version,
                "reason": error.reason,
                "detail": error.message[:2000],
            },
        )

    def _log_failure(self, name: str, version: str, reason: str) -> bool:
        """Whether a failure of ``version`` is logged in full: always, unless a retry waits for
        it (:meth:`retrying`) and a failure of it with the same reason was logged less than
        :data:`REPEAT_LOG_SECONDS` ago, whatever came between (a configured model retried for
        days logged its every attempt at ERROR, the peer's message included; one whose reason
        flipped, A, B, A, B, still did)."""
        key = (name, version)
        now = time.monotonic()
        with self._lock:
            if key not in self._retrying:
                return True
            logged = self._failure_logged.setdefault(key, {})
            last = logged.get(reason)
            if last is not None and now - last < REPEAT_LOG_SECONDS:
                return False
            logged[reason] = now
            return True

    def withdraw(self, name: str, version: str, loading: VersionStatus) -> None:
        """Forgets a load that :meth:`begin_load` recorded but that will not run (it was aborted
        before it began), if ``loading`` is still ``version``'s status: the version reads as if
        the load had never been asked for."""
        with self._lock:
            if not self._current(name, version, loading):
                return
            entry = self._entries[name]
            pending = {v: s for v, s in entry.pending.items() if v != version}
            self._put_or_drop(name, _Entry(entry.ready, entry.default, MappingProxyType(pending)))

    @contextlib.contextmanager
    def retrying(self, name: str, version: str) -> Iterator[RetryWatch]:
        """Keeps ``version``'s failure listed, whatever the cap, while the block runs: a load
        that retries it decides from :meth:`version_state` whether an operator unloaded it
        meanwhile, and a failure dropped by the cap would read the same (the model would then
        never be loaded). An unload still removes it, and marks the block's
        :class:`RetryWatch` (and every other block's of the version)."""
        key = (validate_name(name), validate_version(version))
        watch = RetryWatch()
        with self._lock:
            self._retrying.setdefault(key, []).append(watch)
        try:
            yield watch
        finally:
            with self._lock:
                watches = self._retrying[key]
                watches.remove(watch)
                if not watches:
                    del self._retrying[key]
                    self._failure_logged.pop(key, None)
                self._enforce_cap()

    def retry_watches(self, name: str) -> tuple[RetryWatch, ...]:
        """The watches of the :meth:`retrying` blocks of ``name``'s versions now (a configured
        model's, a LoadModel's under way: in a load or in its back-off)."""
        with self._lock:
            return tuple(
                w for key, watches in self._retrying.items() if key[0] == name for w in watches
            )

    def publish(self, model: LoadedModel, *, loading: VersionStatus | None = None) -> None:
        """Makes ``model`` its name's default version, atomically; older versions beyond
        ``retain_versions`` stop being addressable (requests already using them complete).

        With ``loading`` (from :meth:`begin_load`), raises :class:`ModelUnloaded` and publishes
        nothing if that load is no longer current: the version was unloaded meanwhile.
        """
        name = validate_name(model.name)
        version = validate_version(model.version)
        with self._lock:
            entry = self._entries.get(name, _EMPTY)
            if loading is not None and not self._current(name, version, loading):
                raise _unloaded(name, version)
            ready = {v: m for v, m in entry.ready.items() if v != version}
            ready[version] = model
            while len(ready) > self._retain:
                del ready[next(iter(ready))]
            pending = {v: s for v, s in entry.pending.items() if v != version}
            self._failed.pop((name, version), None)
            self._put(name, _Entry(MappingProxyType(ready), version, MappingProxyType(pending)))
        log.info("model version serving", extra={"model": name, "version": version})

    def load(
        self,
        name: str,
        version: str,
        model: ModelBuffer,
        *,
        external_data: Mapping[str, ModelBuffer] | None = None,
        options: RuntimeOptions | None = None,
        loading: VersionStatus | None = None,
    ) -> LoadedModel:
        """Loads a model from plaintext bytes and publishes it; on failure records why and raises.

        ``loading`` is the status :meth:`begin_load` returned when the caller began the load
        earlier (before a download); without it the load begins here. ModelUnloaded if the
        version was unloaded since.
        """
        if loading is None:
            loading = self.begin_load(name, version)
        elif not self._current(name, version, loading):
            raise _unloaded(name, version)
        try:
            loaded = LoadedModel.from_bytes(
                name, version, model, external_data=external_data, options=options or self._options
            )
        except StrongroomError as exc:
            self.fail(name, version, exc, loading=loading)
            raise
        except Exception:
            log.exception("unexpected error loading model", extra={"model": name})
            error = ModelLoadFailed(
                "unexpected error while loading", reason=Reason.MODEL_LOAD_ERROR
            )
            self.fail(name, version, error, loading=loading)
            raise error from None
        self.publish(loaded, loading=loading)
        return loaded

    def unload(self, name: str, version: str | None = None) -> None:
        """Stops serving one version (or all); an expected model becomes unready. A version the
        repository does not hold (not ready, loading or failed) is ModelNotFound: nothing to
        unload, and the caller must not be told it was (a mistyped version of one to retire)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"unknown model {name!r}")
            if version is not None and version not in entry.ready and version not in entry.pending:
                raise ModelNotFound(
                    f"model {name!r} has no version {version[:64]!r} (ready, loading or failed): "
                    "nothing was unloaded",
                    reason=Reason.MODEL_VERSION_NOT_FOUND,
                )
            if version is None:
                ready: dict[str, LoadedModel] = {}
                pending: dict[str, VersionStatus] = {}
            else:
                ready = {v: m for v, m in entry.ready.items() if v != version}
                pending = {v: s for v, s in entry.pending.items() if v != version}
            for gone in set(entry.pending) - set(pending):
                self._failed.pop((name, gone), None)
            for key, watches in self._retrying.items():
                if key[0] == name and version in (None, key[1]):
                    for watch in watches:
                        watch.unloaded = True
            default = entry.default if entry.default in ready else next(reversed(ready), None)
            self._put_or_drop(
                name, _Entry(MappingProxyType(ready), default, MappingProxyType(pending))
            )

    # -- readers (lock-free) ------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model to run: ``version`` or, if empty, the default; raises if not servable."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name[:128]!r}")
        if not version:
            if entry.default is not None:
                return entry.ready[entry.default]
            latest = list(entry.pending.values())[-1] if entry.pending else None
            raise _not_servable(name, latest)
        model = entry.ready.get(version)
        if model is not None:
            return model
        status = entry.pending.get(version)
        if status is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version[:64]!r}",
                reason=Reason.MODEL_VERSION_NOT_FOUND,
            )
        raise _not_servable(name, status)

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether ``get(name, version)`` would return a model."""
        entry = self._entries.get(name)
        if entry is None:
            return False
        if not version:
            return entry.default is not None
        return version in entry.ready

    def versions(self, name: str) -> tuple[str, ...]:
        """The versions of ``name`` that are ready, oldest first."""
        entry = self._entries.get(name)
        return tuple(entry.ready) if entry is not None else ()

    def names(self) -> tuple[str, ...]:
        """Every known model name."""
        return tuple(self._entries)

    def status(self, name: str) -> ModelStatus:
        """The full state of ``name``."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name[:128]!r}")
        versions = [VersionStatus(v, ModelState.READY) for v in entry.ready]
        versions += list(entry.pending.values())
        return ModelStatus(name, entry.default is not None, entry.default, tuple(versions))

    def version_state(self, name: str, version: str) -> ModelState | None:
        """Where ``version`` stands now: READY, LOADING, FAILED, or None (never loaded, or
        unloaded). What a retry of a failed load checks first."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if version in entry.ready:
            return ModelState.READY
        status = entry.pending.get(version)
        return status.state if status is not None else None

    def server_ready(self, visible: Callable[[str], bool] | None = None) -> bool:
        """True when every expected model has a ready version; with ``visible``, every expected
        model it keeps (a caller's own: another tenant's readiness is not the caller's to learn)."""
        entries = self._entries
        return all(
            entries[n].default is not None
            for n in self._expected
            if n in entries and (visible is None or visible(n))
        )

    # -- internals ----------------------------------------------------------------------------
    def _set_pending(
        self,
        name: str,
        version: str,
        status: VersionStatus,
        *,
        replacing: VersionStatus | None = None,
        keep_failure: bool = False,
    ) -> VersionStatus | None:
        """Sets ``version``'s pending status; with ``replacing``, only if that is still it.
        With ``keep_failure``, ``status`` takes the failure of the status it replaces (if any).
        Returns the status set, or None if it was not set."""
        validate_name(name)
        validate_version(version)
        with self._lock:
            entry = self._entries.get(name, _EMPTY)
            if replacing is not None and not self._current(name, version, replacing):
                return None
            previous = entry.pending.get(version)
            if keep_failure and previous is not None and previous.failure is not None:
                status = dataclasses.replace(status, failure=previous.failure)
            pending = {v: s for v, s in entry.pending.items() if v != version}
            pending[version] = status
            ready = entry.ready
            default = entry.default
            # The next attempt replaces a failure (and its place in the cap's order).
            self._failed.pop((name, version), None)
            if status.state is ModelState.FAILED and version in ready:
                # A reload of a serving version failed: the served session is still good.
                del pending[version]
            elif status.state is ModelState.FAILED:
                self._failed[(name, version)] = None
            self._put(name, _Entry(ready, default, MappingProxyType(pending)))
            self._enforce_cap()
        return status

    def _enforce_cap(self) -> None:
        """Drops the oldest failures beyond the cap that no retry waits for (the lock is held);
        those a retry waits for may exceed it, one per retrying load at most."""
        excess = len(self._failed) - self._max_failed
        if excess <= 0:
            return
        for key in [k for k in self._failed if k not in self._retrying][:excess]:
            self._drop_failure(*key)

    def _drop_failure(self, name: str, version: str) -> None:
        """Forgets one failed version (the lock is held)."""
        del self._failed[(name, version)]
        entry = self._entries[name]
        pending = {v: s for v, s in entry.pending.items() if v != version}
        self._put_or_drop(name, _Entry(entry.ready, entry.default, MappingProxyType(pending)))
        log.info(
            "failed load record dropped: %d failed versions are kept",
            self._max_failed,
            extra={"model": name, "version": version},
        )

    def _put_or_drop(self, name: str, entry: _Entry) -> None:
        """Stores ``entry``, or forgets ``name`` if it has nothing to show and is not configured."""
        if entry.ready or entry.pending or name in self._expected:
            self._put(name, entry)
            return
        entries = dict(self._entries)
        del entries[name]
        self._entries = MappingProxyType(entries)

    def _current(self, name: str, version: str, loading: VersionStatus) -> bool:
        """Whether ``loading`` (from :meth:`begin_load`) is still ``version``'s pending status."""
        return self._entries.get(name, _EMPTY).pending.get(version) is loading

    def _put(self, name: str, entry: _Entry) -> None:
        entries = dict(self._entries)
        entries[name] = entry
        self._entries = MappingProxyType(entries)


def _not_servable(name: str, status: VersionStatus | None) -> StrongroomError:
    if status is not None and status.state is ModelState.FAILED and status.failure is not None:
        # The reason only: the message may carry a peer's refusal or an internal address, and
        # every caller with the client role reads this.
        return ModelLoadFailed(
            f"model {name!r} version {status.version!r} failed to load ({status.failure.reason}); "
            "the server's log has the details"
        )
    if status is not None and status.failure is not None:
        return ModelNotReady(
            f"model {name!r} version {status.version!r} is loading again after its last load "
            f"failed ({status.failure.reason}); the server's log has the details"
        )
    if status is not None:
        return ModelNotReady(f"model {name!r} version {status.version!r} is still loading")
    return ModelNotReady(f"model {name!r} is not loaded yet")
