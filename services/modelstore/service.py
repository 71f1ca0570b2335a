"""The ModelStoreService gRPC servicer: protobuf in, domain calls, protobuf out — nothing else.

Errors are raised as :mod:`strongroom.errors` exceptions and turned into statuses by the
runtime's error-mapping interceptor; authorisation is the SPIFFE interceptor's job, driven by
:data:`METHOD_ROLES`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import StructureValidator, output_bytes
from strongroom.artifact.format import FORMAT_V3
from strongroom.errors import (
    REFUSAL_CALL,
    REFUSAL_LINE,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    StrongroomError,
)
from strongroom.identifiers import (
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    validate_name,
    validate_prefix,
    validate_sha256_hex,
    validate_version,
)
from strongroom.modelstore import _pagetoken
from strongroom.modelstore._upload import Authorize
from strongroom.modelstore.limits import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from strongroom.modelstore.publishers import PublisherScopes
from strongroom.modelstore.records import (
    CorruptEntry,
    ModelPage,
    ModelRecord,
    UploadClaims,
    listed_text,
)
from strongroom.modelstore.storage import Storage
from strongroom.pki.authz import verified_caller
from strongroom.reasons import Reason
from strongroom.runtime.callers import caller_key
from strongroom.runtime.gave_up import CallEnd, GaveUp
from strongroom.runtime.grpc_types import HandlerCollector
from strongroom.runtime.metrics import KEY_SLOTS_REPLACED
from strongroom.runtime.server import MessageLimits
from strongroom.wire import WireError, bytes_field_prefix, read_varint

log = logging.getLogger(__name__)

_DATA_FIELD = pb.GetModelResponse.DESCRIPTOR.fields_by_name["data"].number
# The key (field 1, length-delimited) that starts a PutModelRequest serialised with data first.
_PUT_DATA_KEY = pb.PutModelRequest.DESCRIPTOR.fields_by_name["data"].number << 3 | 2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelStoreService"].full_name
"""``strongroom.api.modelstore.v1.ModelStoreService``."""

ROLE_PUBLISHER = "publisher"
"""May upload new model versions."""
ROLE_READER = "reader"
"""May download, stat and list: granted to inference servers, publishers and admins."""
ROLE_ADMIN = "admin"
"""May delete model versions and replace key slots (re-wrap)."""

PUT_MODEL = f"/{SERVICE_NAME}/PutModel"
"""The upload: the store's one method whose requests carry artifact bytes."""

METHOD_ROLES: Mapping[str, str] = MappingProxyType(
    {
        PUT_MODEL: ROLE_PUBLISHER,
        f"/{SERVICE_NAME}/GetModel": ROLE_READER,
        f"/{SERVICE_NAME}/StatModel": ROLE_READER,
        f"/{SERVICE_NAME}/ListModels": ROLE_READER,
        f"/{SERVICE_NAME}/DeleteModel": ROLE_ADMIN,
        f"/{SERVICE_NAME}/ReplaceKeySlot": ROLE_ADMIN,
    }
)
"""The role each full method name requires (the authorisation interceptor's table)."""

CONTROL_PLANE: tuple[str, ...] = tuple(m for m, role in METHOD_ROLES.items() if role == ROLE_ADMIN)
"""The store's control plane, the admin role's methods (deletes, key-slot replacement): they may
use the workers reserved from uploads, downloads and reads (``server.control_plane_workers``), so
that an operator can still delete a model while readers hold every other worker."""

DEFAULT_MAX_CHUNK = 4 * 1024 * 1024
"""Largest ``data`` accepted in one PutModel message."""

MAX_SKIPPED_PER_PAGE = 10 * MAX_PAGE_SIZE
"""Models of other publishers one page of a scoped reader's listing skips at most (a publisher
listing a store of other tenants' models makes the store read them, not send them)."""

DEFAULT_DOWNLOAD_CHUNK = 512 * 1024
"""``data`` bytes per GetModel message.

Measured with tests/bench/modelstore_bench.py (2 cores, client in the same process): 512 KiB streams
at about 0.85 of a bare gRPC byte stream; 256 KiB costs more per byte, and 1 MiB or more drops to
0.3-0.65 on some runs, because each message allocates a few buffers of that size that glibc then
serves with mmap/munmap (page faults on every chunk) unless MALLOC_MMAP_THRESHOLD_ is raised.
"""


