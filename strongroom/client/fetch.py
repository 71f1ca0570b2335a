"""Decrypt-to-memory for any runtime: attest, obtain the key release, return the model's parts.

For serving code that runs inside the confidential VM but is not Strongroom's ONNX Runtime server
(safetensors, PyTorch, Keras, a custom engine), :class:`ModelFetcher` does what the inference
service does before it hands bytes to ONNX Runtime, and returns the decrypted parts as read-only
memory buffers. Plaintext is never written to disk: each part's ciphertext streams from the model
store straight into a decryptor that writes into the part's own in-memory buffer (several parts
are fetched and decrypted in parallel), and :meth:`DecryptedModel.close` zeroes every buffer.

Example (inside the VM, with the workload's identity and its TEE)::

    from strongroom.attestation.release_signature import ReleaseVerifier
    from strongroom.attesters import select_attester
    from strongroom.client.fetch import ModelFetcher
    from strongroom.client.keyrelease import KeyReleaseClient
    import safetensors.numpy

    release = KeyReleaseClient(broker_channel, select_attester("auto", production=True),
                               identity.public_key_der,
                               verifier=ReleaseVerifier.from_files([Path("release-signing-key.pub.pem")]))
    with ModelFetcher(store_channel, release).fetch("acme/llm", "3") as model:
        for part in model.parts:                     # in manifest order
            weights = safetensors.numpy.load(part.as_bytes())   # copies into numpy arrays
    # here every decrypted buffer reads as zeros

A model published as one artifact comes back as one part (named after the last segment of the
model name); a multi-part model (:mod:`strongroom.artifact.manifest`) comes back with its parts in
manifest order, each checked against the authenticated manifest: a part swapped, reordered,
dropped or taken from another version raises DataLoss (PART_MISMATCH, PART_MISSING) and nothing is
returned. Errors are :mod:`strongroom.errors` exceptions with a reason code.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.artifact import (
    DEFAULT_DECRYPT_THREADS,
    ArtifactHeader,
    ArtifactTooLarge,
    BufferedStreamDecryptor,
    InvalidArtifact,
    wipe,
)
from strongroom.artifact.format import DIGEST_SIZE
from strongroom.artifact.keybinding import body_key
from strongroom.artifact.manifest import (
    MAX_MANIFEST_SIZE,
    Manifest,
    ManifestLayout,
    ManifestMismatch,
    PartMissing,
    check_part_digest,
    check_part_header,
    header_digest,
    is_manifest,
    parse_manifest,
)
from strongroom.client.busy import NO_RETRY, BusyRetry, retrying_busy
from strongroom.client.cancel import current_scope
from strongroom.client.keypins import KeyPins
from strongroom.client.keyrelease import KeyReleaseClient, ReleasedDataKey
from strongroom.client.remote import remote_error
from strongroom.client.whole_streams import end_stream, ending
from strongroom.closing import Closing
from strongroom.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from strongroom.reasons import Reason
from strongroom.wire import WireError, bytes_field_view

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PARALLEL_PARTS",
    "DecryptedModel",
    "DecryptedPart",
    "KeyRelease",
    "ModelFetcher",
    "PartSource",
    "check_artifact_header",
    "check_header_pin",
    "grpc_source",
    "remote_error",
    "retrying_source",
]

DEFAULT_PARALLEL_PARTS = 4
"""Parts fetched at once: enough to overlap the network with decryption on a few cores."""

PartSource = Callable[[str, str], Iterator[bytes | memoryview]]
"""Yields the bytes of the stored artifact ``(name, version)`` from offset 0, in pieces.

