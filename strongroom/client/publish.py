"""Encrypt at birth: get a data key from the broker, encrypt while uploading, discard the key.

One pass over the plaintext file: it is read, hashed and encrypted block by block while the
ciphertext streams to the model store; only a few blocks are in memory at any time, and the data
key is wiped as soon as the encryptor has derived its own key from it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import grpc

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.artifact import ArtifactHeader, encrypt_stream, parse_header, read_summary, wipe
from strongroom.artifact.format import DEK_SIZE, DIGEST_SIZE
from strongroom.artifact.manifest import header_digest
from strongroom.client.busy import CLIENT_RETRY, BusyRetry, retrying_busy
from strongroom.client.mechanisms import header_mechanism
from strongroom.client.remote import TRANSIENT, outages_raised_as_errors
from strongroom.client.server_evidence import ConnectionEnded
from strongroom.client.signing import BUNDLE_MEDIA_TYPE, sign_model, signed_digest
from strongroom.errors import DataLoss, FailedPrecondition, StrongroomError
from strongroom.identifiers import MAX_KEY_VERSION
from strongroom.reasons import Reason
from strongroom.wire import append_bytes_field

UPLOAD_MESSAGE_BYTES = 1024 * 1024
#: AES-KWP (RFC 5649, the only wrapping a header carries) of a 32-byte key is 40 bytes.
WRAPPED_DATA_KEY_BYTES = DEK_SIZE + 8
ONNX_CONTENT_TYPE = "application/vnd.onnx"

Progress = Callable[[int, int], None]
"""Called with (plaintext bytes read so far, total plaintext bytes)."""


@dataclass(frozen=True)
class Published:
    """What the store recorded, how long the upload took, and the SHA-256 (hex) of the artifact's
    authenticated header: what a reader pins the version with (``LoadModelRequest.header_sha256``)."""

    model: store_pb.ModelInfo
    seconds: float
    header_sha256: str


class SentWhole:
    """Whether the current try of an upload handed over its last byte (:func:`put_model`'s
    ``sent_whole``), each try with a mark of its own (:meth:`next_try`).

    One mark cleared at each try was not enough: a try refused as busy may have its feeding thread
    (gRPC's) still inside its last ``next()`` when the refusal ends the call, and that thread
    set the shared mark after the retry had cleared it; an outage that then ended the retry short
    of its last byte said the version (or the part) may be stored, though nothing was."""

    def __init__(self) -> None:
        self._current = threading.Event()

    def next_try(self) -> Callable[[], None]:
        """A new try's own mark, to set once its last byte is handed over; from now on
        :meth:`is_set` reads this one alone (a set of an earlier try's changes nothing)."""
        self._current = threading.Event()
        return self._current.set

    def is_set(self) -> bool:
        """Whether the current try handed over its last byte."""
        return self._current.is_set()

    def answered(self) -> None:
        """The store answered the current try, describing the upload: nothing is left open
        (until the next try's last byte)."""
        self._current = threading.Event()

    def left_open(self, exc: BaseException) -> str | None:
        """How ``exc``, ending the upload, left open whether the store stored it: what
        :func:`unanswered` says, once the current try handed over its last byte and was not
        answered; None before (no store takes an artifact without its final chunk).

        The one place every publisher asks it (a single artifact's, a part's, a manifest's
        failure, and an outage's message): each checked the last byte on its own, and the
        manifest's check had once missed it."""
        return unanswered(exc) if self.is_set() else None


class TryProgress:
    """The caller's ``progress`` as the tries of an upload call it: each try's calls go through a
    gate of its own (:meth:`next_try`), closed when the try ends, and the next try starts only
    once a call the closed gate let through has returned.

    A try refused as busy may have its feeding thread (gRPC's) still inside one ``next()`` when
    the refusal ends the call, and that thread went on calling ``progress`` with the refused
    try's position after the retry had begun: progress went backwards, or reported a try that
    was over. The gate is not waited for when the try ends, only before the next starts: a call
    running then may be waiting for the publish to end (a callback holding its upload back)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._last: _ProgressGate | None = None

    @contextmanager
    def next_try(self) -> Iterator[Progress | None]:
        """A new try's own ``progress`` (None without one), for the block the try runs in; the
        previous try's call in flight, if any, has returned before the block starts."""
        if self._progress is None:
            yield None
            return
        if self._last is not None:
            self._last.drain()
        gate = self._last = _ProgressGate(self._progress)
        try:
            yield gate
        finally:
            gate.close()


class _ProgressGate:
    """One try's way to the caller's ``progress``, open until :meth:`close`."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._calling = threading.Lock()  # held while a call of this try's runs
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        with self._calling:
            if not self._closed:
                self._progress(done, total)

    def close(self) -> None:
        """No call starts from now on (one running goes on)."""
        self._closed = True

    def drain(self) -> None:
        """Closes the gate and waits until a call running has returned."""
        self._closed = True
        with self._calling:
            pass


def publish_model(
    path: Path,
    *,
    name: str,
    version: str,
    key_id: str,
    broker: grpc.Channel,
    store: grpc.Channel,
    content_type: str = ONNX_CONTENT_TYPE,
    progress: Progress | None = None,
    timeout: float = 3600.0,
    signing_key: Path | None = None,
    created_at: datetime | None = None,
    retry: BusyRetry = CLIENT_RETRY,
) -> Published:
    """Encrypts ``path`` under a fresh data key and uploads it as ``name``/``version``.

    ``created_at`` (default now) is the artifact's creation time, as in ``publish_parts``.

    With ``signing_key`` (EC private key, PEM) the plaintext is first signed with OpenSSF
    model-signing and the bundle travels in the artifact header; the bytes encrypted must be the
    ones signed (their SHA-256, seen before the artifact's last piece is sent): a file changed
    after it was signed ends the publish with FailedPrecondition(MODEL_FILE_CHANGED), nothing
    stored.

    A try the broker or the store refuses as busy (:data:`~strongroom.client.busy.BUSY_REFUSALS`)
    is made again as ``retry`` says, from a fresh data key (one more GenerateDataKey, audited),
    the file read again through a handle of its own: such a refusal comes before anything is
    generated or stored. Any other failure ends it: an outage
    (:data:`~strongroom.client.remote.TRANSIENT`, the broker or the store down, draining or out
    of time) as ``Unavailable`` or ``DeadlineExceeded``, its status in the message, as
    ``publish_parts`` raises it; any other refusal as it came (``grpc.RpcError``). One that
    ended a try whose last byte was sent, or an answer about another artifact (``DataLoss``
    ``STORE_ANSWER_MISMATCH``), says the version may be stored (:func:`unanswered`). A
    ``KeyboardInterrupt`` (Ctrl-C, or one ``progress`` raised) is raised as it came, with a note
    (:func:`interrupt_noted`): nothing stored, or, once the upload had begun, the version may be
    stored, when to keep it, and the command that removes it.
    """
    started = time.perf_counter()
    # The file first: a publish that cannot read it asks the broker for no data key (each one is
    # a broker decision, audited) and signs nothing.
    with _open_readable(path):
        pass
    upload = threading.Event()  # set before an upload's call starts: it may be stored from then
    whole = SentWhole()
    progress_of = TryProgress(progress)
    with interrupt_noted(name, version, upload):
        bundle = sign_model(path, signing_key) if signing_key is not None else b""
        signed = signed_digest(bundle) if bundle else None

        def attempt() -> tuple[store_pb.PutModelResponse, ArtifactHeader]:
            # Each try is a whole new encryption under a fresh data key: the refused try's key
            # is wiped, and no key and nonce ever seal the bytes of two tries. And each reads its
            # own handle: gRPC's thread feeding a refused try's requests may still be inside one
            # next() when the store's answer ends the call, and it read on from a shared one
            # after the retry's seek, so the retry missed bytes (PLAINTEXT_SIZE_MISMATCH,
            # nothing stored).
            sent_whole = whole.next_try()  # unset: a try refused as busy stored nothing
            with progress_of.next_try() as try_progress, _open_readable(path) as source:
                return _encrypt_and_put(
                    source,
                    os.fstat(source.fileno()).st_size,
                    path=path,
                    name=name,
                    version=version,
                    key_id=key_id,
                    broker=broker,
                    store=store,
                    content_type=content_type,
                    progress=try_progress,
                    timeout=timeout,
                    bundle=bundle,
                    signed=signed,
                    created_at=created_at,
                    upload_begins=upload.set,
                    sent_whole=sent_whole,
                )

        # The multi-part publisher's rule (remote.TRANSIENT): an outage raised the raw
        # grpc.RpcError here, Unavailable or DeadlineExceeded there.
        with _unanswered_noted(name, version, whole, "published"):
            response, header = retrying_busy(attempt, retry, what=f"publishing {name}/{version}")
    return Published(response.model, time.perf_counter() - started, header_digest(header).hex())


ANSWER_LOST = "was lost"
"""What :func:`unanswered` says of the store's answer to an upload an outage ended: the one
wording of it, in every publisher's message ("..., whose answer was lost")."""

ANSWER_ABOUT_ANOTHER = "did not describe it"
"""What :func:`unanswered` says of an answer OK about another artifact (STORE_ANSWER_MISMATCH)."""


def unanswered(exc: BaseException) -> str | None:
    """How the store's answer left open whether it stored an upload whose last byte was sent:
    :data:`ANSWER_LOST` (an outage, :data:`~strongroom.client.remote.TRANSIENT`: a deadline
    passing, the connection dropping, as the store committed; or a
    :class:`~strongroom.client.server_evidence.ConnectionEnded`, a ``ServerConnection``'s
    channel lost) or :data:`ANSWER_ABOUT_ANOTHER` (DATA_LOSS STORE_ANSWER_MISMATCH: the store
    answered OK, about another artifact); None for anything else, above all a refusal of the
    store's (its word that it stored nothing).

    Every publisher's one rule for what "may be stored" (a version, a part, a manifest): the
    multi-part publisher named a part answered about another artifact as may be stored while
    the single-artifact ones said nothing of it, and deleted the parts of a version whose
    manifest was answered so (stored, a published model whose loads all failed)."""
    if isinstance(exc, ConnectionEnded):
        # The connection's end in place of gRPC's UNAVAILABLE (a StrongroomError, so not read
        # as one below): after the last byte it is that outage, the store's answer lost with
        # the connection. A library caller publishing over a ServerConnection was not told.
        return ANSWER_LOST
    if isinstance(exc, StrongroomError):
        return ANSWER_ABOUT_ANOTHER if exc.reason == Reason.STORE_ANSWER_MISMATCH else None
    if isinstance(exc, grpc.Call) and exc.code() in TRANSIENT:
        return ANSWER_LOST
    return None


def amend(error: StrongroomError, note: str) -> None:
    """Appends ``note`` to ``error``'s message (in place: not every error class takes a message
    and a reason to be built again)."""
    error.message = f"{error.message}; {note}"
    error.args = (error.message,)


@contextmanager
def _unanswered_noted(name: str, version: str, whole: SentWhole, done: str) -> Iterator[None]:
    # An outage is Unavailable or DeadlineExceeded (outages_raised_as_errors); after the last
    # byte was sent it, and an answer about another artifact alike (unanswered), may end a call
    # the store has stored: "was not published" was then untrue, or nothing was said, and the
    # publisher's next try was refused MODEL_EXISTS, unexplained.
    with outages_raised_as_errors(lambda exc: _outage_what(name, version, whole, done, exc)):
        try:
            yield
        except StrongroomError as exc:
            answer = whole.left_open(exc)
            if answer is not None:
                amend(exc, _may_be_stored(name, version, answer))
            raise


def _outage_what(name: str, version: str, whole: SentWhole, done: str, exc: grpc.RpcError) -> str:
    answer = whole.left_open(exc)
    if answer is None:
        return f"{name}/{version} was not {done}"
    return _may_be_stored(name, version, answer)


def _may_be_stored(name: str, version: str, answer: str) -> str:
    return (
        f"{name}/{version} may be stored (`strongroom model ls {shlex.quote(name)}` lists it if "
        f"so): its whole artifact was sent, and the store's answer {answer}"
    )


def once_no_publish(name: str, version: str) -> str:
    """When what a publish of ``name``/``version`` may have stored can be taken as not stored
    (its parts removed, the version published again): a publish still running, the store still
    committing one whose answer was lost, or one that completed, made it its model's. With the
    command that shows the second half: without it the admin had a condition and no way named
    to check it. Every publisher's note says it in these words."""
    return (
        f"Once no publish of it is running and {name}/{version} is still not stored "
        f"(`strongroom model ls {shlex.quote(name)}` lists it if so)"
    )


def rm_command(name: str, version: str) -> str:
    """The ``strongroom model rm`` command that removes ``name``/``version``, shell-quoted."""
    return f"`strongroom model rm {shlex.quote(name)} {shlex.quote(version)}`"


@contextmanager
def interrupt_noted(name: str, version: str, upload: threading.Event) -> Iterator[None]:
    """Adds to a ``KeyboardInterrupt`` raised in the block a note (``add_note``, as
    :func:`~strongroom.client.multipart.publish_parts`'s) of what the single-artifact publish of
    ``name``/``version`` may have left: nothing before ``upload`` is set (its call started), and
    from then the whole version, with when to keep it and the command that removes it.

    An interrupt after the last byte was sent (the store's answer on its way) leaves the version
    stored: an interrupt that said nothing had the publisher's next try refused MODEL_EXISTS,
    unexplained. And a version stored is a whole, loadable model, this publish's or another's
    that stored it first (the store's MODEL_EXISTS refusal of this one never seen): a note that
    handed out its removal unconditioned had it removed under whoever loads it."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if not upload.is_set():
            interrupt.add_note(
                f"interrupted: {name}/{version} was not published; nothing was stored"
            )
        else:
            interrupt.add_note(
                f"interrupted: its upload had begun, so {name}/{version} may be stored, whole "
                "and loadable: this publish's, if its last byte was sent, or another "
                "publish's of the same version (the store's refusal of this one, MODEL_EXISTS, "
                f"lost to the interrupt). {once_no_publish(name, version)}, nothing was "
                "stored: publish it again; if it is stored, keep it (publishing it again is refused "
                "MODEL_EXISTS): only to replace it with another model does an admin remove it: "
                f"{rm_command(name, version)}"
            )
        raise


def _encrypt_and_put(
    source: BinaryIO,
    total: int,
    *,
    path: Path,
    name: str,
    version: str,
    key_id: str,
    broker: grpc.Channel,
    store: grpc.Channel,
    content_type: str,
    progress: Progress | None,
    timeout: float,
    bundle: bytes,
    signed: bytes | None,
    created_at: datetime | None,
    upload_begins: Callable[[], None],
    sent_whole: Callable[[], None],
) -> tuple[store_pb.PutModelResponse, ArtifactHeader]:
    """One try of :func:`publish_model`: a data key, then the file encrypted while uploaded
    (``upload_begins`` called just before the upload's call starts).

    With ``signed`` (the plaintext SHA-256 the signature ``bundle`` names), the artifact's last
    piece (its footer: the SHA-256 of the bytes encrypted) is sent only if it is the same: a file
    changed after it was signed ends the try with MODEL_FILE_CHANGED before the artifact is whole,
    so nothing is stored (stored, it was a model whose signature failed every load)."""
    generated = kb_grpc.KeyBrokerServiceStub(broker).GenerateDataKey(
        kb_pb.GenerateDataKeyRequest(key_id=key_id, model_name=name, model_version=version),
        timeout=30,
    )
    check_generated(generated, name, version)
    # Before the key is copied out: a mechanism the header cannot carry ends the publish.
    mechanism = header_mechanism(generated.mechanism)
    dek = bytearray(generated.data_key)
    try:
        artifact = encrypt_stream(
            source,
            dek,
            model_name=name,
            model_version=version,
            content_type=content_type,
            key_id=key_id,
            key_version=generated.key_version,
            wrapped_dek=generated.wrapped_data_key,
            wrap_mechanism=mechanism,
            block_size=UPLOAD_MESSAGE_BYTES,
            signature_bundle=bundle,
            signature_bundle_media_type=BUNDLE_MEDIA_TYPE if bundle else "",
            created_at=created_at,
        )
    finally:
        wipe(dek)  # the encryptor holds only its derived key from here on

    head: list[ArtifactHeader] = []

    def messages() -> Iterator[UploadMessage]:
        made = 0
        for piece in artifact:
            if not head:  # the first piece is everything before the first chunk
                head.append(parse_header(piece))
            made += len(piece)
            if (
                signed is not None
                and made == head[0].artifact_size
                and piece[-DIGEST_SIZE:] != signed
            ):
                raise _changed(path)
            if progress is not None:
                progress(source.tell(), total)
            yield from upload_pieces(piece)

    upload_begins()
    response = put_model(
        store, messages(), name=name, version=version, timeout=timeout, sent_whole=sent_whole
    )
    return response, head[0]


def upload_artifact(
    path: Path,
    *,
    store: grpc.Channel,
    timeout: float = 3600.0,
    progress: Progress | None = None,
    retry: BusyRetry = CLIENT_RETRY,
) -> Published:
    """Uploads an already encrypted artifact file unchanged (one the store's start-up sweep
    quarantined, for instance); its name and version are its header's. No key is involved.

    The file is checked first (header, footer, exact length: InvalidArtifact before anything is
    sent), then read once: hashed as it is sent. Its size is announced with the first message and
    its SHA-256 with the last, and the store checks both against what it received. The last
    message is held back until the file is seen unchanged since it was checked: its size and
    modification and change times, and, where those cannot show every change (the file was open
    for writing when it was checked, so possibly mapped and written through the mapping, which
    updates no time; or it was changed in the clock tick of the check), its content, read again
    and hashed. A file rewritten in place, grown or shrunk meanwhile ends the upload with
    FailedPrecondition(MODEL_FILE_CHANGED) before the artifact is complete, so the store keeps
    nothing. ``progress`` is called with (bytes read, total) before each message is handed
    over, so one that raises ends the upload before its last byte is sent (nothing stored). An
    upload the store refuses as busy is sent again, the file read again from its start, as
    ``retry`` says; an outage is ``Unavailable`` or ``DeadlineExceeded``, any other refusal
    raised as it came, what may be stored is said and an interrupt carries its note, as
    :func:`publish_model`'s.
    """
    started = time.perf_counter()
    with _open_readable(path) as source:
        summary = read_summary(source)
        source.seek(0)
        head = parse_header(source.read(summary.header_size))
        checked = _file_state(source)
        reread = not _times_show_changes(source.fileno(), checked)
        whole = SentWhole()
        progress_of = TryProgress(progress)

        def attempt() -> store_pb.PutModelResponse:
            # Its own handle, as publish_model's tries: a refused try's feeding thread may still
            # be inside one read, and read on from a shared one after the retry's seek (the retry
            # then missed bytes: MODEL_FILE_CHANGED, though nothing changed). The file is the one
            # checked: a replaced one fails the last message's state check.
            sent_whole = whole.next_try()  # unset: a try refused as busy stored nothing
            with progress_of.next_try() as try_progress, _open_readable(path) as own:
                return put_model(
                    store,
                    _artifact_messages(
                        path, own, summary.artifact_size, checked, try_progress, reread=reread
                    ),
                    name=summary.name,
                    version=summary.version,
                    timeout=timeout,
                    sent_whole=sent_whole,
                )

        # As publish_model's (remote.TRANSIENT): the raw grpc.RpcError here, Unavailable there.
        # The upload begins at once: an interrupt from here on may leave the artifact stored.
        upload = threading.Event()
        upload.set()
        with (
            interrupt_noted(summary.name, summary.version, upload),
            _unanswered_noted(summary.name, summary.version, whole, "uploaded"),
        ):
            response = retrying_busy(
                attempt, retry, what=f"uploading {summary.name}/{summary.version}"
            )
    return Published(response.model, time.perf_counter() - started, header_digest(head).hex())


def _file_state(source: BinaryIO) -> tuple[int, ...]:
    # What any write, truncation or replacement of the file's content changes (the change time
    # cannot be set back by its writer, unlike the modification time).
    info = os.fstat(source.fileno())
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


_CLOCK_REALTIME_COARSE = 5  # <linux/time.h>; the clock file timestamps are taken from


def _times_show_changes(fd: int, checked: tuple[int, ...]) -> bool:
    # Whether every change after the check will show in the file's size or times. Two kinds of
    # change do not: one in the same tick of the coarse clock as the last change before the check
    # (the same timestamps again, on kernels without fine-grained ones), and a write through a
    # shared writable mapping to a page it has already dirtied (no page fault, so no time update
    # until writeback cleans the page, up to 30 s later). The first cannot happen once the clock
    # has moved past the change time; the second needs a writer that has the file open (a
    # mapping holds its file open), and a read lease is only granted while nobody has.
    if sys.platform != "linux":
        return False
    if checked[-1] >= time.clock_gettime_ns(_CLOCK_REALTIME_COARSE):
        return False
    try:
        # A lease broken while held signals its holder: SIGIO would end this process, SIGURG
        # is ignored unless handled. Released at once: held, it would hold up the next opener.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        # EAGAIN: open for writing somewhere; EACCES: another user's file; EINVAL: no leases
        # on this filesystem (NFS, FUSE) or leases disabled. The content is then read again.
        return False
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def _content_digest(fd: int, size: int) -> str:
    # The SHA-256 of the file's first ``size`` bytes as they are now, read apart from the upload.
    hasher = hashlib.sha256()
    buffer = bytearray(UPLOAD_MESSAGE_BYTES)
    position = 0
    while position < size:
        n = os.preadv(fd, [memoryview(buffer)[: size - position]], position)
        if not n:
            break
        hasher.update(memoryview(buffer)[:n])
        position += n
    return hasher.hexdigest()


def _artifact_messages(
    path: Path,
    source: BinaryIO,
    size: int,
    checked: tuple[int, ...],
    progress: Progress | None,
    *,
    reread: bool,
) -> Iterator[UploadMessage]:
    # One pass: the file was hashed in full before it was sent, so every byte was read twice
    # (0.24x the bare stream for a 512 MiB file against 0.36x for the same bytes from memory).
    hasher = hashlib.sha256()
    remaining = size
    first = True
    while remaining:
        data = source.read(min(UPLOAD_MESSAGE_BYTES, remaining))
        if not data:  # shorter than when it was checked
            raise _changed(path)
        hasher.update(data)
        remaining -= len(data)
        if progress is not None:
            # Before the message is handed over: called after it, a callback that raised at the
            # last one ended the upload only once the whole artifact had been sent (and stored).
            progress(size - remaining, size)
        if not remaining:
            # Held back until the file is seen unchanged: an artifact that misses its last bytes
            # is no whole one for any store, so a changed file is never stored. Where its times
            # cannot show every change, the bytes sent must also still be the file's (a file
            # written through a mapping meanwhile was stored torn, its digest the torn bytes').
            if reread and _content_digest(source.fileno(), size) != hasher.hexdigest():
                raise _changed(path)
            if _file_state(source) != checked:
                raise _changed(path)
            yield store_pb.PutModelRequest(
                data=data, artifact_size=size if first else 0, artifact_sha256=hasher.hexdigest()
            )
        elif first:
            yield store_pb.PutModelRequest(data=data, artifact_size=size)
        else:
            yield data
        first = False


def _changed(path: Path) -> FailedPrecondition:
    return FailedPrecondition(
        f"{path} changed while it was uploaded; nothing was stored",
        reason=Reason.MODEL_FILE_CHANGED,
    )


def check_generated(generated: kb_pb.GenerateDataKeyResponse, name: str, version: str) -> None:
    """Refuses a GenerateDataKey answer that no key broker sends: a body key that is not 32 bytes,
    a wrapped key that is not the AES-KWP wrapping of one (40 bytes), or no KEK version or one
    no broker numbers (DATA_LOSS GENERATED_KEY_INVALID); and a key not bound to ``name``/``version``
    (FAILED_PRECONDITION DATA_KEY_NOT_BOUND: a broker older than artifact format 3 returns the
    wrapped key itself, and the format-3 artifact written with it would open for no reader).

    Judged here, before the key is used, and as the broker's: further on, the artifact writer
    refused some of them as an invalid argument of the publisher (an empty wrapped key, a short
    key), and took others (a wrapped key of another size) into a model no server could load,
    reported as published.
    """
    problems = []
    if len(generated.data_key) != DEK_SIZE:
        problems.append(f"a data key of {len(generated.data_key)} bytes (not {DEK_SIZE})")
    if len(generated.wrapped_data_key) != WRAPPED_DATA_KEY_BYTES:
        problems.append(
            f"a wrapped data key of {len(generated.wrapped_data_key)} bytes "
            f"(not {WRAPPED_DATA_KEY_BYTES})"
        )
    if generated.key_version < 1:
        problems.append("no KEK version")
    elif generated.key_version > MAX_KEY_VERSION:  # the wire field has twice the range
        problems.append(
            f"KEK version {generated.key_version} (a broker numbers 1..{MAX_KEY_VERSION})"
        )
    if problems:
        raise DataLoss(
            f"the key broker answered GenerateDataKey with {' and '.join(problems)}; nothing was "
            "published",
            reason=Reason.GENERATED_KEY_INVALID,
        )
    bound = (generated.bound_model_name, generated.bound_model_version)
    if bound != (name, version):
        raise FailedPrecondition(
            f"the key broker did not bind the data key to {name}/{version} (it names "
            f"{'/'.join(bound) if any(bound) else 'no model'}: a broker older than artifact "
            "format 3?); nothing was published",
            reason=Reason.DATA_KEY_NOT_BOUND,
        )


UploadMessage = store_pb.PutModelRequest | bytes | memoryview
"""One PutModel message as :func:`put_model` takes it: a request, or the bytes of its ``data``
alone (every message but one carrying claims), sent as that request without protobuf's copies. A
memoryview is sent (and counted) as the bytes it spans, whatever its format; it must be
C-contiguous (TypeError otherwise, before anything of it is sent)."""

_PUT_MODEL = "/{}/PutModel".format(
    store_pb.DESCRIPTOR.services_by_name["ModelStoreService"].full_name
)
_PUT_DATA_FIELD = store_pb.PutModelRequest.DESCRIPTOR.fields_by_name["data"].number


def upload_pieces(piece: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """``piece`` in views of at most :data:`UPLOAD_MESSAGE_BYTES` bytes (no slice copies), each
    the ``data`` of one PutModel message; TypeError for a view that is not C-contiguous."""
    view = _byte_view(piece)
    for start in range(0, len(view), UPLOAD_MESSAGE_BYTES):
        yield view[start : start + UPLOAD_MESSAGE_BYTES]


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    # A view of another format (array('I'), a typed buffer) counts and slices items, not bytes:
    # framed by its len() it would announce fewer bytes than it carries, and the store would read
    # the rest as further fields. cast() also refuses a non-contiguous view (TypeError), which
    # gRPC's serialisation would have met as INTERNAL "Exception serializing request!".
    return memoryview(data).cast("B")


def _serialize_upload(message: UploadMessage) -> bytes:
    # The bytes protobuf would send for PutModelRequest(data=message), copied once: through a
    # protobuf message each chunk was copied into it and out again as its serialisation.
    if isinstance(message, store_pb.PutModelRequest):
        return message.SerializeToString()
    if not len(message):
        return b""  # protobuf sends no field for empty (proto3) data, not an empty one
    return append_bytes_field(b"", _PUT_DATA_FIELD, message)


def put_model(
    store: grpc.Channel,
    requests: Iterator[UploadMessage],
    *,
    name: str,
    version: str,
    timeout: float,
    sent_whole: Callable[[], None] | None = None,
) -> store_pb.PutModelResponse:
    """Streams ``requests`` to ``PutModel`` over ``store``; a failure while producing them (the
    plaintext file unreadable, or changing size under the encryptor: PLAINTEXT_SIZE_MISMATCH; a
    ``KeyboardInterrupt`` a progress callback raised) is raised as it is.

    gRPC answers an exception raised by a request iterator with UNKNOWN "Exception iterating
    requests!" and logs its traceback, which hid the cause from the publisher and put a traceback
    on the command line's stderr. So the exception is kept here and the request stream ends
    instead: the artifact then lacks its final chunk (the writer seals it only once every declared
    byte was read), which no store can take for a whole one; whatever the store answers, the kept
    exception is raised.

    ``sent_whole`` is called (on gRPC's thread) once every request was handed over: from then
    the store may have stored the artifact whatever the call's end says.

    The store's answer must name ``name``/``version`` and as many artifact bytes as were sent;
    otherwise the publish fails with DATA_LOSS (STORE_ANSWER_MISMATCH) rather than report a model
    the store did not record as sent.
    """
    failure: list[BaseException] = []
    sent = [0]

    def guarded() -> Iterator[UploadMessage]:
        try:
            for request in requests:
                if isinstance(request, store_pb.PutModelRequest):
                    sent[0] += len(request.data)
                    yield request
                else:
                    view = _byte_view(request)  # counted and framed in bytes
                    sent[0] += len(view)
                    yield view
            if sent_whole is not None:
                sent_whole()
        except BaseException as exc:
            # BaseException too: this runs on gRPC's thread feeding the call, which keeps an
            # Exception only. A KeyboardInterrupt or SystemExit (a caller's progress callback
            # ending its work) ended that thread without ending the request stream, and the
            # call then waited for its deadline (an hour) before failing DEADLINE_EXCEEDED.
            failure.append(exc)

    upload = store.stream_unary(
        _PUT_MODEL,
        request_serializer=_serialize_upload,
        response_deserializer=store_pb.PutModelResponse.FromString,
    )
    try:
        response: store_pb.PutModelResponse = upload(guarded(), timeout=timeout)
    except grpc.RpcError:
        if failure:
            raise failure[0] from None
        raise
    if failure:
        raise failure[0]
    _check_answer(response.model, name, version, sent[0])
    return response


def _check_answer(model: store_pb.ModelInfo, name: str, version: str, size: int) -> None:
    """Refuses a PutModel answer that does not describe what was sent."""
    recorded = (model.name, model.version, model.artifact_size)
    if recorded != (name, version, size):
        raise DataLoss(
            f"the model store answered that it recorded {model.name[:255]!r} version "
            f"{model.version[:255]!r} ({model.artifact_size} bytes) for {name!r} version "
            f"{version!r} ({size} bytes sent)",
            reason=Reason.STORE_ANSWER_MISMATCH,
        )


def _open_readable(path: Path) -> BinaryIO:
    """``path`` opened for reading; FailedPrecondition(MODEL_FILE_UNREADABLE) naming it if not."""
    try:
        return path.open("rb")
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read {path}: {exc.strerror}", reason=Reason.MODEL_FILE_UNREADABLE
        ) from None