MESSAGE_OVERHEAD = 64 * 1024
"""Room for everything in a message besides its ``data`` (sizes, digests, a ModelInfo)."""

MAX_MODEL_INFO_BYTES = 768
"""An upper bound on one serialised ModelInfo in a ListModels page.

Its strings come from the publisher's header, each at most its format limit (name 128, version
64, content type 128, key id 128 characters, two 64-digit digests); with the numbers, timestamps
and field tags the largest record, framed in a page, is under 660 bytes.
"""


def message_limits(
    max_chunk: int = DEFAULT_MAX_CHUNK, download_chunk: int = DEFAULT_DOWNLOAD_CHUNK
) -> MessageLimits:
    """The store's message sizes, from its chunk sizes: an upload message carries at most
    ``max_chunk`` bytes of data, a download message ``download_chunk``, and a ListModels page
    at most MAX_PAGE_SIZE records of MAX_MODEL_INFO_BYTES (any publisher can make every record
    of a page its longest, so the largest page must fit, not a typical one). Every request but
    an upload's carries no ``data`` (names, a range, a page token, a wrapped key): at most
    MESSAGE_OVERHEAD, so that the wait for one's message is not an upload chunk's."""
    return MessageLimits(
        receive=max_chunk + MESSAGE_OVERHEAD,
        send=max(download_chunk, 512 * 1024, MAX_PAGE_SIZE * MAX_MODEL_INFO_BYTES)
        + MESSAGE_OVERHEAD,
        requests={method: MESSAGE_OVERHEAD for method in METHOD_ROLES if method != PUT_MODEL},
    )


def model_info(record: ModelRecord) -> pb.ModelInfo:
    """The wire form of a stored model's record."""
    created, stored = Timestamp(), Timestamp()
    created.FromDatetime(record.created_at)
    stored.FromDatetime(record.stored_at)
    return pb.ModelInfo(
        name=record.name,
        version=record.version,
        artifact_sha256=record.artifact_sha256,
        artifact_size=record.artifact_size,
        plaintext_size=record.plaintext_size,
        plaintext_sha256=record.plaintext_sha256,
        content_type=record.content_type,
        key_id=record.key_id,
        key_version=record.key_version,
        created_at=created,
        stored_at=stored,
        artifact_format=record.artifact_format,
    )


def corrupt_entry_info(entry: CorruptEntry) -> pb.CorruptEntry:
    """The wire form of an unreadable index entry in a listing."""
    return pb.CorruptEntry(
        name=listed_text(entry.name),
        version=listed_text(entry.version),
        reason=Reason.INDEX_CORRUPT,
        problem=entry.problem,
    )


def _key_order(entry: ModelRecord | CorruptEntry) -> tuple[bytes, bytes]:
    """An entry's place in a listing: its key's bytes, the index's and the bucket's order."""
    return entry.name.encode("utf-8", "surrogateescape"), entry.version.encode(
        "utf-8", "surrogateescape"
    )


def _list_response(page: ModelPage) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[model_info(r) for r in page.models],
        next_page_token=page.next_page_token,
        corrupt_entries=[corrupt_entry_info(e) for e in page.corrupt],
    )