Raises a :mod:`strongroom.errors` exception (NotFound when there is no such artifact)."""
KeyRelease = Callable[[str, int, bytes], ReleasedDataKey]
"""Attested release of a data key: (key id, key version, wrapped data key) → the key."""


_GET_MODEL = "/{}/GetModel".format(
    store_pb.DESCRIPTOR.services_by_name["ModelStoreService"].full_name
)
_DATA_FIELD = store_pb.GetModelResponse.DESCRIPTOR.fields_by_name["data"].number


def _chunk_data(message: bytes) -> memoryview | WireError:
    # Only the data is used (the artifact describes itself), so it is taken as a view into the
    # received message instead of parsing it into a protobuf object and copying it out again.
    try:
        return bytes_field_view(message, _DATA_FIELD)
    except WireError as exc:
        # Returned, not raised: gRPC would make it INTERNAL "Exception deserializing response!"
        # (and log a traceback); the source raises it as what it is, damage from the store.
        return exc


def grpc_source(channel: grpc.Channel, *, timeout: float = 600.0) -> PartSource:
    """A :data:`PartSource` reading from the model store over ``channel`` (GetModel); make it
    with :func:`~strongroom.client.store_channel.store_channel`, whose downloads cost less CPU."""
    get_model = channel.unary_stream(
        _GET_MODEL,
        request_serializer=store_pb.GetModelRequest.SerializeToString,
        response_deserializer=_chunk_data,
    )

    def source(name: str, version: str) -> Iterator[memoryview]:
        # In a CallScope (a model load's) the download ends by the load's deadline and with its
        # cancellation; through a traced channel the call here is a generator, and the scope
        # reaches the real call from below the tracing (strongroom.client.cancel.scoped_channel).
        scope = current_scope()
        request = store_pb.GetModelRequest(name=name, version=version)
        if scope is not None:
            scope.raise_if_ended()
        call = get_model(request, timeout=timeout if scope is None else scope.timeout(timeout))
        if scope is not None and callable(getattr(call, "cancel", None)):
            scope.track(call)
        try:
            for data in call:
                if isinstance(data, WireError):
                    raise DataLoss(
                        f"the model store sent a malformed GetModel message for "
                        f"{name}/{version}: {data}",
                        reason=Reason.STORE_MESSAGE_MALFORMED,
                    )
                yield data
        except grpc.RpcError as exc:
            if scope is not None and scope.ended:
                raise scope.error() from None
            raise remote_error("fetch", exc) from None
        finally:
            # A reader that stops early (a refused header, a failed part) ends the download; a
            # finished call ignores it. A call wrapped by an interceptor is a generator: it is
            # closed here, not left for the garbage collector to finalise in another context.
            # A single-threaded call's end is taken in here too (strongroom.client.whole_streams).
            end_stream(call)

    return source


def _grpc_release(client: KeyReleaseClient) -> KeyRelease:
    def release(key_id: str, key_version: int, wrapped: bytes) -> ReleasedDataKey:
        try:
            return client.release(key_id, key_version, wrapped)
        except grpc.RpcError as exc:
            raise remote_error("key release", exc) from None

    return release


class _Cancelled(Exception):
    """A part fetch stopped because another part had already failed."""


class DecryptedPart:
    """One decrypted part in memory: ``view`` is a read-only buffer, valid until the model closes.

    ``as_bytes()`` returns the same memory as a ``bytes`` object (no copy) for APIs that want
    ``bytes`` (``safetensors.numpy.load``, ``onnxruntime.InferenceSession``); it too reads as
    zeros once the model is closed, so copy what must outlive it.
    """

    def __init__(self, index: int, name: str, content_type: str, obj: bytes) -> None:
        self.index = index
        self.name = name
        self.content_type = content_type
        self._obj: bytes | None = obj

    def __repr__(self) -> str:
        return f"DecryptedPart(index={self.index}, name={self.name!r}, size={self.size})"

    @property
    def size(self) -> int:
        """Plaintext size in bytes (0 once closed)."""
        return len(self._obj) if self._obj is not None else 0

    @property
    def view(self) -> memoryview:
        """A read-only view of the plaintext."""
        return memoryview(self._check())

    def as_bytes(self) -> bytes:
        """The plaintext as a ``bytes`` object, without a copy (zeroed when the model closes)."""
        return self._check()

    def _check(self) -> bytes:
        if self._obj is None:
            raise FailedPrecondition("the decrypted model was closed", reason=Reason.MODEL_CLOSED)
        return self._obj

    def _release(self) -> None:
        self._obj = None


@dataclass
class DecryptedModel(Closing):
    """A model version decrypted into memory; use it as a context manager (or call close()).

    ``manifest`` is the authenticated manifest of a multi-part model, None for a single artifact.
    ``timings`` (seconds): ``attest_and_release``, ``fetch_and_decrypt``.
    """

    name: str
    version: str
    parts: tuple[DecryptedPart, ...]
    manifest: Manifest | None
    decision_id: str
    timings: dict[str, float] = field(default_factory=dict)
    _decryptors: list[BufferedStreamDecryptor] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"DecryptedModel(name={self.name!r}, version={self.version!r}, parts={self.parts!r})"

    @property
    def layout(self) -> ManifestLayout | None:
        """The manifest's layout, None for a single artifact."""
        return self.manifest.layout if self.manifest is not None else None

    @property
    def total_size(self) -> int:
        """Sum of the parts' plaintext sizes."""
        return sum(p.size for p in self.parts)

    def part(self, name: str) -> DecryptedPart:
        """The part called ``name``; raises NotFound(PART_NOT_FOUND) if there is none."""
        for part in self.parts:
            if part.name == name:
                return part
        raise NotFound(f"the model has no part {name[:255]!r}", reason=Reason.PART_NOT_FOUND)

    def close(self) -> None:
        """Zeroes every decrypted buffer; the parts are unusable afterwards."""
        for part in self.parts:
            part._release()
        for decryptor in self._decryptors:
            decryptor.wipe_output()
        self._decryptors.clear()


