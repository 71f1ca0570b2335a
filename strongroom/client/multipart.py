"""Publishing a multi-part model: an ONNX graph with its external data, or a set of shards.

Every part is encrypted at birth in one streaming pass (read, hashed, encrypted and uploaded block
by block, as :mod:`strongroom.client.publish` does for one file), all under one fresh data key; the
manifest that binds the parts (:mod:`strongroom.artifact.manifest`) is uploaded last, under the
model's own version, so the version becomes loadable only once every part is stored.

The data key is needed for the manifest too, which can only be written after every part's digest
is known. Rather than keep the key for the whole upload, every writer (one per part, and the
manifest's) is created up front, each deriving its own body key; the key is wiped before the first
byte is read. That works because the manifest's size does not depend on the digests (they are
fixed-length fields), so its header can be built before they are known.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import ArtifactWriter, build_header, wipe
from strongroom.artifact.format import DIGEST_SIZE, ArtifactHeader
from strongroom.artifact.manifest import (
    MANIFEST_CONTENT_TYPE,
    MAX_PARTS,
    PART_VERSION_MARK,
    ManifestLayout,
    build_manifest,
    header_digest,
    part_version,
    validate_part_name,
)
from strongroom.client.busy import CLIENT_RETRY, BusyRetry, retrying_busy
from strongroom.client.mechanisms import header_mechanism
from strongroom.client.publish import (
    ONNX_CONTENT_TYPE,
    UPLOAD_MESSAGE_BYTES,
    Progress,
    SentWhole,
    TryProgress,
    UploadMessage,
    amend,
    check_generated,
    once_no_publish,
    put_model,
    rm_command,
    upload_pieces,
)
from strongroom.client.remote import (
    TRANSIENT,
    outage_error,
    outages_raised_as_errors,
    refusal_text,
)
from strongroom.client.server_evidence import ConnectionEnded
from strongroom.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    StrongroomError,
)
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

__all__ = [
    "EXTERNAL_DATA_CONTENT_TYPE",
    "SAFETENSORS_CONTENT_TYPE",
    "PartFile",
    "PublishedParts",
    "files_parts",
    "onnx_parts",
    "publish_parts",
]

EXTERNAL_DATA_CONTENT_TYPE = "application/octet-stream"
"""Content type of an ONNX external-data part (raw little-endian tensor bytes)."""
SAFETENSORS_CONTENT_TYPE = "application/vnd.safetensors"


@dataclass(frozen=True)
class PartFile:
    """A part to publish: its name in the manifest, the file it is read from, its media type."""

    name: str
    path: Path
    content_type: str


@dataclass(frozen=True)
class PublishedParts:
    """What the store recorded for the manifest and for each part, the total time, and the
    SHA-256 (hex) of the manifest's authenticated header (what a reader pins the version with)."""

    manifest: store_pb.ModelInfo
    parts: tuple[store_pb.ModelInfo, ...]
    seconds: float
    header_sha256: str


def _unreadable(path: Path, exc: OSError) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot read {path}: {exc.strerror}", reason=Reason.MODEL_FILE_UNREADABLE
    )