class ModelStoreServicer(pb_grpc.ModelStoreServiceServicer):
    """Serves ModelStoreService from a :class:`~strongroom.modelstore.storage.Storage`.

    Each upload is checked by a fresh keyless :class:`~strongroom.artifact.StructureValidator`
    bounded by the storage's size limit, so an over-large header fails before the body; ``max_chunk``
    bounds the data in one upload message; ``download_chunk`` is the data per download message.
    ``publishers`` (None: any name) says which model names each publisher identity may upload,
    and read: a caller whose reads are not scoped (``unscoped_readers``: inference servers and
    admins) reads every model; any other reader (a publisher) only the names its rules cover, so
    one tenant's publisher neither downloads, stats nor lists another tenant's models.
    New uploads must be format 3 (the body key bound to the model) unless ``accept_unbound``
    (``modelstore.accept_unbound_uploads``, a migration window); stored artifacts of every format
    stay readable.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        download_chunk: int = DEFAULT_DOWNLOAD_CHUNK,
        publishers: PublisherScopes | None = None,
        unscoped_readers: frozenset[str] = frozenset(),
        accept_unbound: bool = False,
    ) -> None:
        if max_chunk <= 0 or download_chunk <= 0:
            raise ValueError("max_chunk and download_chunk must be positive")
        self._storage = storage
        self._publishers = publishers
        self._accept_unbound = accept_unbound
        self._unscoped_readers = unscoped_readers
        self._max_chunk = max_chunk
        self._download_chunk = download_chunk

    @property
    def max_chunk(self) -> int:
        """The largest ``data`` accepted in one PutModel message."""
        return self._max_chunk

    @property
    def download_chunk(self) -> int:
        """The ``data`` bytes of each GetModel message."""
        return self._download_chunk

    def _upload_chunks(
        self, requests: Iterator[pb.PutModelRequest | _DataOnly], claims: UploadClaims
    ) -> Iterator[bytes | memoryview]:
        first = True
        for request in requests:
            if request.artifact_size:
                if not first:
                    raise InvalidArgument(
                        "artifact_size may only be set in the first message",
                        reason=Reason.ARTIFACT_SIZE_NOT_FIRST,
                    )
                claims.size = request.artifact_size
            if request.artifact_sha256:
                digest = validate_sha256_hex(request.artifact_sha256)
                if claims.sha256 is not None and claims.sha256 != digest:
                    raise InvalidArgument(
                        "artifact_sha256 changed during the upload",
                        reason=Reason.CONFLICTING_SHA256,
                    )
                claims.sha256 = digest
            # Each access to a parsed message's bytes field copies it: read it once (a _DataOnly's
            # is a view of the received message, see _put_model_request).
            data = request.data
            if len(data) > self._max_chunk:
                raise InvalidArgument(
                    f"a message carries more than {self._max_chunk} bytes of data",
                    reason=Reason.CHUNK_TOO_LARGE,
                )
            first = False
            if data:
                yield data

    def PutModel(
        self,
        request_iterator: Iterator[pb.PutModelRequest | _DataOnly],
        context: grpc.ServicerContext,
    ) -> pb.PutModelResponse:
        """Stores one artifact streamed in chunks; name and version come from its header, and
        the caller must be allowed that name (``publishers``), and the artifact be format 3
        (unless unbound uploads are accepted), before its body is received."""
        claims = UploadClaims()
        validator = StructureValidator(max_artifact_size=self._storage.max_artifact_size)
        record = self._storage.put(
            self._upload_chunks(request_iterator, claims),
            validator,
            claims,
            authorize=self._authorizer(context, validator),
        )
        return pb.PutModelResponse(model=model_info(record))

    def _authorizer(
        self, context: grpc.ServicerContext, validator: StructureValidator
    ) -> Authorize | None:
        """The checks once ``validator`` has parsed the header: its name against the caller's
        ``publishers`` entry (no list: any name), then its format (None: neither applies). The
        caller is the one the authorisation interceptor verified for this RPC.

        A format-1 or -2 body is under the slot key itself, so whoever ever held a data key of
        its KEK (every publisher before format 3) could write one for any name, another
        tenant's included, and a reader accepting unbound artifacts would load it
        (ARTIFACT_FORMAT.md, section 10). Refused here before the version is reserved."""
        scopes = self._publishers
        if scopes is None and self._accept_unbound:
            return None
        accept_unbound = self._accept_unbound

        def authorize(name: str, version: str) -> None:
            if scopes is not None:
                caller = verified_caller(context)
                try:
                    scopes.check(str(caller.spiffe_id), name)
                except PermissionDenied as exc:
                    log.warning(
                        "refused upload of model %s version %s by %s (serial %x): %s",
                        name,
                        version,
                        caller.spiffe_id,
                        caller.serial,
                        exc.reason,
                        extra={
                            "model": name,
                            "version": version,
                            "reason": exc.reason,
                            REFUSAL_LINE: True,
                        },
                    )
                    raise
            header = validator.header  # parsed: it named the model
            if accept_unbound or (header is not None and header.format_version == FORMAT_V3):
                return
            fmt = "unknown" if header is None else header.format_version
            refused = FailedPrecondition(
                f"{name}/{version} is a format-{fmt} artifact, whose data key is not bound to its "
                "model: the store takes new uploads in format 3 only (publish with a current "
                "client), unless modelstore.accept_unbound_uploads is set for a migration",
                reason=Reason.ARTIFACT_KEY_UNBOUND,
            )
            log.warning(
                "refused upload of model %s version %s by %s: format %s, %s",
                name,
                version,
                caller_key(context),
                fmt,
                refused.reason,
                extra={
                    "model": name,
                    "version": version,
                    "reason": refused.reason,
                    REFUSAL_LINE: True,
                },
            )
            raise refused

        return authorize

    def _read_scope(self, context: grpc.ServicerContext) -> tuple[PublisherScopes, str] | None:
        """The publisher rules and caller that limit what this caller reads; None: unlimited
        (no ``publishers`` list, or an inference server or admin)."""
        if self._publishers is None:
            return None
        caller = str(verified_caller(context).spiffe_id)
        return None if caller in self._unscoped_readers else (self._publishers, caller)

    def _check_read(self, context: grpc.ServicerContext, name: str) -> None:
        """PermissionDenied unless this caller may read model ``name``: the same answer whether
        or not the model exists, so another tenant's names cannot be probed."""
        scope = self._read_scope(context)
        if scope is not None:
            scopes, caller = scope
            scopes.check(caller, name)

    def GetModel(  # type: ignore[override]  # serialised messages: see add_to_server
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Streams an artifact (or ``length`` bytes of it from ``offset``); ModelInfo comes first.

        Yields each ``GetModelResponse`` already serialised (see :func:`add_to_server`): the chunk
        is copied once, into the message, instead of into a protobuf object and out again.
        """
        name, version = validate_name(request.name), validate_version(request.version)
        self._check_read(context, name)
        # Made before the open: a caller giving up on a slow backend is logged as well.
        stop = _StopLine(context, name, version)
        try:
            yield from self._download(request, context, name, version, stop)
        except Exception:
            stop.answered()  # its failure is answered, and logged, as any RPC's
            raise
        stop.answered()

    def _download(
        self,
        request: pb.GetModelRequest,
        context: grpc.ServicerContext,
        name: str,
        version: str,
        stop: _StopLine,
    ) -> Iterator[bytes]:
        with self._storage.open(
            name, version, offset=request.offset, length=request.length or None
        ) as reader:
            info = model_info(reader.record)
            offset = reader.offset
            # Each message is made before its data is read, which the reader writes into it
            # (one copy, from the file; appended to a serialised head it was two): made in the
            # order the reader yields the data, and taken in that order.
            made: deque[bytes] = deque()
            framed = offset

            def frame(size: int) -> memoryview:
                nonlocal framed
                head = pb.GetModelResponse(offset=framed)
                if framed == reader.offset:  # the first message says what the model is
                    head.model.CopyFrom(info)
                framed += size
                prefix = bytes_field_prefix(head.SerializeToString(), _DATA_FIELD, size)
                message, view = output_bytes(len(prefix) + size)
                view[: len(prefix)] = prefix
                made.append(message)
                return view[len(prefix) :]

            for data in reader.chunks_into(self._download_chunk, frame):
                message = made.popleft()
                offset += len(data)
                stop.sent = offset - reader.offset  # before the yield: handed to gRPC
                yield message
            if offset == reader.offset:
                yield pb.GetModelResponse(model=info, offset=offset).SerializeToString()

    def StatModel(
        self, request: pb.StatModelRequest, context: grpc.ServicerContext
    ) -> pb.StatModelResponse:
        """Describes one stored model."""
        name, version = validate_name(request.name), validate_version(request.version)
        self._check_read(context, name)
        return pb.StatModelResponse(model=model_info(self._storage.stat(name, version)))

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        """Lists models by name prefix, a page at a time (page_size 0 = default, capped at max).

        An index entry the store cannot read is named in ``corrupt_entries``, never in
        ``models``: it failed every page that covered it (DATA_LOSS), so one edited or damaged
        entry stopped every client that acts on every model (a re-wrap after a KEK rotation, the
        check before a version is disabled). Reads of it stay DATA_LOSS INDEX_CORRUPT."""
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", reason=Reason.INVALID_PAGE_SIZE)
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        prefix = validate_prefix(request.name_prefix)
        scope = self._read_scope(context)
        if scope is None:
            return _list_response(
                self._storage.list(
                    prefix=prefix, page_size=page_size, page_token=request.page_token
                )
            )
        return _list_response(self._scoped_page(prefix, page_size, request.page_token, *scope))

    def _scoped_page(
        self, prefix: str, page_size: int, token: str, scopes: PublisherScopes, caller: str
    ) -> ModelPage:
        """One page of the models ``caller`` may read (and of the corrupt entries its rules
        cover), its token after its last entry.

        Only the key ranges its rules name are read (:meth:`PublisherScopes.listing_prefixes`,
        in order), not the whole listing with other tenants' models filtered out: a publisher
        whose names lie among many others' saw its listing stop, and made the store read every
        other model under the prefix on each page. A range is read up to the last name its
        rules cover (an exact name's range also holds longer names, sorted after it); others'
        models before that are skipped, boundedly (:data:`MAX_SKIPPED_PER_PAGE`): past it, with
        nothing to show, the caller is told to narrow the listing rather than be handed a token
        naming another's.

        A token names the last model returned, the caller's own; one naming a name outside the
        caller's rules is refused (forged, it would start the skipping anywhere), and a prefix
        none of its names can have is an empty page at once, so that neither answer says how
        many of another tenant's models lie where.
        """
        ranges = scopes.listing_prefixes(caller, prefix)
        if not ranges:
            return ModelPage(models=(), next_page_token="")
        after = _pagetoken.decode(token, prefix) if token else None
        if after is not None and not scopes.covers(caller, after[0]):
            raise InvalidArgument(
                "page_token does not come from a listing of your models",
                reason=Reason.INVALID_PAGE_TOKEN,
            )
        entries: list[ModelRecord | CorruptEntry] = []
        skipped = 0
        for sub in ranges:
            # Past the greatest rule in the range, no name sorts that a rule covers (an exact
            # name's versions come before its longer names; a prefix rule's names before any
            # name above it that does not start with it): the range ends at the first model
            # of another's there. Read on, an exact-name rule's range (``shared/m``) skipped
            # every other tenant's longer name after the caller's own (``shared/m-b/...``):
            # past the bound, every walk of its listing ended LISTING_TOO_SPARSE, its later
            # ranges never listed. None: a narrowed range (a name_prefix under a prefix rule),
            # whose every name is covered.
            last = max((r for r in scopes.rules.get(caller, ()) if r.startswith(sub)), default=None)
            sub_token = ""
            if after is not None:
                if after[0].startswith(sub):
                    sub_token = _pagetoken.encode(sub, *after)
                elif after[0] > sub:
                    continue  # the whole range lies before the token's model
            while True:
                # As many records as the page still needs, plus as many as were skipped so far (so
                # a range dense with others' models is read in growing pages): always a full
                # MAX_PAGE_SIZE made the S3 backend read up to 1,000 index records (a GET each)
                # for a page of one, ten times the records of a default page.
                wanted = min(MAX_PAGE_SIZE, page_size - len(entries) + skipped)
                page = self._storage.list(prefix=sub, page_size=wanted, page_token=sub_token)
                # The storage's page holds its records and corrupt entries apart; in key order
                # again, so that the token names the last entry this page shows.
                listed: list[ModelRecord | CorruptEntry] = [*page.models, *page.corrupt]
                listed.sort(key=_key_order)
                for entry in listed:
                    if scopes.covers(caller, entry.name):
                        entries.append(entry)
                        if len(entries) == page_size:
                            return _pagetoken.page_of(prefix, entries, more=True)
                        continue
                    if last is not None and entry.name > last:
                        break
                    skipped += 1
                    if skipped > MAX_SKIPPED_PER_PAGE:
                        if entries:
                            return _pagetoken.page_of(prefix, entries, more=True)
                        raise ResourceExhausted(
                            f"more than {MAX_SKIPPED_PER_PAGE} models of other publishers lie "
                            "here; list with a name_prefix within your own model names",
                            reason=Reason.LISTING_TOO_SPARSE,
                        )
                else:
                    if page.next_page_token:
                        sub_token = page.next_page_token
                        continue
                break  # the range is listed to its end, or past its last covered name
        return _pagetoken.page_of(prefix, entries, more=False)

    def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.ServicerContext
    ) -> pb.DeleteModelResponse:
        """Deletes one model version, or with ``corrupt_entry`` one index entry the store cannot
        read, named as ListModels' ``corrupt_entries`` named it (logged with the caller)."""
        if not request.corrupt_entry:
            self._storage.delete(validate_name(request.name), validate_version(request.version))
            return pb.DeleteModelResponse()
        # A listed entry's name and version are at most their byte limits, each byte at most
        # four characters as listed (\xff): anything longer names nothing listed.
        if (
            not request.name
            or not request.version
            or len(request.name) > 4 * MAX_NAME_LENGTH
            or len(request.version) > 4 * MAX_VERSION_LENGTH
        ):
            raise InvalidArgument(
                "a corrupt entry is named by a name and a version as ListModels lists them",
                reason=Reason.INVALID_MODEL_NAME,
            )
        held = self._storage.delete_corrupt(request.name, request.version)
        # What the entry held, with the caller: the line is the only record of a deletion, and
        # without the blob the entry named (a quarantined file among others once swept) and its
        # other fields the entry could be neither told apart nor put back.
        log.warning(
            "deleted the unreadable index entry %r %r for %s; it held: %s (its blob is kept)",
            request.name,
            request.version,
            caller_key(context),
            held,
            extra={"reason": Reason.INDEX_CORRUPT},
        )
        return pb.DeleteModelResponse()

    def ReplaceKeySlot(
        self, request: pb.ReplaceKeySlotRequest, context: grpc.ServicerContext
    ) -> pb.ReplaceKeySlotResponse:
        """Swaps a stored format-2 artifact's key slot for a re-wrapped one (compare-and-swap)."""
        name, version = validate_name(request.name), validate_version(request.version)
        before = self._storage.stat(name, version)
        try:
            record = self._storage.replace_key_slot(
                name,
                version,
                expected_key_version=request.expected_key_version,
                key_version=request.key_version,
                wrapped_dek=request.wrapped_data_key,
                expected_wrapped_dek=request.expected_wrapped_data_key,
            )
        except StrongroomError as exc:
            KEY_SLOTS_REPLACED.add(1, {"key_id": before.key_id, "outcome": exc.reason})
            raise
        replaced = record.artifact_sha256 != before.artifact_sha256
        KEY_SLOTS_REPLACED.add(
            1, {"key_id": record.key_id, "outcome": "replaced" if replaced else "unchanged"}
        )
        return pb.ReplaceKeySlotResponse(model=model_info(record), replaced=replaced)


class _StopLine:
    """The one ``download stopped`` line of a GetModel whose call ended before its stream did: its
    caller gave up, or the server's own watchdog ended it (a client that stopped reading, or read
    too slowly). Written when the call ends, on gRPC's thread: gRPC never closes a stream's
    generator, which only a collection closes once nothing refers to it (the line waited on
    that, and could come late or never). Nothing for a stream :meth:`answered` first."""

    __slots__ = ("_answered", "_context", "_end", "_name", "_peer", "_version", "sent")

    def __init__(self, context: grpc.ServicerContext, name: str, version: str) -> None:
        self._context = context
        self._name = name
        self._version = version
        self._peer = context.peer()  # read while the call lasts: gRPC's is empty once it ended
        self._answered = False
        self.sent = 0
        """The artifact's bytes handed to gRPC so far (the caller may not have them all)."""
        # Judged first: gRPC runs a call's callbacks in the order they were added.
        self._end = CallEnd(context)
        if not context.add_callback(self._ended):
            self._ended()  # the call has already ended

    def answered(self) -> None:
        """The stream ended here (its last message handed to gRPC, or its failure answered)."""
        self._answered = True

    def _ended(self) -> None:
        if self._answered:
            return
        ended_by = self._end.server_reason()
        why = self._end.gave_up()
        fields: dict[str, object]
        if ended_by is not None:
            # To the handler the watchdog's cancel looked like its caller's (the line said
            # gave_up CANCELLED), and a stream ended too slow like a stream closed while it lasts.
            how, reason, fields = (
                f"the server ended it ({ended_by})",
                ended_by,
                {"ended_by": "server"},
            )
        elif why is not None:
            deadline = why is GaveUp.DEADLINE
            how = "its caller's deadline passed" if deadline else "its call was cancelled"
            # The reason its budget counts it under, and the summary of lines not written names
            # (without one it said reason "", as no other refusal line does).
            reason = Reason.DEADLINE_EXCEEDED if deadline else Reason.CANCELLED
            fields = {"gave_up": why.value}
        else:
            return
        log.info(
            "download stopped: %s",
            how,
            extra={
                "model": self._name,
                "version": self._version,
                "bytes_sent": self.sent,
                "peer": self._peer,
                **fields,
                "reason": reason,
                # Its caller chooses how many there are: within its budget of such lines, kept on
                # the call (this runs on gRPC's thread, not the call's).
                REFUSAL_LINE: True,
                REFUSAL_CALL: self._context,
            },
        )


def _pass_through(message: bytes) -> bytes:
    return message


class _DataOnly:
    """A PutModelRequest that holds nothing but ``data``: a view of the received message."""

    __slots__ = ("data",)

    artifact_size = 0
    artifact_sha256 = ""

    def __init__(self, data: memoryview) -> None:
        self.data = data


def _put_model_request(message: bytes) -> pb.PutModelRequest | _DataOnly:
    """A PutModel message, parsed; one that is exactly its ``data`` field (every message but an
    upload's first, as protobuf serialises them) as a view of its bytes, without a copy.

    Through the protobuf runtime each chunk was copied out of the message again when the
    servicer read ``data`` (the field hands out a new ``bytes`` on each access). Anything else
    (other fields, several data fields, unknown fields, a malformed message) is parsed by
    protobuf, so the result is what protobuf reads, and what it refuses is refused."""
    if message[:1] == bytes((_PUT_DATA_KEY,)):
        try:
            length, start = read_varint(message, 1)
        except WireError:
            length, start = -1, 0
        if start + length == len(message):
            return _DataOnly(memoryview(message)[start:])
    return pb.PutModelRequest.FromString(message)


def add_to_server(servicer: ModelStoreServicer, server: grpc.Server) -> None:
    """Registers ``servicer`` like ``add_ModelStoreServiceServicer_to_server``, except that
    GetModel's responses, which it serialises itself, pass through unchanged, and PutModel's
    messages are read by :func:`_put_model_request` (each chunk a view, not a copy).

    Every server of this servicer must register it this way: the generated function would hand
    GetModel's bytes to ``GetModelResponse.SerializeToString``, which rejects them.
    """
    collector = HandlerCollector()
    pb_grpc.add_ModelStoreServiceServicer_to_server(servicer, collector)  # type: ignore[arg-type]
    handlers = dict(collector.handlers)
    handlers["PutModel"] = grpc.stream_unary_rpc_method_handler(
        servicer.PutModel,
        request_deserializer=_put_model_request,
        response_serializer=pb.PutModelResponse.SerializeToString,
    )
    handlers["GetModel"] = grpc.unary_stream_rpc_method_handler(
        servicer.GetModel,
        request_deserializer=pb.GetModelRequest.FromString,
        response_serializer=_pass_through,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