def _default_part_name(model_name: str) -> str:
    return model_name.rsplit("/", 1)[-1]


class _Stream:
    """One artifact being fetched into a decryptor; remembers its footer (the clear digest)."""

    def __init__(self, decryptor: BufferedStreamDecryptor) -> None:
        self.decryptor = decryptor
        self._tail = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        self.decryptor.feed(data)
        self._tail += data[-DIGEST_SIZE:]
        del self._tail[:-DIGEST_SIZE]

    @property
    def footer(self) -> bytes:
        """The last 32 bytes fed: once finish() succeeded, equal to the authenticated digest."""
        return bytes(self._tail)


def check_header_pin(header: ArtifactHeader, pin: bytes | None) -> None:
    """FailedPrecondition(HEADER_PIN_MISMATCH) unless ``header``'s digest (SHA-256 of its
    authenticated bytes, :func:`~strongroom.artifact.manifest.header_digest`) is ``pin`` (None:
    not pinned). The header binds the creation time, so a pin refuses another artifact of the same
    name and version, such as an older one the store serves again after a re-publish."""
    if pin is None or hmac.compare_digest(header_digest(header), pin):
        return
    raise FailedPrecondition(
        f"the store served an artifact of {header.model_name}/{header.model_version} whose header "
        f"SHA-256 is {header_digest(header).hex()}, not the pinned {pin.hex()}",
        reason=Reason.HEADER_PIN_MISMATCH,
    )


def check_artifact_header(
    header: ArtifactHeader,
    name: str,
    version: str,
    *,
    key_pins: KeyPins,
    header_sha256: bytes | None = None,
) -> None:
    """Checks the (not yet authenticated) header of the artifact the store served for
    ``name``/``version``, before its key is requested: the one check of the inference loader and
    of :class:`ModelFetcher` (two copies had drifted apart).

    - another model's or version's header: DATA_LOSS ``MANIFEST_MISMATCH`` for a manifest,
      FAILED_PRECONDITION ``ARTIFACT_MISMATCH`` otherwise;
    - a key its name is not pinned to (``key_pins``): FAILED_PRECONDITION ``MODEL_KEY_NOT_ALLOWED``;
    - a manifest declaring more than :data:`~strongroom.artifact.manifest.MAX_MANIFEST_SIZE`:
      ``MANIFEST_TOO_LARGE`` (an InvalidArtifact: stored data gone bad, DATA_LOSS to a caller);
    - a header other than the pinned one (``header_sha256``): FAILED_PRECONDITION
      ``HEADER_PIN_MISMATCH`` (:func:`check_header_pin`).

    The size cap (``max_model_bytes``) is the decryptor's, judged on the same header before the
    key is requested; the format (a key not bound to its model) is judged with the key
    (:func:`~strongroom.artifact.keybinding.body_key`).
    """
    manifest = is_manifest(header.content_type)
    if (header.model_name, header.model_version) != (name, version):
        message = (
            f"the store returned {header.model_name}/{header.model_version} for {name}/{version}"
        )
        if manifest:
            raise ManifestMismatch(message)
        raise FailedPrecondition(message, reason=Reason.ARTIFACT_MISMATCH)
    key_pins.check(name, version, header.key_id)
    if manifest and header.plaintext_size > MAX_MANIFEST_SIZE:
        raise InvalidArtifact(
            f"the manifest declares {header.plaintext_size} bytes, more than {MAX_MANIFEST_SIZE}",
            reason=Reason.MANIFEST_TOO_LARGE,
        )
    check_header_pin(header, header_sha256)


