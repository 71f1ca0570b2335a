"""The configured models (``inference.models``) loaded in the background, until they load.

Each configured version is tried once at start, then again while it fails, on a schedule of its
own:

* **soon**, for a failure that is transient (:func:`~strongroom.inference.loader.transient`: a
  peer unavailable, or busy with this identity's other calls, or the broker's grant budget spent
  for now): 1 s doubling to 60 s;
* **slowly**, for any other failure whose cause may go away without anyone touching this server
  (a release the broker's policy denies until an operator fixes the policy, a key version
  disabled then enabled again, a model not yet published, an artifact damaged then published
  again, a peer's certificate briefly outside its dates, a release-signing certificate not yet
  valid by this clock): ``inference.failed_load_retry_seconds`` (30 s) doubling to
  ``inference.failed_load_retry_max_seconds`` (300 s). Each wait is drawn between its delay and
  half as long again, so a fleet started together spreads its retries out; and no wait is
  shorter than its delay, so one replica's retries of one model never come faster than one per
  ``failed_load_retry_seconds`` (what the broker's refusal budget is judged against: see
  README "Faults"). A failure of the artifact itself (:func:`refuses_the_artifact`: damaged,
  or a model this server refuses) is retried only once the store's entry for the version
  (StatModel, asked before each attempt) differs from what it was before the attempt that
  failed: such a failure can come only after the whole download and a key release the broker
  granted (``ALLOWED``, within only the broker's grant budget), and the same artifact fails the same way on this
  server; until then each retry is that one StatModel call;
* **never**, for a failure only this server's own configuration can change
  (:data:`NEEDS_OUR_CONFIGURATION`): each try would be a key release the broker granted, and
  recorded as ``ALLOWED`` (within only the broker's grant budget), before this server refused the answer. ``0`` for
  ``failed_load_retry_seconds`` retries no slow failure (what the server did before).

The retries of a version end when it loads (its retry's load, or an operator's LoadModel), when
an operator unloads it or its model (for good: an operator's LoadModel after the unload that
fails lists the version failed again, and the retries went on from that, loading the model
behind the operator's back; :class:`~strongroom.inference.models.RetryWatch`), when a version of
the model that the configuration does not list serves it (an operator loaded it instead: a
retry succeeding later made the configured version the default again), or when the server
stops. An operator's LoadModel of it that fails does not end
them: the configuration still lists the version and the server is not ready without it (a
LoadModel refused for a moment, UNAVAILABLE, would otherwise leave it unloaded for good). An
attempt, the first one too, that finds another load of the model under way (of this version or
another: it holds the model's lock, or is registered to take it, or is a LoadModel waiting out
its back-off, whose next attempt loaded the version again after this one had) looks again
``soon_initial`` later rather than wait for it, with nothing counted and no StatModel (unless
that load came during the attempt's own): this one thread runs every configured model's loads,
and waiting out a load (up to the loader's timeout) held back all of them; and a first attempt that waited behind an operator's LoadModel of its version loaded it
again once that had loaded it. Once that load has ended the attempt goes on only if the version
is still not loaded (once tried: still failed) and no version the configuration does not list
serves the model (asked again once the attempt holds the lock: :meth:`ModelLoader.load`'s
``retry_of``). Loads of one model, whatever their versions, run one at a time (the loader's lock
per model), so a LoadModel beside a retry holds no plaintext buffer of the model while the
retry's load does; a LoadModel that comes while a retry loads the version waits for it and then
loads the version again (an explicit load reloads, as Triton's does: how an artifact published
again is picked up).

One thread runs the configured models' loads, one at a time, so that a pod sized for its largest
model holds one plaintext buffer for them: a retry whose own download stalls holds the other
configured models' attempts back until it ends (``inference.load_timeout_seconds``, 600 s, at
most). A thread per model would not, but each would hold its buffer at once.

A new configuration is a new server (the service reads it at start), so retries of a model the
new one no longer lists end with the old one.

A failure is logged in full (ERROR, or WARNING for a transient one, with the peer's message) at
most once every :data:`~strongroom.inference.models.REPEAT_LOG_SECONDS` (an hour) for each of
its reasons, with the failures of that reason not logged since; each retry is counted in the
``strongroom.inference.model_load.retries`` metric by model, reason and schedule, and the
version's failure stays listed (ModelReady, ModelMetadata, readiness) with its reason meanwhile,
its retry's load included (ModelMetadata: "loading again after its last load failed (REASON)").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from strongroom.client.cancel import CallScope, scoped
from strongroom.errors import Aborted, DataLoss, StrongroomError
from strongroom.inference.config import ModelRef
from strongroom.inference.loader import ModelBusy, ModelLoader, transient
from strongroom.inference.models import (
    REPEAT_LOG_SECONDS,
    ModelNotFound,
    ModelRepository,
    ModelState,
    ModelUnloaded,
    RetryWatch,
)
from strongroom.reasons import Reason
from strongroom.runtime.metrics import MODEL_LOAD_RETRIES

log = logging.getLogger(__name__)

NEEDS_OUR_CONFIGURATION = frozenset(
    {
        Reason.RELEASE_SIGNING_KEY_UNKNOWN,
        Reason.RELEASE_UNSIGNED,
    }
)
"""Failures no retry can mend: the broker's answer was signed by a key this server does not
trust, or not signed at all (``inference.release_signing_public_keys``,
``allow_unsigned_releases``), which only a new configuration (a restart) changes; and each try
costs the broker an ``ALLOWED`` audit record, which no refusal budget limits."""


ARTIFACT_REFUSALS = frozenset(
    {
        Reason.ARTIFACT_TOO_LARGE,
        Reason.HEADER_PIN_MISMATCH,
        Reason.MODEL_GRAPH_TOO_LARGE,
        Reason.MODEL_INVALID,
        Reason.MODEL_OPERATOR_UNCAPPED,
        Reason.MODEL_SIGNATURE_INVALID,
        Reason.MODEL_SIGNATURE_MISSING,
        Reason.MODEL_STRING_EXPANSION,
        Reason.MODEL_UNSUPPORTED_DATATYPE,
    }
)
"""Refusals of a stored artifact by this server's configuration (its pin, size cap, model
checks, signature policy): the same artifact is refused the same way until one of them
changes, and most come only once it is downloaded and decrypted."""


def refuses_the_artifact(exc: StrongroomError) -> bool:
    """Whether ``exc`` was a failure of the stored artifact itself (``DATA_LOSS``, or one of
    :data:`ARTIFACT_REFUSALS`), which only another artifact (or configuration) changes."""
    return isinstance(exc, DataLoss) or exc.reason in ARTIFACT_REFUSALS


STAT_TIMEOUT_SECONDS = 15.0
"""How long the store has to answer the StatModel before each attempt."""


@dataclasses.dataclass(frozen=True)
class RetrySchedule:
    """When failed loads of the configured models are tried again (seconds); ``slow_initial``
    0: failures that are not transient are not retried."""

    soon_initial: float = 1.0
    soon_max: float = 60.0
    slow_initial: float = 30.0
    slow_max: float = 300.0

    def retried(self, exc: StrongroomError) -> str | None:
        """How a load that failed with ``exc`` is retried: ``soon``, ``slowly`` or None."""
        if transient(exc):
            return "soon"
        if self.slow_initial <= 0 or exc.reason in NEEDS_OUR_CONFIGURATION:
            return None
        if isinstance(exc, ModelUnloaded | Aborted) or exc.reason == Reason.LOAD_CANCELLED:
            return None
        return "slowly"


def spread(delay: float) -> float:
    """A wait for ``delay``: between it and half as long again (never shorter, so the retries'
    rate stays within what ``delay`` promises; spread, so a fleet's do not come together)."""
    return delay * random.uniform(1.0, 1.5)  # noqa: S311 - spreading, not a secret


@dataclasses.dataclass
class _Version:
    """One configured version's retries."""

    ref: ModelRef
    due: float = 0.0  # time.monotonic() of its next attempt
    tried: bool = False
    soon: float = 0.0  # the next delay of each schedule (0: not begun)
    slow: float = 0.0
    reason: str | None = None  # the last failure's
    # The store's entry for the version before the attempt its artifact failed
    # (refuses_the_artifact), and
    # that failure's reason: no attempt is made while the entry stays the same.
    refused: tuple[bytes, str] | None = None
    # When each reason was last logged in full, and its failures since (not logged).
    logged_at: dict[str, float] = dataclasses.field(default_factory=dict)
    unlogged: dict[str, int] = dataclasses.field(default_factory=dict)
    # Marked by an unload of the version (or its model) while run() retries it.
    watch: RetryWatch = dataclasses.field(default_factory=RetryWatch)

    @property
    def label(self) -> str:
        return f"{self.ref.name}/{self.ref.version}"


class ConfiguredLoads:
    """Runs the loads of ``models`` until each has loaded, been unloaded, failed for good, or
    ``stopping`` is set; ``scope`` (cancelled with the server) ends a load where it is."""

    def __init__(
        self,
        loader: ModelLoader,
        repository: ModelRepository,
        models: Sequence[ModelRef],
        *,
        schedule: RetrySchedule,
        scope: CallScope,
        stopping: threading.Event,
        wait: Callable[[float], float] = spread,
    ) -> None:
        self._loader = loader
        self._repository = repository
        self._pending = [_Version(ref) for ref in models]
        self._configured = frozenset((ref.name, ref.version) for ref in models)
        self._schedule = schedule
        self._scope = scope
        self._stopping = stopping
        self._wait = wait
        self._own: frozenset[RetryWatch] = frozenset()  # run()'s retrying() blocks' watches

    def run(self) -> None:
        """Loads until nothing is left to retry, or the server stops."""
        # Their failures stay listed while retried (the cap would make them read as unloaded),
        # and each one's watch tells an unload of it since the retries began.
        with contextlib.ExitStack() as retried:
            for version in self._pending:
                ref = version.ref
                version.watch = retried.enter_context(
                    self._repository.retrying(ref.name, ref.version)
                )
            self._own = frozenset(version.watch for version in self._pending)
            self._run()

    def _run(self) -> None:
        while self._pending and not self._stopping.is_set():
            now = time.monotonic()
            for version in [v for v in self._pending if v.due <= now]:
                if self._stopping.is_set():
                    return
                if not self._attempt(version):
                    self._pending.remove(version)
            if self._pending:
                self._stopping.wait(max(0.0, min(v.due for v in self._pending) - time.monotonic()))

    def _attempt(self, version: _Version) -> bool:
        """Tries ``version`` once; whether it is to be tried again."""
        ref = version.ref
        # The first attempt too: it waited for the model's lock behind an operator's LoadModel
        # of the version and then loaded it again (a second download and key release).
        # Postponed rather than waiting for that load's outcome: this one thread runs every
        # configured model's loads, and the look after it asks whether it loaded the version.
        if self._loading_elsewhere(ref):
            return self._postponed(version)
        still_wanted = self._still_wanted(version)
        if not still_wanted():
            log.info(
                "model %s was unloaded or loaded (or another version of it) meanwhile: no "
                "longer retried",
                version.label,
            )
            return False
        # Asked before the attempt: an entry that changes during it is then never taken for
        # the one whose artifact failed.
        entry = self._stored(ref)
        if self._stopping.is_set():
            return False
        if version.refused is not None and entry == version.refused[0]:
            return self._unchanged(version)
        if self._loading_elsewhere(ref):  # a LoadModel came during the StatModel
            return self._postponed(version)
        # Asked again once registered where an unload aborts it, and once it holds the lock
        # (ModelLoader.load's retry_of).
        version.tried = True
        try:
            self._loader.load(
                ref.name,
                ref.version,
                header_sha256=ref.pin,
                scope=self._scope,
                retry_of=still_wanted,
                wait=False,
            )
        except ModelBusy:  # a load of the model began since _loading_elsewhere looked
            return self._postponed(version)
        except ModelUnloaded:
            log.info(
                "model %s was unloaded or loaded (or another version of it) meanwhile: no "
                "longer retried",
                version.label,
            )
            return False
        except StrongroomError as exc:
            if self._stopping.is_set():
                log.info("model %s: load stopped, the server is shutting down", version.label)
                return False
            if refuses_the_artifact(exc):
                version.refused = None if entry is None else (entry, exc.reason)
            elif not transient(exc):
                version.refused = None
            return self._failed(version, exc)
        except Exception:  # one model's bug must not leave the rest unloaded
            log.exception("model %s not loaded: unexpected error", version.label)
            return False
        if version.reason is not None:
            log.info("model %s loaded after failing with %s", version.label, version.reason)
        return False

    def _stored(self, ref: ModelRef) -> bytes | None:
        """The store's entry for ``ref`` (its ModelInfo), or its refusal of the StatModel (an
        entry it cannot read, a version it does not hold); None if it could not be asked."""
        try:
            with scoped(self._scope):
                info = self._loader.stat(ref.name, ref.version, timeout=STAT_TIMEOUT_SECONDS)
        except StrongroomError as exc:
            if transient(exc) or self._scope.cancelled:
                return None
            return f"{type(exc).__name__} {exc.reason}".encode()
        return info.SerializeToString(deterministic=True)

    def _unchanged(self, version: _Version) -> bool:
        """Schedules the next look at a version whose artifact failed (refuses_the_artifact) and whose
        store entry has not changed since: nothing downloaded, no key asked for."""
        assert version.refused is not None
        reason = version.refused[1]
        schedule = self._schedule
        version.slow = min(version.slow * 2, schedule.slow_max) or schedule.slow_initial
        version.due = time.monotonic() + self._wait(version.slow)
        MODEL_LOAD_RETRIES.add(
            1, {"model": version.ref.name, "reason": reason, "retry": "unchanged"}
        )
        log.debug(
            "stored artifact unchanged",
            extra={"model": version.ref.name, "version": version.ref.version, "reason": reason},
        )
        return True

    def _loading_elsewhere(self, ref: ModelRef) -> bool:
        """Whether another load of ``ref``'s model (an operator's LoadModel, of this version or
        another) is under way now: loading, or waiting out its back-off (taking the free lock
        then, the configured load loaded the version and the LoadModel's next attempt loaded
        it again: a second download and key release)."""
        return (
            self._loader.busy(ref.name)
            or self._repository.version_state(ref.name, ref.version) is ModelState.LOADING
            or any(w not in self._own for w in self._repository.retry_watches(ref.name))
        )

    def _postponed(self, version: _Version) -> bool:
        """Looks at ``version`` again soon, without an attempt: another load of its model is
        under way, whose outcome decides whether the retry goes on (it failed) or ends (it loaded
        the version, or one the configuration does not list). Not waited for here: this one
        thread runs every configured model's retries."""
        version.due = time.monotonic() + self._wait(self._schedule.soon_initial)
        log.debug(
            "model %s is being loaded by another load: retried if that one fails", version.label
        )
        return True

    def _still_wanted(self, version: _Version) -> Callable[[], bool]:
        """Whether ``version``'s load is still wanted: no operator has unloaded it (or its model)
        since its retries began (a LoadModel after the unload that failed lists it FAILED
        again: the unload still ends them); it is not loaded (an operator's LoadModel); once
        tried, its failure is listed or another load of it is under way (an operator's
        LoadModel begun since the retry looked: the retry finds the model's lock taken, and
        looks again once that load has ended); and no version the configuration does not list
        serves the model (an operator's LoadModel of another version: a retry that loaded this
        one later made it the default again)."""
        ref, tried = version.ref, version.tried

        def still_wanted() -> bool:
            if version.watch.unloaded:
                return False
            state = self._repository.version_state(ref.name, ref.version)
            if state is ModelState.READY or (tried and state is None):
                return False
            try:
                serving = self._repository.status(ref.name).default_version
            except ModelNotFound:
                return False
            return serving is None or (ref.name, serving) in self._configured

        return still_wanted

    def _failed(self, version: _Version, exc: StrongroomError) -> bool:
        how = self._schedule.retried(exc)
        if how is None:
            if isinstance(exc, Aborted):
                log.info("model %s not loaded: %s", version.label, exc)
            elif exc.reason in NEEDS_OUR_CONFIGURATION:
                log.error(
                    "model %s not loaded, and not retried (only this server's configuration "
                    "can change it): %s",
                    version.label,
                    exc,
                    extra={"reason": exc.reason},
                )
            else:
                log.error(
                    "model %s not loaded: %s", version.label, exc, extra={"reason": exc.reason}
                )
            return False
        schedule = self._schedule
        if how == "soon":
            delay = version.soon = (
                schedule.soon_initial
                if not version.soon
                else min(version.soon * 2, schedule.soon_max)
            )
        else:
            delay = version.slow = (
                schedule.slow_initial
                if not version.slow
                else min(version.slow * 2, schedule.slow_max)
            )
        wait = self._wait(delay)
        version.due = time.monotonic() + wait
        MODEL_LOAD_RETRIES.add(1, {"model": version.ref.name, "reason": exc.reason, "retry": how})
        self._log_failure(version, exc, how, wait)
        return True

    def _log_failure(self, version: _Version, exc: StrongroomError, how: str, wait: float) -> None:
        """Logs ``exc`` unless its reason was logged less than :data:`REPEAT_LOG_SECONDS` ago
        (whatever came between: a reason that flips, A, B, A, B, was logged every time); counts
        it otherwise."""
        now = time.monotonic()
        reason = version.reason = exc.reason
        last = version.logged_at.get(reason)
        if last is not None and now - last < REPEAT_LOG_SECONDS:
            version.unlogged[reason] = version.unlogged.get(reason, 0) + 1
            return
        level = logging.WARNING if how == "soon" else logging.ERROR
        not_logged = version.unlogged.pop(reason, 0)
        extra = {"reason": reason, "retry": how, "failures_not_logged": not_logged}
        log.log(
            level,
            "model %s not loaded: %s; retrying %s, in %.0fs",
            version.label,
            exc,
            how,
            wait,
            extra=extra,
        )
        version.logged_at[reason] = now
