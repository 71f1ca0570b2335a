"""Loading a model inside the confidential VM: fetch, attest, release, decrypt in memory, serve.

The artifact streams from the model store into a decryptor that decrypts each piece on the
receiving thread as it arrives (:func:`strongroom.artifact.decrypt_download`; ``decrypt_threads``
adds workers, which AES-GCM's hold on the interpreter lock makes slower here). As soon as the
header is in, the data key is obtained from the key broker by attested release
(:mod:`strongroom.client.keyrelease`) on another thread while the download goes on, and the
plaintext buffer is faulted in meanwhile. The plaintext exists only in one in-memory buffer that
ONNX Runtime loads from and that is then discarded (its pages handed back to the kernel, which
reads them as zeros). A failure at any step leaves the model NOT ready, with the reason recorded for
ModelReady/metadata and the logs.

**How peers' failures reach the caller.** The reason is the peer's own, read from its
``strongroom-reason`` trailer (never parsed out of the message text). The status is kept where it
says something about the model or the dependency: ``DATA_LOSS`` (the store's ``BLOB_MISSING``,
``BLOB_SIZE_MISMATCH``, ...), ``UNAVAILABLE``/``DEADLINE_EXCEEDED``/``CANCELLED`` (an outage,
:data:`~strongroom.client.remote.TRANSIENT`, answered ``UNAVAILABLE``: the loader cancels its own
calls only when its LoadModel caller has gone, and then reports that instead, so a CANCELLED is a
peer shutting down; and a peer's call out of time, ``DeadlineExceeded`` from the fetch library as
from the publisher, is a dependency too slow, not the LoadModel caller's deadline),
``NOT_FOUND`` and ``RESOURCE_EXHAUSTED``. Any other refusal (the broker's ``PERMISSION_DENIED``
for a VM outside the policy, ``FAILED_PRECONDITION`` for a disabled key, ...) becomes
``FAILED_PRECONDITION`` with the peer's reason: the LoadModel caller itself was not refused. An
artifact that arrives malformed (truncated, extended, bad framing) is stored data gone wrong, so
it is ``DATA_LOSS`` with the artifact reader's reason, like a failed authentication.

**Retries.** :meth:`ModelLoader.load_with_retry` retries a load that failed with ``UNAVAILABLE``
(store, broker, HSM or collateral briefly unreachable), or ``RESOURCE_EXHAUSTED``
``TOO_MANY_UNARY_CALLS_PER_IDENTITY``, ``TOO_MANY_WORKERS_PER_IDENTITY`` or
``TOO_MANY_CALLS_PER_CERTIFICATE`` (the broker or the store busy with this identity's, or this
certificate's, other calls and streams), ``TOO_MANY_STREAMS_PER_IDENTITY``,
``TOO_MANY_STREAMS_PER_CERTIFICATE`` or ``TOO_MANY_STREAMS`` (the store's streams of this identity,
of this certificate, or in all, taken), ``DATA_PLANE_WORKERS_BUSY`` (a peer's data-plane workers all
busy) or ``RELEASES_RATE_LIMITED`` (the broker's grant budget for this certificate or identity
spent for now), with
exponential back-off until a deadline; nothing else is retried (a denied release or a damaged
artifact needs an operator). Configured models retry without a deadline (see the server);
LoadModel retries within :data:`LOAD_RETRY_SECONDS` or the caller's own deadline, whichever is
sooner, and the caller's deadline or cancellation also ends the load itself (its wait for another
load of the model, its download, its key release: :class:`~strongroom.client.cancel.CallScope`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import DEFAULT_DECRYPT_THREADS, ArtifactHeader, decrypt_download, wipe
from strongroom.artifact.errors import InvalidArtifact
from strongroom.artifact.keybinding import body_key
from strongroom.artifact.manifest import is_manifest
from strongroom.client.busy import BUSY_REFUSALS
from strongroom.client.cancel import CallScope, call_unary, current_scope, scoped
from strongroom.client.fetch import (
    DEFAULT_PARALLEL_PARTS,
    ModelFetcher,
    check_artifact_header,
    grpc_source,
)
from strongroom.client.keypins import KeyPins
from strongroom.client.keyrelease import KeyReleaseClient, ReleasedDataKey, releasing_for
from strongroom.client.remote import OUTAGES, remote_error
from strongroom.errors import (
    Aborted,
    Cancelled,
    DataLoss,
    ResourceExhausted,
    StrongroomError,
    Unavailable,
)
from strongroom.inference.models import ModelRepository, ModelUnloaded, RetryWatch, VersionStatus
from strongroom.inference.multipart import load_multipart
from strongroom.inference.signature import SignaturePolicy
from strongroom.reasons import Reason
from strongroom.runtime.metrics import MODEL_LOAD_DURATION

log = logging.getLogger(__name__)

#: Reasons used when a peer sent none (a peer that is not Strongroom, or a transport failure).
#: How long LoadModel keeps retrying a load that failed with UNAVAILABLE (seconds).
LOAD_RETRY_SECONDS = 30.0


def transient(exc: BaseException) -> bool:
    """Whether a load (or a call to a peer) that failed with ``exc`` may succeed if retried: a
    dependency's outage, of any class :data:`~strongroom.client.remote.OUTAGES` lists (a load
    answers each as ``Unavailable``, :func:`_ended`; a peer's call out of time the fetch library
    raises ``DeadlineExceeded``, the loader's StatModel before a configured model's retry
    included), or a peer busy with this identity's other calls
    (:data:`~strongroom.client.busy.BUSY_REFUSALS`)."""
    if isinstance(exc, ResourceExhausted):
        return exc.reason in BUSY_REFUSALS
    return isinstance(exc, OUTAGES)


_RETRY_FIRST_DELAY = 0.2
_RETRY_MAX_DELAY = 5.0


@dataclass
class LoadResult:
    """A completed load: timings per step (seconds) and the key release's audit decision."""

    timings: dict[str, float] = field(default_factory=dict)
    decision_id: str = ""