def _check_layout(
    name: str,
    version: str,
    layout: ManifestLayout | None,
    accepted: Collection[ManifestLayout] | None,
) -> None:
    """FailedPrecondition(MODEL_LAYOUT_UNSUPPORTED) unless ``layout`` (None: a single artifact)
    is ``accepted`` (None: any)."""
    if accepted is None or (layout is not None and layout in accepted):
        return
    what = "a single artifact" if layout is None else f"laid out as {layout.name}"
    wanted = ", ".join(sorted(each.name for each in accepted))
    raise FailedPrecondition(
        f"{name}/{version} is {what}; this reader takes only multi-part models laid out as "
        f"{wanted}",
        reason=Reason.MODEL_LAYOUT_UNSUPPORTED,
    )


def retrying_source(
    source: PartSource,
    retry: BusyRetry,
    *,
    stop: threading.Event | None = None,
    deadline: float | None = None,
) -> PartSource:
    """``source`` with each download the store refuses as busy before its first byte made again
    as ``retry`` says (:func:`~strongroom.client.busy.retrying_busy`); a download that has
    yielded bytes is never started again (its reader has them), whatever ends it. Once ``stop``
    is set (another part failed), a download waiting to be made again is not: it ends at once.
    No wait ends past ``deadline`` (``time.monotonic()``, the fetch's): the refusal is raised."""
    if not retry.within:
        return source

    def retried(name: str, version: str) -> Iterator[bytes | memoryview]:
        def first() -> tuple[Iterator[bytes | memoryview], bytes | memoryview | None]:
            pieces = source(name, version)
            return pieces, next(pieces, None)

        try:
            pieces, head = retrying_busy(
                first, retry, what=f"downloading {name}/{version}", stop=stop, deadline=deadline
            )
        except Exception:
            if stop is not None and stop.is_set():
                raise _Cancelled() from None  # not the fetch's cause: the failure that set it is
            raise
        try:
            if head is not None:
                yield head
                yield from pieces
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a reader that stops early ends the download here, not at collection

    return retried