def _external_locations(model: Any) -> list[str]:
    """Every external-data ``location`` a model's tensors name, in first-use order (subgraphs too)."""
    import onnx  # the publisher's dependency only; never needed to load

    seen: dict[str, None] = {}

    def tensor(t: Any) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            seen.setdefault(info.get("location", ""), None)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values)
            tensor(s.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensor(attr.t)
                for t in attr.tensors:
                    tensor(t)
                if attr.HasField("g"):
                    graph(attr.g)
                for sub in attr.graphs:
                    graph(sub)

    graph(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensor(attr.t)
    return list(seen)


def onnx_parts(path: Path) -> list[PartFile]:
    """The parts of an ONNX model saved with external data: the graph first, then its data files.

    ``path`` is the ``.onnx`` file or a directory holding exactly one. Every ``location`` must be a
    plain relative name (:func:`validate_part_name`) of a regular file in the graph's directory.
    A model without external data yields a single part. Raises FailedPrecondition or
    InvalidArgument (with the artifact library's reason) otherwise.
    """
    import onnx

    if path.is_dir():
        graphs = sorted(p for p in path.iterdir() if p.suffix == ".onnx" and p.is_file())
        if len(graphs) != 1:
            raise FailedPrecondition(
                f"{path} must hold exactly one .onnx file (found {len(graphs)})",
                reason=Reason.ONNX_MODEL_AMBIGUOUS,
            )
        path = graphs[0]
    try:
        # Only the graph is read: external tensors stay where they are.
        model = onnx.load_model(str(path), load_external_data=False)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except Exception as exc:
        raise FailedPrecondition(
            f"{path} is not an ONNX model ({type(exc).__name__})", reason=Reason.ONNX_MODEL_INVALID
        ) from None
    parts = [PartFile(validate_part_name(path.name), path, ONNX_CONTENT_TYPE)]
    folder = path.parent.resolve()
    for location in _external_locations(model):
        try:
            validate_part_name(location)
        except StrongroomError as exc:
            raise InvalidArgument(
                f"external-data location {location[:64]!r}: {exc.message}", reason=exc.reason
            ) from None
        data = folder / location
        if not data.resolve().is_relative_to(folder) or not data.is_file():
            raise FailedPrecondition(
                f"external-data file {location!r} is not a regular file beside {path.name}",
                reason=Reason.EXTERNAL_DATA_MISSING,
            )
        if location == path.name:
            raise InvalidArgument(
                "an external-data file cannot be the graph itself", reason=Reason.INVALID_PART_NAME
            )
        parts.append(PartFile(location, data, EXTERNAL_DATA_CONTENT_TYPE))
    return parts


def files_parts(paths: Sequence[Path]) -> list[PartFile]:
    """Named-file parts (e.g. safetensors shards): a directory's regular files, or the files given,
    in name order, each named by its file name."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    parts = []
    for file in sorted(files, key=lambda p: p.name):
        kind = (
            SAFETENSORS_CONTENT_TYPE
            if file.suffix == ".safetensors"
            else EXTERNAL_DATA_CONTENT_TYPE
        )
        parts.append(PartFile(validate_part_name(file.name), file, kind))
    return parts


CHECK_SECONDS = 600.0
"""How long, in all, a multi-part publish may take to look for parts a failed publish left
(:func:`publish_parts`'s ``check_within``): one ``StatModel`` a part, each retried while refused as
busy, so without a bound of its own a slow or busy store held a publish of 4,096 parts for hours
before it asked for a data key. 4,096 parts at a 100 ms round trip take about 7 minutes."""

SPARE_WRITERS = 16384
"""Most writers made beside the parts' own for retrying uploads refused as busy, all parts together
(about 3.7 KiB and 15 µs each: at most 60 MiB and a quarter of a second). Each try of a part needs
a writer of its own, and a writer is bound to its part's header when it is made, which is while the
data key exists: so each part is given its spares up front, as many as its own bound admits
(:attr:`~strongroom.client.busy.BusyRetry.most_tries`: 10 retries by default) while the parts'
together stay within this; past it (more than 1638 parts by default), an equal share each. (1024,
split the same way, gave each part of a model of 513 parts or more a single retry.)"""


@dataclass
class _Planned:
    part: PartFile
    header: ArtifactHeader
    # One per try: a try refused as busy may have sent some of its chunks, and a try after it
    # must not seal the file's bytes (changed meanwhile, perhaps) under that try's key and nonces.
    writers: list[ArtifactWriter]


def _messages(pieces: Iterator[bytes], on_piece: Any) -> Iterator[UploadMessage]:
    for piece in pieces:
        on_piece(piece)
        yield from upload_pieces(piece)


def publish_parts(
    parts: Sequence[PartFile],
    *,
    name: str,
    version: str,
    key_id: str,
    broker: grpc.Channel,
    store: grpc.Channel,
    layout: ManifestLayout,
    progress: Progress | None = None,
    timeout: float = 3600.0,
    created_at: datetime | None = None,
    retry: BusyRetry = CLIENT_RETRY,
    check_within: float = CHECK_SECONDS,
) -> PublishedParts:
    """Encrypts every part under one fresh data key, uploads them, then the manifest.

    Each part is read once. ``progress`` is called with (bytes of all parts read so far, total),
    by one try at a time (:class:`~strongroom.client.publish.TryProgress`).
    Every artifact of the version carries the same ``created_at`` (default: now).
    If an upload fails, the parts already stored are deleted when this caller may (best effort;
    none is tried over a ``ServerConnection`` whose connection ended, ``ConnectionEnded``: they
    are named), and the manifest is never written, so the version is never half-loadable.

    The parts are uploaded one at a time: one stream of the store's at once (a publisher's
    certificate has a share of several; README, "Limits"). A call the broker or the store refuses
    as busy (:data:`~strongroom.client.busy.BUSY_REFUSALS`: refused before anything was
    generated or stored) is made again as ``retry`` says: GenerateDataKey, a part's upload (the
    file read and encrypted again with a writer of its own, drawn from :data:`SPARE_WRITERS`) or
    the manifest's. Any other failure ends the publish.

    Failures (README, "Multi-part models"): a call that failed for an outage
    (:data:`~strongroom.client.remote.TRANSIENT`: the store or the broker down or draining,
    ``UNAVAILABLE`` or ``CANCELLED``, or a call out of time) is ``Unavailable`` or
    ``DeadlineExceeded``, its status in the message, whether parts were left or not; any other
    refusal that left parts is ``FailedPrecondition`` ``PARTS_LEFT_BEHIND``, and one that left
    none is raised as it came (``grpc.RpcError``). A message that left parts names them and the
    commands that remove them; it names too, as one that may be stored, a part sent whole whose
    call ended as :func:`~strongroom.client.publish.unanswered` says (an outage lost its answer,
    a ``ServerConnection``'s end, ``ConnectionEnded``, too, or the store answered about another
    artifact: ``DataLoss`` ``STORE_ANSWER_MISMATCH``), never deleted, its commands for once no
    publish of the version runs and it is not stored (the part may be another publish's); a
    manifest's call ended so says the version may be published, and deletes nothing.
    An interrupt (``KeyboardInterrupt``) stops at once, deleting nothing, with a note
    (``add_note``) naming the parts that may be left and those commands.
    The look for parts a failed publish left ends within ``check_within`` seconds in all
    (:data:`CHECK_SECONDS`), past it ``DeadlineExceeded`` ``PUBLISH_CHECK_DEADLINE_EXCEEDED``,
    nothing published; a ``check_within``
    that is not above 0 and finite is ``InvalidArgument`` ``INVALID_DURATION``, nothing asked.
    """
    if not 1 <= len(parts) <= MAX_PARTS:
        raise InvalidArgument(f"a model has 1 to {MAX_PARTS} parts", reason=Reason.TOO_MANY_PARTS)
    # As the command line's --check-within: NaN or infinity made no bound at all (every
    # comparison with them false), 0 or less one that refused every publish at once.
    if not 0 < check_within < math.inf:
        raise InvalidArgument(
            f"check_within must be a positive, finite number of seconds, not {check_within!r}",
            reason=Reason.INVALID_DURATION,
        )
    started = time.perf_counter()
    sizes = []
    for part in parts:
        try:
            sizes.append(part.path.stat().st_size)
        except OSError as exc:
            raise _unreadable(part.path, exc) from None
    # Every check that does not need the key runs first (names, versions, manifest limits).
    build_manifest(
        model_name=name,
        model_version=version,
        layout=layout,
        parts=[
            (p.name, p.content_type, s, bytes(DIGEST_SIZE), bytes(DIGEST_SIZE))
            for p, s in zip(parts, sizes, strict=True)
        ],
    )
    stub = store_grpc.ModelStoreServiceStub(store)
    broker_stub = kb_grpc.KeyBrokerServiceStub(broker)
    # An outage is the same domain error here as after parts were stored: it surfaced as a raw
    # grpc.RpcError here (and when no part was left), as Unavailable there.
    with outages_raised_as_errors(f"{name}/{version} was not published"):
        _check_version_free(stub, name, version, len(parts), retry, within=check_within)
        generated = retrying_busy(
            lambda: broker_stub.GenerateDataKey(
                kb_pb.GenerateDataKeyRequest(key_id=key_id, model_name=name, model_version=version),
                timeout=30,
            ),
            retry,
            what=f"a data key for {name}/{version}",
        )
    check_generated(generated, name, version)
    # As publish_model does, before the key is copied out: the key slots must name the mechanism
    # the broker wrapped with (one a header cannot carry ends the publish), never a default that
    # would make every part unwrappable once stored.
    mechanism = header_mechanism(generated.mechanism)
    dek = bytearray(generated.data_key)
    try:
        common: dict[str, Any] = {
            "model_name": name,
            "key_id": key_id,
            "key_version": generated.key_version,
            "wrapped_dek": generated.wrapped_data_key,
            "wrap_mechanism": mechanism,
            "created_at": created_at or datetime.now(UTC),
        }
        planned = []
        tries = 1 + min(retry.most_tries - 1, SPARE_WRITERS // len(parts))
        for index, (part, size) in enumerate(zip(parts, sizes, strict=True)):
            header = build_header(
                model_version=part_version(version, index),
                content_type=part.content_type,
                plaintext_size=size,
                **common,
            )
            writers = [ArtifactWriter(header, dek) for _ in range(tries)]
            planned.append(_Planned(part, header, writers))
        # Fixed-length digest fields: the manifest's size is known before its digests are.
        placeholder = build_manifest(
            model_name=name,
            model_version=version,
            layout=layout,
            parts=[
                (p.part.name, p.part.content_type, p.header.plaintext_size, bytes(32), bytes(32))
                for p in planned
            ],
        ).encode()
        manifest_header = build_header(
            model_version=version,
            content_type=MANIFEST_CONTENT_TYPE,
            plaintext_size=len(placeholder),
            **common,
        )
        manifest_writer = ArtifactWriter(manifest_header, dek)
    finally:
        wipe(dek)  # from here on, only the writers' derived keys exist

    total = sum(sizes)
    done_before = 0
    stored: list[store_pb.ModelInfo] = []
    digests: list[bytes] = []
    begun = 0  # parts whose upload began: the last may be stored though its call never ended
    whole = SentWhole()  # the last begun part's current try handed over its last byte
    progress_of = TryProgress(progress)  # a try's progress ends with it, every part's alike
    manifest_begun = False
    manifest_whole = SentWhole()  # the manifest's current try handed over its last byte
    try:
        for plan in planned:
            begun += 1
            spare = iter(plan.writers)

            def attempt(
                plan: _Planned = plan,
                spare: Iterator[ArtifactWriter] = spare,
                before: int = done_before,
            ) -> tuple[store_pb.PutModelResponse, bytes]:
                sent_whole = whole.next_try()  # unset: a try refused as busy stored nothing
                with progress_of.next_try() as try_progress:
                    return _put_part(
                        store,
                        plan,
                        next(spare),
                        before=before,
                        total=total,
                        progress=try_progress,
                        timeout=timeout,
                        sent_whole=sent_whole,
                    )

            # Each part its own bound: retry.within from its own first try.
            response, footer = retrying_busy(
                attempt,
                retry,
                what=f"part {plan.part.name!r} of {name}/{version}",
                attempts=len(plan.writers),
            )
            whole.answered()  # stored: from here no failure leaves this part open
            stored.append(response.model)
            digests.append(footer)  # the part's plaintext SHA-256
            done_before += plan.header.plaintext_size
        manifest = build_manifest(
            model_name=name,
            model_version=version,
            layout=layout,
            parts=[
                (
                    p.part.name,
                    p.part.content_type,
                    p.header.plaintext_size,
                    digest,
                    header_digest(p.header),
                )
                for p, digest in zip(planned, digests, strict=True)
            ],
        )
        encoded = manifest.encode()
        if len(encoded) != manifest_header.plaintext_size:  # pragma: no cover - invariant
            raise AssertionError("the manifest's size changed with its digests")
        artifact = b"".join(
            (manifest_writer.start(), manifest_writer.write(encoded), manifest_writer.finish())
        )
        # The same bytes again on a retry: sealed once, in memory.
        manifest_begun = True
        response = retrying_busy(
            lambda: put_model(
                store,
                _messages(iter([artifact]), lambda _piece: None),
                name=name,
                version=version,
                timeout=timeout,
                sent_whole=manifest_whole.next_try(),
            ),
            retry,
            what=f"the manifest of {name}/{version}",
        )
    except KeyboardInterrupt as interrupt:
        # The user's Ctrl-C: no deletes (each may wait 30 s on a slow or gone store), but what
        # may be left and how to remove it, as every other failure that left parts says.
        may_be_left = [p.header.model_version for p in planned[:begun]]
        interrupt.add_note(_interrupted_note(name, version, may_be_left, manifest_begun))
        raise
    except BaseException as exc:
        # The one rule (SentWhole.left_open) for the manifest as for a part and a single
        # artifact: only once its last byte was handed over, unanswered. A call that ended
        # before (refused as the connection had ended, ConnectionEnded, or UNAVAILABLE before it
        # connected) cannot have stored it (no final chunk): the version was not published, and
        # its parts are removed as after any failure, where "may be published" kept them and
        # said it reached the store.
        answer = manifest_whole.left_open(exc)
        if answer is not None:
            # An outage ends a call the store may have committed (a deadline passing, or the
            # connection dropping, as it stored the manifest), and an answer OK about another
            # artifact follows one it did: the version is then published and its parts are its
            # own. Deleted, or handed to an admin with the commands that remove them, they broke
            # every load of a published model (PartMissing).
            versions = [info.version for info in stored]
            said = (
                f"{name}/{version} may be published: its manifest reached the store, whose "
                f"answer {answer}"
            )
            # Its commands under the parts' guard: the store may commit a manifest after the
            # answer was lost (past the client's deadline), and "if it is not stored" alone had
            # an admin remove the parts of a version a publish was still committing.
            kept = (
                f"if it is, its {len(versions)} part(s) ({_versions(versions)}) are its own: "
                f"keep them. {once_no_publish(name, version)}, {_unblock(name, versions)}"
            )
            # The answer about another artifact, or a ServerConnection's end: raised as they came.
            if isinstance(exc, StrongroomError):
                amend(exc, f"{said}; {kept}")
                raise
            lost = outage_error(exc, said) if isinstance(exc, grpc.RpcError) else None
            assert lost is not None  # an outage: unanswered() read its status in TRANSIENT
            amend(lost, kept)
            raise lost from exc
        # The part's whole artifact was sent, and the call ended as unanswered() says leaves
        # open whether it was stored (an answer lost to an outage, or one about another
        # artifact): the part may be stored, and then blocks the version as any part left
        # does, though neither the deletes nor the note knew of it (the next publish's check
        # did). Not deleted: no answer says this publish stored it, and a part another publish
        # of the version stored is its own.
        answer = whole.left_open(exc)
        maybe = None if answer is None else (planned[begun - 1].header.model_version, answer)
        deleted: list[str] = []
        try:
            # A ServerConnection whose connection ended refuses every call from then on: the
            # deletes went over it, each failed, and the note said "deleting them failed".
            failed = _delete_best_effort(
                stub, stored, deleted, ended=isinstance(exc, ConnectionEnded)
            )
        except KeyboardInterrupt as interrupt:
            # Ctrl-C while the deletes wait: any part stored and not yet deleted may still be
            # there (the one whose delete was under way too), and so may the one whose answer
            # was lost (its note named only the parts stored, so the version stayed blocked by a
            # part no message named). The parts deleted are said: "nothing was deleted" was
            # untrue once a delete had completed.
            left = [info.version for info in stored if info.version not in deleted]
            left += [] if maybe is None else [maybe[0]]
            interrupt.add_note(
                _interrupted_note(name, version, left, manifest=False, deleted=deleted)
            )
            raise interrupt from exc
        # One rule for what is an outage (remote.TRANSIENT), parts left or not: the store down,
        # draining (CANCELLED) or the call out of time is what whoever runs the publish acts on
        # first (PARTS_LEFT_BEHIND hid an outage). A StrongroomError that is also a
        # grpc.RpcError (our channel's own, in place of the call) is raised as it came.
        ended = (
            exc if isinstance(exc, grpc.RpcError) and not isinstance(exc, StrongroomError) else None
        )
        error = (
            None if ended is None else outage_error(ended, f"{name}/{version} was not published")
        )
        # Until they are gone, publishing this version again is refused (PARTS_LEFT_BEHIND):
        # the publisher must know which to have removed.
        note = _left_note(name, version, failed, maybe) if failed or maybe else None
        if isinstance(exc, StrongroomError):
            if note is not None:
                amend(exc, note)
            raise
        if ended is not None:
            if error is None and note is not None:
                # A peer's refusal (the last busy one, when retries ran out): its status and
                # reason stay in the message, with what is now blocked and how to free it.
                error = FailedPrecondition(
                    f"{name}/{version} was not published ({refusal_text(ended)})",
                    reason=Reason.PARTS_LEFT_BEHIND,
                )
            if error is not None:
                if note is not None:
                    amend(error, note)
                raise error from exc
        raise
    log.info(
        "multi-part model published",
        extra={"model": name, "version": version, "parts": len(parts), "bytes": total},
    )
    return PublishedParts(
        response.model,
        tuple(stored),
        time.perf_counter() - started,
        header_digest(manifest_header).hex(),
    )


def _put_part(
    store: grpc.Channel,
    plan: _Planned,
    writer: ArtifactWriter,
    *,
    before: int,
    total: int,
    progress: Progress | None,
    timeout: float,
    sent_whole: Callable[[], None],
) -> tuple[store_pb.PutModelResponse, bytes]:
    """One try of a part's upload: its file read from the start, encrypted by ``writer`` while
    sent; the store's answer and the artifact's last 32 bytes (its footer: the plaintext's
    SHA-256), as this try's own pieces made them. ``sent_whole`` as :func:`put_model`'s."""
    try:
        source = plan.part.path.open("rb")
    except OSError as exc:
        raise _unreadable(plan.part.path, exc) from None
    with source:
        if os.fstat(source.fileno()).st_size != plan.header.plaintext_size:
            raise FailedPrecondition(
                f"{plan.part.path} changed size while publishing",
                reason=Reason.PLAINTEXT_SIZE_MISMATCH,
            )
        # This try's own: a refused try's feeding thread may still be inside one next() when the
        # retry starts, and its piece put into a tail shared with the retry went into the
        # manifest as the part's digest (the fetch then failed DATA_LOSS).
        tail = bytearray()

        def on_piece(piece: bytes) -> None:
            tail.extend(piece[-DIGEST_SIZE:])
            del tail[:-DIGEST_SIZE]
            if progress is not None:
                progress(before + source.tell(), total)

        pieces = writer.stream(source, block_size=UPLOAD_MESSAGE_BYTES)
        response = put_model(
            store,
            _messages(pieces, on_piece),
            name=plan.header.model_name,
            version=plan.header.model_version,
            timeout=timeout,
            sent_whole=sent_whole,
        )
        return response, bytes(tail)


def _interrupted_note(
    name: str,
    version: str,
    left: Sequence[str],
    manifest: bool,
    deleted: Sequence[str] | None = None,
) -> str:
    """What an interrupted publish may have left (``left``: store versions of parts) and how to
    remove it; ``manifest``: the manifest's upload had begun, so the version may be whole;
    ``deleted``: the interrupt came as a failed publish removed the parts it stored, these
    removed (None: before any delete)."""
    if deleted is None:
        deletes = "nothing was deleted: an interrupt does not wait for deletes"
    elif deleted:
        deletes = f"removed before the interrupt: {_versions(deleted)}"
    else:
        deletes = "none was removed before the interrupt"
    if not left and deleted:
        return (
            f"interrupted: {name}/{version} was not published; the {len(deleted)} part(s) it "
            f"stored were removed ({_versions(deleted)})"
        )
    if not left:
        return f"interrupted: {name}/{version} was not published; no part was stored"
    maybe = (
        f"its manifest was being sent, so {name}/{version} may be published (its parts are then "
        "its own: keep them); if it is not stored, "
        if manifest
        else f"{name}/{version} was not published; "
    )
    return (
        f"interrupted: {maybe}{len(left)} part(s) whose upload had begun may be stored "
        f"({_versions(left)}; {deletes}). "
        f"{once_no_publish(name, version)}, {_unblock(name, left)} (a part that is not stored "
        "is NOT_FOUND: nothing to do)"
    )


def _delete_best_effort(
    stub: store_grpc.ModelStoreServiceStub,
    stored: Sequence[store_pb.ModelInfo],
    deleted: list[str],
    *,
    ended: bool,
) -> dict[str, str]:
    """Removes the parts a failed publish stored, appending to ``deleted`` the store version of
    each as its delete completes; returns the store versions of those it did not remove, each
    with the status its delete failed with (PERMISSION_DENIED: a publisher may not delete;
    UNAVAILABLE: the store went away, or a delete ``ConnectionEnded`` ended) or
    :data:`CONNECTION_ENDED`: none is tried once the channel's connection has ended (``ended``,
    or after a delete's ``ConnectionEnded``), as no call over it can reach the store."""
    failed: dict[str, str] = {}
    for info in stored:
        if ended:
            failed[info.version] = CONNECTION_ENDED
            log.warning(
                "did not try to remove the part %s version %s a failed publish stored (the "
                "connection to the store had ended): an admin removes it with `strongroom "
                "model rm`",
                info.name,
                info.version,
                extra={"model": info.name, "version": info.version, "code": CONNECTION_ENDED},
            )
            continue
        try:
            stub.DeleteModel(
                store_pb.DeleteModelRequest(name=info.name, version=info.version), timeout=30
            )
            deleted.append(info.version)
        except grpc.RpcError as exc:
            # A delete ConnectionEnded ended was tried (its status UNAVAILABLE, as an outage's:
            # it may have removed its part, its answer lost with the connection); recorded as
            # "no delete was tried", its command went out unguarded. Only the later ones are not.
            ended = isinstance(exc, ConnectionEnded)
            failed[info.version] = exc.code().name
            # Harmless (no manifest names them), but they block a retry of this version.
            log.warning(
                "could not remove the part %s version %s a failed publish stored (%s): %s",
                info.name,
                info.version,
                exc.code().name,
                "an admin removes it with `strongroom model rm`",
                extra={"model": info.name, "version": info.version, "code": exc.code().name},
            )
    return failed


CONNECTION_ENDED = str(Reason.SERVER_CONNECTION_ENDED)
"""What :func:`_delete_best_effort` records of a part it did not try to delete, the channel's
connection having ended (:class:`~strongroom.client.server_evidence.ConnectionEnded`)."""


_ANSWER_LOST_CODES = frozenset(code.name for code in TRANSIENT)
"""The statuses of a delete whose failure leaves open whether it removed its part: an outage's,
the store's answer lost (:func:`~strongroom.client.publish.unanswered`'s rule), a
``ConnectionEnded`` among them (UNAVAILABLE)."""


def _left_note(
    name: str, version: str, failed: dict[str, str], maybe: tuple[str, str] | None = None
) -> str:
    """What blocks ``name``/``version`` and who frees it how: ``failed`` maps the store versions
    of the parts it stored and could not remove to the status their delete failed with;
    ``maybe`` is the store version of a part sent whole whose call ended as
    :func:`~strongroom.client.publish.unanswered` says (it may be stored, as the manifest's case
    says "may be published"), with what that said of the store's answer. One sentence on what
    is blocked until when, with one command form for every part: with a note each, both cases
    said it twice, each with its own commands."""
    said = []
    if failed:
        tried = [v for v, code in failed.items() if code != CONNECTION_ENDED]
        untried = [v for v, code in failed.items() if code == CONNECTION_ENDED]
        codes = sorted({failed[v] for v in tried})
        # "may not delete" only when that is what the store said: a delete the store was down
        # for was reported as a publisher's missing right.
        why = (
            "a publisher may not delete"
            if codes == ["PERMISSION_DENIED"]
            else f"deleting them failed: {', '.join(codes)}"
        )
        if tried:
            said.append(
                f"{len(tried)} part(s) it stored could not be removed ({why}): {_versions(tried)}"
            )
        if untried:
            said.append(
                f"{len(untried)} part(s) it stored were not removed (the connection to the store "
                f"had ended, so no delete was tried): {_versions(untried)}"
            )
    # A delete an outage ended (unanswered's rule, as for an upload) may have removed its part,
    # the version then free: another publish may have stored that part since, its model's. Its
    # command goes under the guard a part that may be stored has.
    if maybe is None and not any(code in _ANSWER_LOST_CODES for code in failed.values()):
        return f"{'; '.join(said)}; {_unblock(name, list(failed))}"
    left = list(failed)
    if maybe is not None:
        part, answer = maybe
        said.append(
            f"the part {part} may be stored: its upload reached the store, whose answer {answer} "
            "(stored by this publish, or by another of the version that stored it first)"
        )
        # Another publish's part: its model's once its manifest is stored, so removed by a
        # command handed out unconditioned it broke every load of that model (PART_MISSING). The
        # parts this publish stored are its own (their answers said so), but one command form
        # covers them all. The part that may be stored has the highest index: it comes last.
        left.append(part)
    return (
        f"{'; '.join(said)}. {once_no_publish(name, version)}, "
        f"{_unblock(name, left)} (a part that is not stored is NOT_FOUND: nothing to do)"
    )


def _unblock(name: str, left: Sequence[str]) -> str:
    return (
        "the version cannot be published again until an admin removes them "
        f"(PARTS_LEFT_BEHIND until then): {_rm_commands(name, left)}"
    )


def _part_indices(versions: Sequence[str]) -> tuple[str, list[int]] | None:
    """The model version and the part indices, in order, when every one of ``versions`` is a
    part of the same model version (as :func:`part_version` spells it); None otherwise."""
    base = versions[0].rpartition(PART_VERSION_MARK)[0]
    indices = []
    for v in versions:
        head, mark, index = v.rpartition(PART_VERSION_MARK)
        if not (mark and head and head == base and index.isascii() and index.isdigit()):
            return None
        if int(index) >= MAX_PARTS:
            return None
        if v != part_version(base, int(index)):  # a leading zero: not a part's version
            return None
        indices.append(int(index))
    return base, indices


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ``indices`` as runs of consecutive ones, (first, last) each."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _versions(versions: Sequence[str]) -> str:
    if len(versions) <= 3:
        return ", ".join(versions)
    parsed = _part_indices(versions)
    # "first to last" reads as every part between: say so when some are not there.
    gaps = parsed is not None and len(_runs(parsed[1])) > 1
    return f"{versions[0]} to {versions[-1]}{', with gaps' if gaps else ''}"


def _rm_commands(name: str, versions: Sequence[str]) -> str:
    """The ``strongroom model rm`` command(s) that remove ``versions`` of ``name``, spelled out:
    more than three parts of one version as one shell loop over their indices (each run of three
    or more consecutive ones a ``seq``: parts 0 to N-1 as a failed publish leaves them, or with
    gaps an admin's loop or hand left). Shell-safe: a name or version holds only letters, digits
    and ``._+-/`` (identifiers.py), never first a ``-``."""
    parsed = _part_indices(versions)
    if len(versions) > 3 and parsed is not None:
        base, indices = parsed
        words = " ".join(
            f"$(seq {first} {last})"
            if last - first >= 2
            else " ".join(map(str, range(first, last + 1)))
            for first, last in _runs(sorted(indices))
        )
        return (
            f"`for n in {words}; do strongroom model rm {shlex.quote(name)} "
            f'"{base}{PART_VERSION_MARK}$n"; done`'
        )
    return "; ".join(rm_command(name, v) for v in versions)


def _check_version_free(
    stub: store_grpc.ModelStoreServiceStub,
    name: str,
    version: str,
    count: int,
    retry: BusyRetry,
    *,
    within: float,
) -> None:
    """Refuses, before a data key is asked for, a version the store already holds
    (ALREADY_EXISTS MODEL_EXISTS: all the parts were stored first, then refused at the manifest
    and left behind) or any of whose ``count`` parts (those this publish would store), or those
    after them up to the first not stored, a publish left behind (FAILED_PRECONDITION
    PARTS_LEFT_BEHIND: refused at that part, with the commands that free every one of them). Such parts cannot be taken over: they are sealed under the
    failed publish's data key, which only an attested server can have released, and a publisher
    may not delete them. Nor can this publish tell a failed publish's parts from those of one
    still running, so the commands come with the condition under which they are safe, and the
    time the last part was stored.

    Every part index is stat'ed, not the first ones up to a missing one: an admin's ``rm`` loop
    that failed on one part (it carries on) or parts removed by hand leave gaps, and a publish
    let through then asked for a data key and failed at the part still stored (MODEL_EXISTS),
    naming only the parts before it. ListModels cannot do it in one call: it filters by name
    prefix only, so it would page through every version of the model (and of longer names), a
    cost that grows with the model's history; ``count`` stats (and one more, unless a failed
    publish of more parts left those past them) are bounded by this publish.

    All of it ends within ``within`` seconds (:data:`CHECK_SECONDS`): each stat had its own 30 s
    and busy retries' 60 s, so a slow store held a publish of thousands of parts for hours. Past
    it: DEADLINE_EXCEEDED ``PUBLISH_CHECK_DEADLINE_EXCEEDED``, nothing published (a busy refusal
    cut short by it stays that refusal)."""
    deadline = time.monotonic() + within
    looked = [0]

    def out_of_time() -> DeadlineExceeded:
        return DeadlineExceeded(
            f"looking for parts a failed publish of {name}/{version} left took more than "
            f"{within:g} s (check_within; {looked[0]} of at least {count + 1} looked at): "
            "the store is too slow or too busy for now; nothing was published, no data key "
            "asked for (this check's own bound, --check-within; no upload had begun)",
            # Its own reason: DEADLINE_EXCEEDED alone read as the upload's deadline passing.
            reason=Reason.PUBLISH_CHECK_DEADLINE_EXCEEDED,
        )

    def stored(store_version: str) -> store_pb.ModelInfo | None:
        def stat() -> store_pb.ModelInfo | None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise out_of_time()
            try:
                return stub.StatModel(
                    store_pb.StatModelRequest(name=name, version=store_version),
                    timeout=min(30.0, left),
                ).model
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code == grpc.StatusCode.NOT_FOUND:
                    return None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and left < 30.0:
                    raise out_of_time() from exc  # its time was what the check had left
                raise

        found = retrying_busy(
            stat, retry, what=f"checking {name}/{store_version}", deadline=deadline
        )
        looked[0] += 1
        return found

    if stored(version) is not None:
        raise AlreadyExists(
            f"{name}/{version} is already stored; nothing was published",
            reason=Reason.MODEL_EXISTS,
        )
    found = {
        index: info
        for index in range(count)
        if (info := stored(part_version(version, index))) is not None
    }
    # Past this publish's own parts, on while they are stored: a failed publish of more parts
    # left them there, and a refusal naming only the first ``count`` had them outlive the
    # version's publish, named by no manifest and no message (one more stat, usually).
    for index in range(count, MAX_PARTS):
        if (info := stored(part_version(version, index))) is None:
            break
        found[index] = info
    left = [part_version(version, index) for index in found]
    last = max((info.stored_at.ToDatetime(tzinfo=UTC) for info in found.values()), default=None)
    if last is not None:
        # Parts of a publish still running become its model's once its manifest is stored:
        # removed then, by commands handed out here, they broke every load of a published model.
        raise FailedPrecondition(
            f"{name}/{version} has no manifest, but {len(left)} part(s) a publish of it stored "
            f"are left ({_versions(left)}, the last stored at "
            f"{last.isoformat(timespec='seconds')}): that publish failed, or is still running "
            "(a publish that completes makes them its model's parts); nothing was published. "
            f"{once_no_publish(name, version)}, {_unblock(name, left)}",
            reason=Reason.PARTS_LEFT_BEHIND,
        )