class ModelBusy(Unavailable):
    """Another load of the model holds its lock, or waits to take it (:meth:`ModelLoader.load`
    without ``wait``).
    Raised here only, never made from a peer's answer: a store or broker sending this reason
    does not make a configured retry look again every second."""

    default_reason = Reason.MODEL_LOAD_IN_PROGRESS


class ModelLoader:
    """Loads model versions into a :class:`ModelRepository`; one load per model at a time.

    ``version_pins`` are the configured pins (``inference.models[].header_sha256``) by (name,
    version): a load of such a version that names no pin of its own is held to it (see
    :meth:`load`)."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        store_channel: grpc.Channel,
        key_release: KeyReleaseClient,
        tracer_provider: TracerProvider | None = None,
        decrypt_threads: int = DEFAULT_DECRYPT_THREADS,
        timeout: float = 600.0,
        signature: SignaturePolicy | None = None,
        parallel_parts: int = DEFAULT_PARALLEL_PARTS,
        max_model_bytes: int | None = None,
        accept_unbound: bool = False,
        key_pins: KeyPins | None = None,
        version_pins: Mapping[tuple[str, str], bytes] | None = None,
    ) -> None:
        self._repository = repository
        self._version_pins = dict(version_pins or {})
        self._accept_unbound = accept_unbound
        self._pins = key_pins or KeyPins()
        self._max_model_bytes = max_model_bytes
        self._store = store_grpc.ModelStoreServiceStub(store_channel)
        self._store_channel = store_channel
        self._release = key_release
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._threads = decrypt_threads
        self._timeout = timeout
        self._signature = signature
        # Multi-part models (a manifest and its parts): see strongroom.inference.multipart.
        self._fetcher = ModelFetcher(
            store_channel,
            self._release_key,
            parallel=parallel_parts,
            decrypt_threads=decrypt_threads,
            timeout=timeout,
            accept_unbound=accept_unbound,
            key_pins=self._pins,
            max_model_bytes=max_model_bytes,
        )
        self._locks: dict[str, ModelLock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, name: str) -> ModelLock:
        """``name``'s lock, counted as in use until :meth:`_done_with` (the table keeps a lock
        only while a load holds or waits for it: one per name ever asked for, the names of
        models that do not exist included, grew it without limit)."""
        with self._locks_guard:
            lock = self._locks.setdefault(name, ModelLock())
            lock.users += 1
            return lock

    def _done_with(self, name: str, lock: ModelLock) -> None:
        with self._locks_guard:
            lock.users -= 1
            if lock.users <= 0 and self._locks.get(name) is lock:
                del self._locks[name]

    def lock_names(self) -> tuple[str, ...]:
        """The models whose load lock a load holds or waits for now."""
        with self._locks_guard:
            return tuple(self._locks)

    def load(
        self,
        name: str,
        version: str,
        *,
        scope: CallScope | None = None,
        header_sha256: bytes | None = None,
        retry_of: Callable[[], bool] | None = None,
        wait: bool = True,
    ) -> LoadResult:
        """Loads ``name``/``version`` and makes it the default version; raises on failure.

        ``wait`` False: :class:`ModelBusy` at once, nothing loaded, if another load of the model
        holds its lock or is registered to take it (a configured model's load: its one thread
        must not wait out another's load, nor take the lock from under an operator's LoadModel
        about to take it, which would then wait for this load and load the version again).

        ``retry_of`` marks a load another may overtake (a configured model's, its first attempt
        included, or a LoadModel's after a back-off): whether the version still waits for it
        (the caller's to say: a configured model's, that it was not loaded, unloaded, nor
        served by another version meanwhile; a LoadModel's, only that it was not unloaded: an
        explicit load reloads), asked once the load is registered where an unload aborts it, and again once it has the
        model's lock (another load of the model may have loaded the version, or another); if
        not, ModelUnloaded and nothing is loaded. Asked before registering, an
        unload between the question and the registration reached neither, and the retry loaded
        the version again after the unload had returned.

        ``header_sha256`` pins the artifact: the SHA-256 of its authenticated header (a multi-part
        model's manifest's), as ``model publish`` prints it. The header binds the creation time,
        so another artifact of the same name and version (an older one, deleted and published
        again) is refused (FAILED_PRECONDITION HEADER_PIN_MISMATCH) before its key is requested.
        Without one, a version configured with a pin (``version_pins``) is held to that pin: a
        LoadModel naming no pin (an operator reloading a configured model that failed) loaded
        whatever artifact the store served for it, the one its configuration refuses included.
        A pin the caller names is its own choice and is used instead.

        ``scope`` (a LoadModel caller's: :class:`~strongroom.client.cancel.CallScope`) ends the
        load when its caller cancels or its deadline passes: the wait for another load of the
        model, the store's download and the key release stop where they are (every call to the
        store and the broker is bounded by the deadline and cancelled with the scope), what was
        decrypted is wiped, a key that arrives later is wiped too, the version is recorded FAILED
        with ``LOAD_CANCELLED`` or ``LOAD_DEADLINE_EXCEEDED``, and any version already serving
        goes on serving; rather than the work going on for a caller that is no longer there
        (holding a server thread and the model's lock, up to the load timeout).
        """
        scope = scope if scope is not None else CallScope()
        if header_sha256 is None:
            header_sha256 = self._version_pins.get((name, version))
        lock = self._lock(name)
        ticket = lock.enter(version)
        try:
            if retry_of is not None and not retry_of():
                raise ModelUnloaded(
                    f"model {name!r} version {version!r} was unloaded (or loaded) while its load "
                    "waited to be retried"
                )
            if not lock.acquire(scope, ticket, wait=wait):
                if ticket.aborted:
                    raise _aborted(name, version)
                if scope.cancelled:
                    raise scope.error()
                if not wait:
                    raise ModelBusy(f"model {name!r} is being loaded by another load")
                raise Unavailable(
                    f"model {name!r} is still being loaded by an earlier request",
                    reason=Reason.MODEL_LOAD_IN_PROGRESS,
                )
            try:
                # Asked again once the lock is ours: the retry may have waited behind another
                # load of the model (an operator's LoadModel) that has loaded the version (or
                # another one) meanwhile; it goes on only if that load failed.
                if retry_of is not None and not retry_of():
                    raise ModelUnloaded(
                        f"model {name!r} version {version!r} was loaded (or unloaded) by another "
                        "load while its retry waited for it"
                    )
                with scoped(scope):
                    return self._load_locked(name, version, scope, header_sha256, ticket)
            finally:
                lock.release()
        finally:
            ticket.leave()
            self._done_with(name, lock)

    def busy(self, name: str) -> bool:
        """Whether a load of ``name`` holds its lock now."""
        with self._locks_guard:
            lock = self._locks.get(name)
        return lock is not None and lock.locked

    def abort_queued(self, name: str, version: str | None = None) -> int:
        """Aborts the loads of ``name`` (``version``, or every version) that have not begun yet:
        those waiting for the model's lock behind another load, and one that has just taken it.
        Each answers ABORTED ``LOAD_ABORTED_BY_UNLOAD`` and loads nothing. What UnloadModel does
        before it unloads: otherwise a queued load, once the running one ended, loaded the
        version again right after the unload had returned. A load of it that has begun is
        stopped where it is (its download and key release cancelled, what it decrypted wiped)
        and fails ``MODEL_UNLOADED``: it went on, released the key (audited) and decrypted the
        model after the unload had returned, only to discard it. Returns how many had not begun."""
        with self._locks_guard:
            lock = self._locks.get(name)
        return 0 if lock is None else lock.abort(version)

    def queued(self, name: str) -> tuple[str, ...]:
        """The versions of ``name`` whose loads wait for its lock or are about to begin."""
        with self._locks_guard:
            lock = self._locks.get(name)
        return () if lock is None else lock.queued()

    def _load_locked(
        self, name: str, version: str, scope: CallScope, pin: bytes | None, ticket: _Ticket
    ) -> LoadResult:
        with self._tracer.start_as_current_span(
            "strongroom.inference.load_model",
            attributes={"model.name": name, "model.version": version},
        ) as span:
            loading = self._repository.begin_load(name, version)
            # From here on an unload reaches this load through the repository (its begin_load
            # is what the unload removes) and through the load's own scope, which it cancels:
            # the download and key release stop where they are, rather than obtaining (and
            # having audited) a key for a version nobody will serve. An unload that came before
            # has marked the ticket.
            caller, scope = scope, CallScope(scope.deadline)
            detach = caller.on_cancel(scope.cancel)
            try:
                if not ticket.begin(scope):
                    self._repository.withdraw(name, version, loading)
                    raise _aborted(name, version)
                with scoped(scope):
                    return self._load_begun(
                        name, version, loading, scope=scope, pin=pin, ticket=ticket, span=span
                    )
            finally:
                detach()
                ticket.leave()

    def _load_begun(
        self,
        name: str,
        version: str,
        loading: VersionStatus,
        *,
        scope: CallScope,
        pin: bytes | None,
        ticket: _Ticket,
        span: trace.Span,
    ) -> LoadResult:
        """The load once begun: download, key release, decryption, session (and its outcome)."""
        started = time.perf_counter()
        try:
            scope.raise_if_ended()
            with releasing_for(name, version):  # named if the broker's answer is refused
                result = self._load(name, version, loading, scope.timeout(self._timeout), pin)
        except (StrongroomError, grpc.FutureCancelledError) as raised:
            if ticket.unloaded:
                # An unload stopped it (the repository has dropped, or is dropping, it).
                MODEL_LOAD_DURATION.record(
                    time.perf_counter() - started,
                    {"model": name, "outcome": Reason.MODEL_UNLOADED},
                )
                span.set_attribute("error.reason", Reason.MODEL_UNLOADED)
                self._repository.withdraw(name, version, loading)
                raise _unloaded_while_loading(name, version) from None
            # A step that failed because the scope ended (its call cancelled, or timed out at
            # the deadline) reports that, not the peer's UNAVAILABLE: it is not retried, and
            # the version's state says why it stopped.
            exc = _ended(scope, raised)
            MODEL_LOAD_DURATION.record(
                time.perf_counter() - started, {"model": name, "outcome": exc.reason}
            )
            span.set_attribute("error.reason", exc.reason)
            self._repository.fail(name, version, exc, loading=loading)
            if exc is raised:
                raise
            raise exc from None
        except Exception as exc:  # a bug must still leave the model not ready, with a reason
            log.exception("model load crashed")
            self._repository.fail(
                name,
                version,
                StrongroomError(f"internal error: {type(exc).__name__}"),
                loading=loading,
            )
            raise
        MODEL_LOAD_DURATION.record(
            time.perf_counter() - started, {"model": name, "outcome": "loaded"}
        )
        for step, seconds in result.timings.items():
            span.set_attribute(f"timing.{step}", seconds)
        log.info(
            "model loaded",
            extra={
                "model": name,
                "version": version,
                "timings": result.timings,
                "decision_id": result.decision_id,
            },
        )
        return result

    def stat(self, name: str, version: str, *, timeout: float) -> store_pb.ModelInfo:
        """The store's entry for ``name``/``version`` (StatModel: its claim, which nothing here
        authenticates), within the current scope; the store's refusal as a StrongroomError."""
        try:
            return call_unary(
                self._store.StatModel,
                store_pb.StatModelRequest(name=name, version=version),
                timeout=timeout,
            ).model
        except grpc.RpcError as exc:
            raise remote_error("fetch", exc) from None

    def _is_multipart(self, name: str, version: str, timeout: float) -> bool:
        """Whether the store holds a manifest for ``name``/``version`` (its claim; the fetch
        authenticates the manifest's header before trusting anything in it)."""
        return is_manifest(self.stat(name, version, timeout=timeout).content_type)

    def _load_multipart(
        self, name: str, version: str, loading: VersionStatus, timeout: float, pin: bytes | None
    ) -> LoadResult:
        timings, decision_id = load_multipart(
            self._repository,
            self._fetcher,
            name,
            version,
            signature=self._signature,
            loading=loading,
            fetching=self._release.deferring_key_generation(),
            timeout=timeout,
            header_sha256=pin,
        )
        return LoadResult(timings=timings, decision_id=decision_id)

    def load_with_retry(
        self,
        name: str,
        version: str,
        *,
        within: float = LOAD_RETRY_SECONDS,
        scope: CallScope | None = None,
        header_sha256: bytes | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> LoadResult:
        """:meth:`load`, retried with exponential back-off while it fails with ``Unavailable`` or a
        peer is busy (:func:`transient`), for at most ``within`` seconds; then (or for any other
        failure) the last error is raised.
        An unload of the version (or of its model) during a back-off ends the retries, whatever
        came after it (another LoadModel of it that failed): ``ModelUnloaded``.
        ``scope`` ends each load and the back-off, and ``header_sha256`` pins its artifact (see
        :meth:`load`); ``sleep`` replaces the back-off's wait (which a cancellation ends)."""
        scope = scope if scope is not None else CallScope()
        wait = sleep if sleep is not None else _cancellable_sleep(scope)
        # Its failure stays listed while it waits (the cap would make it read as unloaded).
        with self._repository.retrying(name, version) as watch:
            return self._retry_loop(
                name,
                version,
                scope=scope,
                header_sha256=header_sha256,
                within=within,
                wait=wait,
                watch=watch,
            )

    def _retry_loop(
        self,
        name: str,
        version: str,
        *,
        scope: CallScope,
        header_sha256: bytes | None,
        within: float,
        wait: Callable[[float], None],
        watch: RetryWatch,
    ) -> LoadResult:
        retry_until = time.monotonic() + within
        delay = _RETRY_FIRST_DELAY
        retrying = False

        def still_wanted() -> bool:
            # Not whether the version is listed: an unload during a back-off followed by
            # another LoadModel of it that failed lists it FAILED again, and this retry then
            # loaded it behind the operator's unload.
            return not watch.unloaded

        while True:
            if retrying and scope.cancelled:
                raise scope.error()
            retry_of = still_wanted if retrying else None
            retrying = True
            try:
                return self.load(
                    name, version, scope=scope, header_sha256=header_sha256, retry_of=retry_of
                )
            except StrongroomError as exc:  # transient's one rule says which are retried
                left = retry_until - time.monotonic()
                if not transient(exc) or left <= delay:
                    raise
                log.warning(
                    "model %s/%s: %s; retrying in %.1fs",
                    name,
                    version,
                    exc,
                    delay,
                    extra={"reason": exc.reason},
                )
                wait(delay)
                delay = min(delay * 2, _RETRY_MAX_DELAY)

    def _load(
        self, name: str, version: str, loading: VersionStatus, timeout: float, pin: bytes | None
    ) -> LoadResult:
        try:
            if self._is_multipart(name, version, timeout):
                return self._load_multipart(name, version, loading, timeout, pin)
            return self._load_artifact(name, version, loading, timeout, pin)
        except InvalidArtifact as exc:
            # The bytes came from the store (a single artifact, or a manifest and its parts): a
            # malformed artifact here is stored data gone bad, not an invalid LoadModel request.
            raise DataLoss(
                f"the stored artifact is damaged: {exc.message}", reason=exc.reason
            ) from None

    def _load_artifact(
        self, name: str, version: str, loading: VersionStatus, timeout: float, pin: bytes | None
    ) -> LoadResult:
        def check_header(header: ArtifactHeader) -> None:
            check_artifact_header(header, name, version, key_pins=self._pins, header_sha256=pin)

        def release(header: ArtifactHeader) -> ReleasedDataKey:
            released = self._release_key(header.key_id, header.key_version, header.wrapped_dek)
            # The body opens only under the key bound to the model asked for (format 3).
            try:
                bound = body_key(
                    header, released.dek, name, version, accept_unbound=self._accept_unbound
                )
            finally:
                wipe(released.dek)
            return replace(released, dek=bound)

        # The next ephemeral key is made once the download is in, beside ONNX Runtime's load
        # (which keeps one core busy), not beside the download and decryption (both cores).
        # The key release runs on a thread of its own while the download goes on: a download
        # that fails meanwhile (the store's error, a damaged stream) cancels it in this scope of
        # its own, so that no key is released (and audited as released) for a load already
        # failed. The load's scope (its caller's cancellation and deadline) ends it too.
        load_scope = current_scope()
        attempt = CallScope(load_scope.deadline if load_scope is not None else None)
        detach = load_scope.on_cancel(attempt.cancel) if load_scope is not None else None
        try:
            with self._release.deferring_key_generation(), scoped(attempt):
                artifact = decrypt_download(
                    grpc_source(self._store_channel, timeout=timeout)(name, version),
                    release,
                    check_header=check_header,
                    threads=self._threads,
                    # Judged on the header, before the key is released or the buffer reserved.
                    max_artifact_size=self._max_model_bytes,
                )
        except BaseException:
            attempt.cancel()
            raise
        finally:
            if detach is not None:
                detach()
        # The plaintext lives only in the artifact's buffer, which ONNX Runtime loads from (bytes,
        # no copy) and which reads as zeros once this block is left (its pages are dropped).
        with artifact:
            self._check_signature(artifact.header, artifact.plaintext)
            result = LoadResult(dict(artifact.timings), artifact.key.decision_id)
            fetched = time.perf_counter()
            self._repository.load(name, version, artifact.plaintext, loading=loading)
            result.timings["load"] = time.perf_counter() - fetched
        return result

    def _check_signature(self, header: ArtifactHeader, plaintext: bytes | bytearray) -> None:
        if self._signature is not None:
            self._signature.check(
                header.signature_bundle, header.signature_bundle_media_type, plaintext
            )
        elif header.signature_bundle:
            log.info("model carries a signature, but no signing key is configured to verify it")

    def _release_key(self, key_id: str, key_version: int, wrapped: bytes) -> ReleasedDataKey:
        try:
            return self._release.release(key_id, key_version, wrapped)
        except grpc.RpcError as exc:
            scope = current_scope()
            if scope is not None and scope.ended:
                raise scope.error() from None
            raise remote_error("key release", exc) from None


class ModelLock:
    """One model's load lock, whose wait a :class:`CallScope` ends: at its deadline (False) or
    when it is cancelled (False, at once: a waiter is woken by the cancellation)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._held = False
        self._tickets: list[_Ticket] = []
        self._running: _Ticket | None = None  # the load that has begun (it holds the lock)
        self.users = 0
        """Loads holding or waiting for it (the loader's to count, under its table's guard)."""

    @property
    def locked(self) -> bool:
        """Whether a load holds it."""
        return self._held

    def enter(self, version: str) -> _Ticket:
        """Registers a load of ``version`` that has not begun: :meth:`abort` reaches it until
        its :meth:`_Ticket.leave`."""
        ticket = _Ticket(self, version)
        with self._condition:
            self._tickets.append(ticket)
        return ticket

    def abort(self, version: str | None) -> int:
        """Marks the registered loads of ``version`` (None: all) aborted and wakes them."""
        with self._condition:
            hit = [t for t in self._tickets if version is None or t.version == version]
            for ticket in hit:
                ticket.aborted = True
            running = self._running
            stop = running is not None and (version is None or running.version == version)
            if stop:
                assert running is not None
                running.unloaded = True
            self._condition.notify_all()
        # Outside the condition: the scope's callbacks cancel calls and wake waiters.
        if stop and running is not None and running.scope is not None:
            running.scope.cancel()
        return len(hit)

    def queued(self) -> tuple[str, ...]:
        """The versions of the registered loads, in the order they came."""
        with self._condition:
            return tuple(t.version for t in self._tickets)

    def _leave(self, ticket: _Ticket) -> None:
        with self._condition:
            if ticket in self._tickets:
                self._tickets.remove(ticket)
            if self._running is ticket:
                self._running = None

    def _begin(self, ticket: _Ticket, scope: CallScope) -> bool:
        with self._condition:
            if ticket in self._tickets:
                self._tickets.remove(ticket)
            if ticket.aborted:
                return False
            ticket.scope = scope
            self._running = ticket
            return True

    def acquire(
        self, scope: CallScope | None = None, ticket: _Ticket | None = None, *, wait: bool = True
    ) -> bool:
        """Takes the lock; False if ``scope`` ended first (without a scope, waits for ever),
        ``ticket`` was aborted, or, without ``wait``, another load holds it or is registered to
        take it (a load that does not wait gives way to one that does)."""
        scope = scope if scope is not None else CallScope()
        with self._condition:
            if not wait and any(t is not ticket for t in self._tickets):
                return False
            remove = scope.on_cancel(self._wake)
            try:
                while self._held:
                    if not wait:
                        return False
                    left = scope.left()
                    if scope.cancelled or left == 0.0 or (ticket is not None and ticket.aborted):
                        return False
                    # A caller without a deadline may still send one decades away.
                    self._condition.wait(None if left is None else min(left, threading.TIMEOUT_MAX))
                if scope.cancelled or (ticket is not None and ticket.aborted):
                    return False
                self._held = True
                return True
            finally:
                remove()

    def release(self) -> None:
        """Frees the lock for the next load."""
        with self._condition:
            self._held = False
            self._condition.notify_all()

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify_all()


class _Ticket:
    """One load of a model that has not begun (it waits for the model's lock, or has just taken
    it): what :meth:`ModelLock.abort` marks."""

    __slots__ = ("_lock", "aborted", "scope", "unloaded", "version")

    def __init__(self, lock: ModelLock, version: str) -> None:
        self._lock = lock
        self.version = version
        self.aborted = False
        self.unloaded = False
        """An unload stopped the load after it had begun (its scope cancelled)."""
        self.scope: CallScope | None = None

    def begin(self, scope: CallScope) -> bool:
        """The load begins under ``scope``, which an unload cancels from now on; False if an
        unload aborted it first."""
        return self._lock._begin(self, scope)

    def leave(self) -> None:
        """The load has ended: no unload reaches it any more (idempotent)."""
        self._lock._leave(self)


def _unloaded_while_loading(name: str, version: str) -> ModelUnloaded:
    return ModelUnloaded(
        f"model {name!r} version {version!r} was unloaded while it was loading: its download "
        "and key release were stopped; it is not served"
    )


def _aborted(name: str, version: str) -> Aborted:
    return Aborted(
        f"the load of model {name!r} version {version!r} was aborted before it began: the "
        "version (or the model) was unloaded while the load waited for another load of the model",
        reason=Reason.LOAD_ABORTED_BY_UNLOAD,
    )


def _ended(scope: CallScope, raised: BaseException) -> StrongroomError:
    """``raised``, or the scope's own error if the scope ended and that is why the step failed
    (its call cancelled: CANCELLED; timed out at the deadline: an outage); a peer's outage of
    another class than ``Unavailable`` (a call out of time: ``DeadlineExceeded``) as
    ``Unavailable``, its reason and message kept (module docstring)."""
    if isinstance(raised, grpc.FutureCancelledError):
        return scope.error()  # only the scope cancels a load's calls
    assert isinstance(raised, StrongroomError)
    if scope.ended and isinstance(raised, (*OUTAGES, Cancelled)):
        return scope.error()
    if isinstance(raised, OUTAGES) and not isinstance(raised, Unavailable):
        # LoadModel's caller did not run out of time (that is the scope's error, above): a
        # dependency did. DEADLINE_EXCEEDED would read as the caller's own deadline, and
        # neither the retries (transient) nor a caller retrying UNAVAILABLE would try again.
        return Unavailable(raised.message, reason=raised.reason)
    return raised


def _cancellable_sleep(scope: CallScope) -> Callable[[float], None]:
    """A back-off wait that the scope's cancellation ends at once."""
    woken = threading.Event()
    scope.on_cancel(woken.set)

    def wait(seconds: float) -> None:
        woken.wait(seconds)

    return wait