class ModelFetcher:
    """Fetches, attests for, releases and decrypts model versions into memory.

    ``store`` is a channel to the model store (or any :data:`PartSource`); ``key_release`` a
    :class:`KeyReleaseClient` built with this VM's attester and TLS key (or any
    :data:`KeyRelease`). ``parallel`` parts are fetched at once, each decrypted as it arrives (on
    ``decrypt_threads`` workers, or by its receiving thread with the default 0). With a channel,
    ``timeout`` (seconds) bounds a whole :meth:`fetch`: the manifest's download and every part's
    share one deadline (a :data:`PartSource` given instead bounds its own downloads).

    The released key opens only a format-3 artifact written for the very name and version
    :meth:`fetch` asked for (``strongroom.artifact.keybinding``); older formats, whose key is not
    bound to its model, are refused with ARTIFACT_KEY_UNBOUND unless ``accept_unbound``. With
    ``key_pins``, a model stored under a key its name is not pinned to is refused before any key
    is requested (MODEL_KEY_NOT_ALLOWED). ``max_model_bytes`` bounds a model, a single artifact
    or all parts of a multi-part one together, judged on its header (before the key is requested)
    or its manifest (before any part is fetched): RESOURCE_EXHAUSTED ARTIFACT_TOO_LARGE. Every
    byte becomes memory. ``retry`` (default none: the inference loader retries whole loads) makes
    each download the store refuses as busy again (:func:`retrying_source`), within the fetch's
    deadline, so that one part refused does not cost the whole fetch and its key release.
    """

    def __init__(
        self,
        store: grpc.Channel | PartSource,
        key_release: KeyReleaseClient | KeyRelease,
        *,
        parallel: int = DEFAULT_PARALLEL_PARTS,
        decrypt_threads: int = DEFAULT_DECRYPT_THREADS,
        timeout: float = 600.0,
        accept_unbound: bool = False,
        key_pins: KeyPins | None = None,
        max_model_bytes: int | None = None,
        retry: BusyRetry = NO_RETRY,
    ) -> None:
        if not 1 <= parallel <= 64:
            raise InvalidArgument(
                "parallel must be between 1 and 64", reason=Reason.INVALID_PARALLEL
            )
        self._channel = store if isinstance(store, grpc.Channel) else None
        self._source: PartSource = (
            grpc_source(store, timeout=timeout) if isinstance(store, grpc.Channel) else store
        )
        self._timeout = timeout
        self._release: KeyRelease = (
            _grpc_release(key_release) if isinstance(key_release, KeyReleaseClient) else key_release
        )
        self._parallel = parallel
        self._threads = decrypt_threads
        self._accept_unbound = accept_unbound
        self._pins = key_pins or KeyPins()
        self._max = max_model_bytes
        self._retry = retry

    def fetch(
        self,
        name: str,
        version: str,
        *,
        timeout: float | None = None,
        header_sha256: bytes | None = None,
        layouts: Collection[ManifestLayout] | None = None,
    ) -> DecryptedModel:
        """Decrypts ``name``/``version`` (single or multi-part) into memory; see the module doc.

        ``timeout`` (seconds) bounds this fetch instead of the fetcher's own (with a channel).
        ``header_sha256`` pins the artifact (a multi-part model's manifest): see
        :func:`check_header_pin`. ``layouts``, if given, are the multi-part layouts the caller
        can use: any other model (a single artifact included) is FailedPrecondition
        ``MODEL_LAYOUT_UNSUPPORTED``, a manifest's before any of its parts is downloaded."""
        started = time.perf_counter()
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        source = self._source_until(deadline)
        # A PartSource given instead bounds its own downloads; a busy wait then bounds itself.
        retry_until = deadline if self._channel is not None else None
        first = _Stream(self._decryptor())
        dek: bytearray | None = None
        release_seconds = 0.0
        decision_id = ""
        done: list[BufferedStreamDecryptor] = []
        try:
            # Ended here however the loop is left, not whenever its generator is collected.
            with ending(
                retrying_source(source, self._retry, deadline=retry_until)(name, version)
            ) as pieces:
                for data in pieces:
                    first.feed(data)
                    header = first.decryptor.header
                    if header is not None and dek is None:
                        check_artifact_header(
                            header, name, version, key_pins=self._pins, header_sha256=header_sha256
                        )
                        t0 = time.perf_counter()
                        released = self._release(
                            header.key_id, header.key_version, header.wrapped_dek
                        )
                        try:
                            dek = body_key(
                                header,
                                released.dek,
                                name,
                                version,
                                accept_unbound=self._accept_unbound,
                            )
                        finally:
                            wipe(released.dek)
                        decision_id = released.decision_id
                        release_seconds = time.perf_counter() - t0
                        first.decryptor.set_dek(dek)
            plaintext = first.decryptor.finish()
            done.append(first.decryptor)
            assert isinstance(plaintext, bytes) and dek is not None
            header = first.decryptor.header
            assert header is not None
            if not is_manifest(header.content_type):
                _check_layout(name, version, None, layouts)
                parts: tuple[DecryptedPart, ...] = (
                    DecryptedPart(0, _default_part_name(name), header.content_type, plaintext),
                )
                manifest = None
            else:
                manifest = parse_manifest(plaintext, header=header)
                first.decryptor.wipe_output()  # the manifest is parsed; its plaintext can go
                done.clear()
                _check_layout(name, version, manifest.layout, layouts)
                self._check_total(manifest)
                parts = self._fetch_parts(manifest, dek, done, source, retry_until)
        except BaseException as exc:
            first.decryptor.abort()
            first.decryptor.wipe_output()
            for decryptor in done:
                decryptor.wipe_output()
            if isinstance(exc, InvalidArtifact):
                # Every byte came from the store: a manifest or part it streamed short, long or
                # malformed is stored data gone bad, not a bad request by this library's caller.
                raise DataLoss(
                    f"the model store served a damaged artifact for {name}/{version}: "
                    f"{exc.message}",
                    reason=exc.reason,
                ) from None
            raise
        finally:
            if dek is not None:
                wipe(dek)
        total = time.perf_counter() - started
        return DecryptedModel(
            name,
            version,
            parts,
            manifest,
            decision_id,
            {"attest_and_release": release_seconds, "fetch_and_decrypt": total - release_seconds},
            done,
        )

    def _decryptor(self) -> BufferedStreamDecryptor:
        return BufferedStreamDecryptor(
            threads=self._threads, as_bytes=True, max_artifact_size=self._max
        )

    def _check_total(self, manifest: Manifest) -> None:
        total = sum(part.plaintext_size for part in manifest.parts)
        if self._max is not None and total > self._max:
            raise ArtifactTooLarge(
                f"{manifest.model_name}/{manifest.model_version} declares {total} bytes in "
                f"{len(manifest.parts)} parts, more than the {self._max} this reader accepts"
            )

    def _source_until(self, deadline: float) -> PartSource:
        """The store's downloads for one fetch, each given what is left until ``deadline``
        (``time.monotonic()``): with a timeout per download, a store that made every part take
        just under it would hold a model of N parts for about N / ``parallel`` timeouts."""
        channel = self._channel
        if channel is None:
            return self._source

        def source(name: str, version: str) -> Iterator[bytes | memoryview]:
            left = max(0.0, deadline - time.monotonic())
            return grpc_source(channel, timeout=left)(name, version)

        return source

    def _fetch_parts(
        self,
        manifest: Manifest,
        dek: bytearray,
        done: list[BufferedStreamDecryptor],
        source: PartSource,
        deadline: float | None,
    ) -> tuple[DecryptedPart, ...]:
        stop = threading.Event()
        # A part refused busy waits to be downloaded again: not once another part has failed.
        source = retrying_source(source, self._retry, stop=stop, deadline=deadline)
        results: list[DecryptedPart | None] = [None] * len(manifest.parts)
        lock = threading.Lock()

        def work(index: int) -> None:
            if stop.is_set():
                return
            # The key is set only once the header matched the manifest: a part from elsewhere is
            # refused before any key is used on it.
            stream = _Stream(self._decryptor())
            checked = False
            try:
                try:
                    with ending(
                        source(manifest.model_name, manifest.store_version(index))
                    ) as pieces:
                        for data in pieces:
                            if stop.is_set():
                                raise _Cancelled()
                            stream.feed(data)
                            header = stream.decryptor.header
                            if header is not None and not checked:
                                check_part_header(manifest, index, header)
                                checked = True
                                stream.decryptor.set_dek(dek)
                except NotFound:
                    raise PartMissing(
                        f"part {index} ({manifest.parts[index].name!r}) of "
                        f"{manifest.model_name}/{manifest.model_version} is missing from the store"
                    ) from None
                plaintext = stream.decryptor.finish()
                with lock:
                    done.append(stream.decryptor)
                part = manifest.parts[index]
                check_part_digest(part, stream.footer)
                assert isinstance(plaintext, bytes)
                results[index] = DecryptedPart(index, part.name, part.content_type, plaintext)
            except BaseException:
                stop.set()
                stream.decryptor.abort()
                stream.decryptor.wipe_output()
                raise

        workers = min(self._parallel, len(manifest.parts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="part-fetch") as pool:
            # Each part runs in a copy of this context: the caller's CallScope (and trace) too.
            futures = [
                pool.submit(contextvars.copy_context().run, work, i)
                for i in range(len(manifest.parts))
            ]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            # The root cause, not the cancellations it caused in the other workers.
            primary = next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
            assert primary is not None
            raise primary
        return tuple(p for p in results if p is not None)
