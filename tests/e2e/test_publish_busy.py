"""A publisher refused as busy by the model store retries the refused call, over real mTLS.

The store gives each certificate a share of its streams (``server.max_streams_per_certificate``,
here 1). Before a chosen upload, a stalled upload of the publisher's own certificate takes that
share, so the real store refuses the upload ``RESOURCE_EXHAUSTED``
``TOO_MANY_STREAMS_PER_CERTIFICATE``; the stall ends as soon as the refusal is seen. A publish
used to fail there, a multi-part one with the parts it had stored left behind (a publisher may not
delete them: the version could not be published again until an admin did). Counts only: uploads
tried, records and blobs stored.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import parse_header
from strongroom.artifact.c2sp import PREAMBLE_SIZE, TAG_SIZE
from strongroom.artifact.manifest import ManifestLayout, PartMissing
from strongroom.cli.client import Client
from strongroom.cli.main import main
from strongroom.client import multipart, publish
from strongroom.client.busy import CLIENT_RETRY, NO_RETRY, BusyRetry
from strongroom.client.fetch import ModelFetcher, grpc_source, retrying_source
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.client.multipart import (
    PublishedParts,
    _left_note,
    _rm_commands,
    files_parts,
    publish_parts,
)
from strongroom.client.publish import Published, SentWhole, publish_model, upload_artifact
from strongroom.client.remote import peer_reason
from strongroom.client.server_evidence import ConnectionEnded, ServerConnection
from strongroom.dev.devstack import DevStack
from strongroom.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from strongroom.inference.signature import SignaturePolicy
from strongroom.pki import WorkloadIdentity
from tests.abuse.releases import StalledCalls, settled
from tests.conftest import stack_root
from tests.inference.test_signature import keypair
from tests.modelstore.artifacts import make_artifact
from tests.modelstore.backends import assert_clean, blob_count
from tests.runtime.test_stopping import command_with_stderr

KEY_ID = "busy-key"
STORE_SERVER = {"max_streams_per_certificate": 1}
"""The store's server settings: the fixture's, and a test that restarts the store restores them."""
PUT = "/strongroom.api.modelstore.v1.ModelStoreService/PutModel"


@pytest.fixture(autouse=True)
def _ctrl_c_as_a_command_line_gets_it() -> Iterator[None]:
    """Python's own SIGINT handler (a KeyboardInterrupt in the main thread) for each test, as a
    command-line process has it: the interrupt tests signal this process. A handler a test left
    behind no longer gets here (a service gives its signals back, and the suite's signal guard
    fails a test that leaves one: tests/conftest.py), but the runner's may not be Python's: a
    pytest started as a background job of a non-interactive shell (``pytest ... &`` in a CI
    script) inherits SIGINT ignored, and Python then installs no handler of its own; the
    interrupt was ignored and the publish waited on its FIFO for good."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """A broker and a store whose certificates have a share of one stream each."""
    root = stack_root(tmp_path_factory, "publish-busy", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        dev.start_in_process("keybroker")
        dev.start_in_process("modelstore", server=STORE_SERVER)
        dev.create_release_key(dev.identity("admin"), KEY_ID, policy_version="1")
        yield dev


@pytest.fixture(scope="module")
def publisher(stack: DevStack) -> WorkloadIdentity:
    """The publisher's one certificate (each enrolment is another, with a share of its own)."""
    return stack.identity("publisher")


def _open_streams(stack: DevStack) -> int:
    host = stack.services["modelstore"].handle.host
    return int(host.streams.open_streams(stack.spiffe_id("publisher")))


class BusyBefore(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Counts the publisher's uploads; before those numbered in ``refused`` (from 0), a stalled
    upload of the same certificate takes its one stream, and once the store has answered the
    upload, the stall ends. ``outcomes`` holds each upload's status and reason."""

    def __init__(
        self,
        stack: DevStack,
        publisher: WorkloadIdentity,
        refused: set[int],
        *,
        end_stall: bool = True,
    ) -> None:
        self._stack = stack
        self._publisher = publisher
        self._refused = refused
        self._end_stall = end_stall
        self.outcomes: list[tuple[str, str | None]] = []
        self.stalls: list[StalledCalls] = []

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        if len(self.outcomes) in self._refused:
            assert settled(lambda: _open_streams(self._stack) == 0)
            stall = StalledCalls(self._stack, self._publisher, "modelstore", PUT, 1, 60)
            self.stalls.append(stall)
            assert settled(lambda: _open_streams(self._stack) == 1)
        outcome = continuation(details, request_iterator)
        error = outcome.exception()
        self.outcomes.append(
            ("OK", None) if error is None else (error.code().name, peer_reason(error))
        )
        if self._end_stall:
            self.end()
        return outcome

    def end(self) -> None:
        """Ends the stalls (each ends without its message) and waits until the store let go."""
        while self.stalls:
            self.stalls.pop().end()
        assert settled(lambda: _open_streams(self._stack) == 0)


REFUSED = ("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_CERTIFICATE")


def _store(
    stack: DevStack, publisher: WorkloadIdentity, interceptor: grpc.Interceptor
) -> grpc.Channel:
    """The publisher's channel to the store, through ``interceptor``."""
    channel = stack.channel(publisher, "modelstore")
    return grpc.intercept_channel(channel, interceptor)


def _refused_left_behind(
    stack: DevStack, publisher: WorkloadIdentity, shards: list[Path], name: str
) -> str:
    """The message of a publish of ``shards`` as ``name`` version 1 refused ``PARTS_LEFT_BEHIND``
    before it asked the broker for anything or uploaded a part."""
    broker = CountCalls()
    uploads = BusyBefore(stack, publisher, set())
    with pytest.raises(FailedPrecondition) as refused:
        _publish(
            stack,
            publisher,
            shards,
            name,
            _store(stack, publisher, uploads),
            broker=grpc.intercept_channel(stack.channel(publisher, "keybroker"), broker),
        )
    assert (refused.value.reason, broker.methods, uploads.outcomes) == ("PARTS_LEFT_BEHIND", [], [])
    return refused.value.message


def _records(stack: DevStack, name: str) -> list[tuple[str, str]]:
    storage = stack.services["modelstore"].handle.storage
    return sorted((r.name, r.version) for r in storage.records() if r.name == name)


def _admin_rm(stack: DevStack, name: str, version: str) -> None:
    admin = store_grpc.ModelStoreServiceStub(stack.channel(stack.identity("admin"), "modelstore"))
    admin.DeleteModel(store_pb.DeleteModelRequest(name=name, version=version))


@contextmanager
def _store_restarted(stack: DevStack) -> Iterator[None]:
    """Starts the store again, with the fixture's settings, if the block stopped it: the tests
    after it share the module's stack."""
    try:
        yield
    finally:
        if "modelstore" not in stack.services:
            stack.start_in_process("modelstore", server=STORE_SERVER)


def _model_file(tmp_path: Path, size: int) -> Path:
    """``model.bin`` in ``tmp_path``: ``size`` random bytes, the single-file publisher's input."""
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(size))
    return model


def _artifact_file(tmp_path: Path, name: str, size: int) -> Path:
    """``model.artifact`` in ``tmp_path``: ``name`` version 1 of ``size`` random bytes, ready to
    upload."""
    path = tmp_path / "model.artifact"
    path.write_bytes(make_artifact(name, "1", os.urandom(size)))
    return path


def _shards(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    for i in range(count):
        (folder / f"shard-{i}.bin").write_bytes(os.urandom(3000 + i))
    return sorted(folder.iterdir())


def _publish(
    stack: DevStack,
    publisher: WorkloadIdentity,
    shards: list[Path],
    name: str,
    store: grpc.Channel,
    broker: grpc.Channel | None = None,
    **options: Any,
) -> PublishedParts:
    """Publishes ``shards`` as the parts of ``name`` version 1 through ``store`` and ``broker``
    (the publisher's own channel to the broker if None), with ``publish_parts``'s ``options``."""
    return publish_parts(
        files_parts(shards),
        name=name,
        version="1",
        key_id=KEY_ID,
        broker=broker or stack.channel(publisher, "keybroker"),
        store=store,
        layout=ManifestLayout.FILES,
        **options,
    )


def _publish_one(
    stack: DevStack,
    publisher: WorkloadIdentity,
    model: Path,
    name: str,
    *,
    broker: grpc.Channel | None = None,
    store: grpc.Channel | None = None,
    key_id: str = KEY_ID,
    **options: Any,
) -> Published:
    """Publishes the one file ``model`` as ``name`` version 1 through ``store`` and ``broker``
    (the publisher's own channels where None), with ``publish_model``'s ``options``."""
    return publish_model(
        model,
        name=name,
        version="1",
        key_id=key_id,
        broker=broker or stack.channel(publisher, "keybroker"),
        store=store or stack.channel(publisher, "modelstore"),
        **options,
    )


def _publish_command(
    stack: DevStack, capsys: pytest.CaptureFixture[str], files: list[Path], name: str, *more: str
) -> tuple[int, str]:
    """``strongroom model publish FILES --name NAME --version 1`` as the publisher (KEY_ID, no
    progress), then ``more``: its exit status and what it wrote on stderr."""
    config = str(stack.write_client_config("publisher"))
    argv = ["model", "publish", *map(str, files), "--name", name, "--version", "1"]
    code = main([*argv, "--key-id", KEY_ID, "--no-progress", "--client-config", config, *more])
    return code, capsys.readouterr().err


def test_a_multi_part_publish_refused_busy_mid_way_retries_that_part_and_stores_each_once(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    storage = stack.services["modelstore"].handle.storage
    blobs = blob_count(storage)
    uploads = BusyBefore(stack, publisher, refused={1})  # the second part's first try
    published = _publish(
        stack,
        publisher,
        _shards(tmp_path / "shards", 3),
        "busy/multi",
        _store(stack, publisher, uploads),
    )
    assert uploads.outcomes == [("OK", None), REFUSED, ("OK", None), ("OK", None), ("OK", None)]
    assert [p.version for p in published.parts] == ["1+part.0", "1+part.1", "1+part.2"]
    assert _records(stack, "busy/multi") == [
        ("busy/multi", "1"),
        ("busy/multi", "1+part.0"),
        ("busy/multi", "1+part.1"),
        ("busy/multi", "1+part.2"),
    ]
    assert blob_count(storage) == blobs + 4  # nothing stored twice, nothing of the refused try
    assert_clean(storage)


def test_a_manifest_refused_busy_is_sent_again(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    uploads = BusyBefore(stack, publisher, refused={2})
    _publish(
        stack,
        publisher,
        _shards(tmp_path / "shards", 2),
        "busy/manifest",
        _store(stack, publisher, uploads),
    )
    assert uploads.outcomes == [("OK", None), ("OK", None), REFUSED, ("OK", None)]
    assert len(_records(stack, "busy/manifest")) == 3


def test_a_single_publish_refused_busy_is_retried(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    storage = stack.services["modelstore"].handle.storage
    blobs = blob_count(storage)
    path = _model_file(tmp_path, 5000)
    uploads = BusyBefore(stack, publisher, refused={0})
    published = _publish_one(
        stack,
        publisher,
        path,
        "busy/single",
        store=_store(stack, publisher, uploads),
    )
    assert uploads.outcomes == [REFUSED, ("OK", None)]
    assert published.model.name == "busy/single"
    assert _records(stack, "busy/single") == [("busy/single", "1")]
    assert blob_count(storage) == blobs + 1
    assert_clean(storage)


def test_a_refusal_that_is_not_busy_is_not_retried(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    path = _model_file(tmp_path, 5000)
    broker = stack.channel(publisher, "keybroker")
    store = stack.channel(publisher, "modelstore")
    publish_model(path, name="busy/exists", version="1", key_id=KEY_ID, broker=broker, store=store)
    waits: list[float] = []
    uploads = BusyBefore(stack, publisher, set())
    with pytest.raises(grpc.RpcError) as info:
        _publish_one(
            stack,
            publisher,
            path,
            "busy/exists",
            broker=broker,
            store=_store(stack, publisher, uploads),
            retry=BusyRetry(sleep=waits.append),
        )
    assert (info.value.code(), peer_reason(info.value)) == (  # type: ignore[attr-defined]
        grpc.StatusCode.ALREADY_EXISTS,
        "MODEL_EXISTS",
    )
    assert (len(uploads.outcomes), waits) == (1, [])


def test_a_store_busy_past_the_bound_ends_the_publish_with_its_refusal(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    storage = stack.services["modelstore"].handle.storage
    path = _model_file(tmp_path, 5000)
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    uploads = BusyBefore(stack, publisher, refused={0}, end_stall=False)
    try:
        with pytest.raises(grpc.RpcError) as info:
            _publish_one(
                stack,
                publisher,
                path,
                "busy/never",
                store=_store(stack, publisher, uploads),
                retry=BusyRetry(within=1.0, first_delay=0.2, sleep=wait),
            )
    finally:
        uploads.end()
    assert (info.value.code(), peer_reason(info.value)) == (  # type: ignore[attr-defined]
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS_PER_CERTIFICATE",
    )
    # Retried, every try refused, and no wait began that would end past the bound.
    assert waits and sum(waits) <= 1.0
    assert uploads.outcomes == [REFUSED] * (len(waits) + 1)
    assert _records(stack, "busy/never") == []
    assert_clean(storage)


GET = "/strongroom.api.modelstore.v1.ModelStoreService/GetModel"


def test_a_download_refused_busy_is_made_again_and_nothing_else_is(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """`strongroom model fetch`'s downloads (ModelFetcher's retry=): a reader's certificate at
    its one-stream share is refused, and its download is made again once the share is free."""
    path = _model_file(tmp_path, 5000)
    stored = _publish_one(stack, publisher, path, "busy/fetched").model
    reader = stack.identity("inference")
    host = stack.services["modelstore"].handle.host

    def open_streams() -> int:
        return int(host.streams.open_streams(stack.spiffe_id("inference")))

    stalls = [StalledCalls(stack, reader, "modelstore", GET, 1, 60)]
    assert settled(lambda: open_streams() == 1)
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        while stalls:
            stalls.pop().end()
        assert settled(lambda: open_streams() == 0)

    source = retrying_source(
        grpc_source(stack.channel(reader, "modelstore")), BusyRetry(sleep=wait)
    )
    try:
        data = b"".join(bytes(piece) for piece in source("busy/fetched", "1"))
    finally:  # a failure here must not leave the reader's share taken for the tests after it
        while stalls:
            stalls.pop().end()
    assert len(waits) == 1
    assert hashlib.sha256(data).hexdigest() == stored.artifact_sha256
    with pytest.raises(NotFound):
        list(source("busy/absent", "1"))
    assert len(waits) == 1


def test_an_upload_of_an_artifact_file_refused_busy_is_sent_again(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """`strongroom model upload`: the file, already encrypted, is read and sent again."""
    storage = stack.services["modelstore"].handle.storage
    blobs = blob_count(storage)
    path = _artifact_file(tmp_path, "busy/uploaded", 5000)
    uploads = BusyBefore(stack, publisher, refused={0})
    uploaded = upload_artifact(path, store=_store(stack, publisher, uploads))
    assert uploads.outcomes == [REFUSED, ("OK", None)]
    assert uploaded.model.artifact_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _records(stack, "busy/uploaded") == [("busy/uploaded", "1")]
    assert blob_count(storage) == blobs + 1


class SentBytes(BusyBefore):
    """:class:`BusyBefore` that also keeps the artifact bytes each upload handed to gRPC."""

    def __init__(self, stack: DevStack, publisher: WorkloadIdentity, refused: set[int]) -> None:
        super().__init__(stack, publisher, refused)
        self.sent: list[bytearray] = []

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        sent = bytearray()
        self.sent.append(sent)

        def kept() -> Iterator[Any]:
            for request in request_iterator:
                sent.extend(request.data if hasattr(request, "data") else bytes(request))
                yield request

        return super().intercept_stream_unary(continuation, details, kept())


def test_a_part_refused_busy_after_its_bytes_went_out_is_resealed_under_a_new_salt(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """What the store was sent for a refused part and for its retry: the refused try's header
    and preamble (salt, key commitment) did go out, and its first chunks may (gRPC sends while
    the store decides), so the retry must not seal under that try's derived key and nonces: the
    same header (the manifest names it), another salt and commitment (another key); and the
    model the retry published decrypts to the files (the manifest holds the retry's digest)."""
    shards = _shards(tmp_path / "shards", 2)
    uploads = SentBytes(stack, publisher, refused={1})
    _publish(stack, publisher, shards, "busy/resealed", _store(stack, publisher, uploads))
    assert uploads.outcomes == [("OK", None), REFUSED, ("OK", None), ("OK", None)]
    refused, retried = uploads.sent[1], uploads.sent[2]
    head = parse_header(bytes(retried)).head
    preamble = len(head) + PREAMBLE_SIZE
    # Not vacuous: the refused try's header and preamble (its salt and key commitment) went out
    # (its first message; more of it as the store is slower to refuse).
    assert len(retried) > preamble + TAG_SIZE
    assert len(refused) >= preamble
    assert refused[: len(head)] == retried[: len(head)] == head
    assert refused[len(head) : preamble] != retried[len(head) : preamble]
    assert refused[preamble:] != retried[preamble : len(refused)] or len(refused) == preamble

    reader = stack.identity("inference")
    # One part at a time: the reader's certificate has a share of one stream here.
    fetcher = ModelFetcher(stack.channel(reader, "modelstore"), _release(stack, reader), parallel=1)
    with fetcher.fetch("busy/resealed", "1") as model:
        assert [bytes(part.view) for part in model.parts] == [p.read_bytes() for p in shards]


def _release(stack: DevStack, reader: WorkloadIdentity) -> KeyReleaseClient:
    """A real attested key release for ``reader`` (the simulated TEE the broker trusts)."""
    return stack.release_client(reader)


def test_a_part_download_waiting_to_retry_stops_when_another_part_failed(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """A fetch of parts in parallel: part 0 refused busy (the reader's one-stream share held by
    a stall) waits to retry, and meanwhile part 1 is missing. The fetch fails with the missing
    part at once: part 0's download is not made again (it was, after its wait, for a fetch
    already failed, and again for as long as the bound allowed, the busy refusal then raised as
    the fetch's cause over the missing part)."""
    _publish(
        stack,
        publisher,
        _shards(tmp_path / "shards", 2),
        "busy/stopped",
        stack.channel(publisher, "modelstore"),
    )
    reader = stack.identity("inference")
    host = stack.services["modelstore"].handle.host
    download = grpc_source(stack.channel(reader, "modelstore"))
    refused = threading.Event()
    stalls: list[StalledCalls] = []
    tries: list[str] = []

    def source(name: str, version: str) -> Iterator[bytes | memoryview]:
        if version == "1+part.1":
            assert refused.wait(30)
            raise NotFound("gone", reason="MODEL_NOT_FOUND")
        if version == "1+part.0":
            tries.append(version)
            if not stalls:  # the manifest's download is done: the share is taken from here on
                stalls.append(StalledCalls(stack, reader, "modelstore", GET, 1, 60))
                assert settled(lambda: host.streams.open_streams(stack.spiffe_id("inference")) == 1)
            try:
                return download(name, version)
            finally:
                refused.set()
        return download(name, version)

    fetcher = ModelFetcher(
        source,
        _release(stack, reader),
        parallel=2,
        retry=BusyRetry(within=12.0, first_delay=5.0),
    )
    try:
        with pytest.raises(PartMissing):
            fetcher.fetch("busy/stopped", "1")
    finally:
        while stalls:
            stalls.pop().end()
    assert tries == ["1+part.0"]


def test_a_download_refused_busy_near_the_fetch_deadline_ends_with_the_refusal(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """A fetch whose next wait to retry would end past its deadline raises the busy refusal
    then. It slept the wait anyway and made the download again with no time left: the fetch
    overran its deadline by the wait and ended DEADLINE_EXCEEDED, the store's refusal hidden."""
    path = _model_file(tmp_path, 5000)
    _publish_one(stack, publisher, path, "busy/deadline")
    reader = stack.identity("inference")
    host = stack.services["modelstore"].handle.host
    stall = StalledCalls(stack, reader, "modelstore", GET, 1, 60)
    waits: list[float] = []
    try:
        assert settled(lambda: host.streams.open_streams(stack.spiffe_id("inference")) == 1)
        fetcher = ModelFetcher(
            stack.channel(reader, "modelstore"),
            _release(stack, reader),
            retry=BusyRetry(first_delay=5.0, sleep=waits.append),
        )
        with pytest.raises(ResourceExhausted) as info:
            fetcher.fetch("busy/deadline", "1", timeout=2.0)
    finally:
        stall.end()
    assert info.value.reason == "TOO_MANY_STREAMS_PER_CERTIFICATE"
    assert waits == []


class OneAhead(BusyBefore):
    """:class:`BusyBefore` that hands gRPC each upload's requests one ahead: each next() gRPC makes
    has the next request made too, so the thread feeding a call is inside the publisher's next()
    whenever the call ends, as it may be (a refusal can come while the publisher reads)."""

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        def ahead() -> Iterator[Any]:
            end = object()
            held = next(request_iterator, end)
            while held is not end:
                following = next(request_iterator, end)
                yield held
                held = following

        return super().intercept_stream_unary(continuation, details, ahead())


class HeldReads:
    """Every file the publisher opens (``publish._open_readable``), its reads in gRPC's feeding
    threads put in the order in which tries sharing one handle lost bytes: the refused try's
    feeding thread, at its second read (one made, one to come in the same ``next()`` when the
    store's refusal ends the call, :class:`OneAhead`), waits until the retry's feeding thread is
    about to make its first, which waits until that held read has returned. With one handle the
    retry sought back, the held read took the retry's bytes.

    Held at the read, not in ``progress``: the retry starts only once the refused try's call of
    ``progress`` has returned (:class:`~strongroom.client.publish.TryProgress`), so a thread held
    there until the retry began held both until the bound (30 s) and read after it, in no set
    order with the retry."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.refused_try: threading.Thread | None = None
        self._reads = 0
        self.retry_reads = threading.Event()  # the retry's feeding thread is about to read
        self.held_read = threading.Event()  # the refused try's held read has returned
        hold = self

        class Held(io.BufferedReader):
            def read(self, size: int | None = -1) -> bytes:
                with hold.ordered():
                    return super().read(size)

            def readinto(self, buffer: Any) -> int:
                with hold.ordered():
                    return super().readinto(buffer)

        def opened(path: Path) -> BinaryIO:
            return Held(io.FileIO(path))

        monkeypatch.setattr(publish, "_open_readable", opened)

    @contextmanager
    def ordered(self) -> Iterator[None]:
        """One read, held as the class says (the main thread's reads are not a try's)."""
        me = threading.current_thread()
        if me is threading.main_thread():
            yield
            return
        if self.refused_try is None:
            self.refused_try = me
        if me is not self.refused_try:
            if not self.retry_reads.is_set():
                self.retry_reads.set()
                self.held_read.wait(30)
            yield
            return
        self._reads += 1
        if self._reads != 2:
            yield
            return
        self.retry_reads.wait(30)
        try:
            yield
        finally:
            self.held_read.set()


def test_a_refused_try_still_reading_does_not_move_the_retry_s_read_position(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused try's feeding thread is inside next() when the store's refusal ends the call
    (:class:`OneAhead`), between the two reads of a file shorter than a chunk; its second read is
    held until the retry is about to read (:class:`HeldReads`). The tries shared one file handle:
    the held thread read from where the retry had just sought back to, and the retry found the
    unchanged file short (PLAINTEXT_SIZE_MISMATCH)."""
    path = tmp_path / "model.bin"
    content = os.urandom(5000)
    path.write_bytes(content)
    reads = HeldReads(monkeypatch)
    uploads = OneAhead(stack, publisher, refused={0})
    published = _publish_one(
        stack,
        publisher,
        path,
        "busy/position",
        store=_store(stack, publisher, uploads),
        retry=BusyRetry(sleep=lambda _seconds: None),
    )
    assert reads.retry_reads.is_set() and reads.held_read.is_set()  # the race was run, not missed
    assert uploads.outcomes == [REFUSED, ("OK", None)]
    assert published.model.artifact_size > len(content)
    reader = stack.identity("inference")
    fetcher = ModelFetcher(stack.channel(reader, "modelstore"), _release(stack, reader))
    with fetcher.fetch("busy/position", "1") as model:
        assert bytes(model.parts[0].view) == content


def test_a_refused_upload_still_reading_does_not_move_the_retry_s_read_position(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`strongroom model upload`: as for a publish, the refused try's feeding thread, held in
    next() before its second read until the retry is about to read its first block
    (:class:`HeldReads`), read the second from the handle the tries shared; the retry missed it
    and ended MODEL_FILE_CHANGED for a file nobody changed."""
    path = _artifact_file(tmp_path, "busy/reread", 3 * 1024 * 1024)
    reads = HeldReads(monkeypatch)
    uploads = OneAhead(stack, publisher, refused={0})
    uploaded = upload_artifact(
        path,
        store=_store(stack, publisher, uploads),
        retry=BusyRetry(sleep=lambda _seconds: None),
    )
    assert reads.retry_reads.is_set() and reads.held_read.is_set()  # the race was run, not missed
    assert uploads.outcomes == [REFUSED, ("OK", None)]
    assert uploaded.model.artifact_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_refused_part_s_late_piece_does_not_become_the_retry_s_digest(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_parts: the refused try's feeding thread has its first chunk read and sealed when
    the store's refusal ends the call, and hands it on (``on_piece``) only once the retry has
    sent its last piece. The tries collected the footer in one shared buffer, so that late
    piece's last 32 bytes went into the manifest as the part's digest, and the fetch failed
    DATA_LOSS PART_MISMATCH. No callback runs between the writer's yield and ``on_piece``, so the thread is
    held there by wrapping the part's pieces (``_messages``); everything else is real."""
    shard = tmp_path / "shard.bin"
    shard.write_bytes(os.urandom(50_000))  # whole chunks in the first block: a piece of them
    calls: list[int] = []
    release = threading.Event()
    refused_thread: list[threading.Thread] = []
    real = multipart._messages

    def messages(pieces: Iterator[bytes], on_piece: Any) -> Iterator[Any]:
        call = len(calls)
        calls.append(call)

        def held() -> Iterator[bytes]:
            for index, piece in enumerate(pieces):
                if call == 0 and index == 1:  # the refused try's first chunks, read and sealed
                    refused_thread.append(threading.current_thread())
                    assert release.wait(30)
                yield piece
            if call == 1:  # the retry's last piece is handed on: the late one comes now
                assert refused_thread, "the refused try's thread never reached its first chunk"
                release.set()
                # gRPC's thread feeding the refused call ends once that piece is handed on
                # (its file closed meanwhile, the next read fails).
                refused_thread[0].join(30)
                assert not refused_thread[0].is_alive()

        return real(held(), on_piece)

    monkeypatch.setattr(multipart, "_messages", messages)
    uploads = OneAhead(stack, publisher, refused={0})  # its thread in next() when refused
    _publish(
        stack,
        publisher,
        [shard],
        "busy/late",
        _store(stack, publisher, uploads),
        retry=BusyRetry(sleep=lambda _seconds: None),
    )
    assert release.is_set() and calls == [0, 1, 2]  # the race was run, not missed
    assert uploads.outcomes == [REFUSED, ("OK", None), ("OK", None)]
    reader = stack.identity("inference")
    fetcher = ModelFetcher(stack.channel(reader, "modelstore"), _release(stack, reader))
    with fetcher.fetch("busy/late", "1") as model:
        assert bytes(model.parts[0].view) == shard.read_bytes()


def test_a_signed_model_changed_while_its_publish_waited_to_retry_is_not_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The signature was made once, before the tries: a file rewritten (same size) while the
    publish waited to retry was stored with a bundle naming the old bytes, a model whose
    signature failed every load. Now the try ends MODEL_FILE_CHANGED before its last piece."""
    storage = stack.services["modelstore"].handle.storage
    private, _public = keypair(tmp_path, "signer")
    path = _model_file(tmp_path, 5000)
    uploads = BusyBefore(stack, publisher, refused={0})

    def rewrite(_seconds: float) -> None:  # the same size, other bytes
        path.write_bytes(os.urandom(5000))

    with pytest.raises(FailedPrecondition) as info:
        _publish_one(
            stack,
            publisher,
            path,
            "busy/resigned",
            store=_store(stack, publisher, uploads),
            signing_key=private,
            retry=BusyRetry(sleep=rewrite),
        )
    assert info.value.reason == "MODEL_FILE_CHANGED"
    assert "nothing was stored" in info.value.message
    assert len(uploads.outcomes) == 2 and uploads.outcomes[0] == REFUSED
    assert _records(stack, "busy/resigned") == []
    assert_clean(storage)


def test_a_signed_model_retried_unchanged_is_stored_with_a_signature_that_verifies(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The check above holds nothing back when the bytes are the ones signed."""
    private, public = keypair(tmp_path, "signer")
    path = tmp_path / "model.bin"
    content = os.urandom(5000)
    path.write_bytes(content)
    uploads = BusyBefore(stack, publisher, refused={0})
    _publish_one(
        stack,
        publisher,
        path,
        "busy/signed",
        store=_store(stack, publisher, uploads),
        signing_key=private,
        retry=BusyRetry(sleep=lambda _seconds: None),
    )
    assert uploads.outcomes == [REFUSED, ("OK", None)]
    reader = stack.identity("inference")
    fetcher = ModelFetcher(stack.channel(reader, "modelstore"), _release(stack, reader))
    with fetcher.fetch("busy/signed", "1") as model:
        header = parse_header(
            b"".join(grpc_source(stack.channel(reader, "modelstore"))("busy/signed", "1"))
        )
        SignaturePolicy.from_pem(public).check(
            header.signature_bundle, header.signature_bundle_media_type, model.parts[0].view
        )
        assert bytes(model.parts[0].view) == content


def test_a_part_of_a_model_of_513_parts_is_retried_as_often_as_its_bound_admits(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Each part's tries were 1 + 1,024 / parts spare writers, made up front: from 513 parts a
    part had one retry, so a part refused three times in a row ended the publish, though its
    60 s were far from spent. Now it has the retries its own bound admits (10)."""
    assert CLIENT_RETRY.most_tries == 11
    uploads = BusyBefore(stack, publisher, refused={0, 1, 2})  # the first part, three times
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(513):
        (folder / f"shard-{i:03}.bin").write_bytes(os.urandom(16))
    waits: list[float] = []
    published = _publish(
        stack,
        publisher,
        [folder],
        "busy/many",
        _store(stack, publisher, uploads),
        retry=BusyRetry(sleep=waits.append),
    )
    assert uploads.outcomes[:4] == [REFUSED, REFUSED, REFUSED, ("OK", None)]
    assert len(waits) == 3 and len(published.parts) == 513
    assert len(_records(stack, "busy/many")) == 514


def test_a_busy_retry_that_never_waits_is_refused() -> None:
    """most_tries counts the waits that fit: a retry with no wait would make as many tries as a
    busy peer can refuse."""
    assert BusyRetry(within=0.0).most_tries == 1
    assert BusyRetry(within=1.0, first_delay=0.2).most_tries == 3  # 0.2 + 0.4 fit, 0.8 not
    with pytest.raises(ValueError, match="waits"):
        BusyRetry(first_delay=0.0)
    with pytest.raises(ValueError, match="waits"):
        BusyRetry(first_delay=2.0, max_delay=1.0)


@pytest.mark.parametrize("within", [math.inf, math.nan, -1.0])
def test_a_busy_retry_without_an_end_is_refused(within: float) -> None:
    """An unbounded ``within`` was taken: a multi-part publish then counted its most_tries for
    ever, at full CPU, before any call (it retried without end before most_tries existed)."""
    with pytest.raises(ValueError, match="ends"):
        BusyRetry(within=within)


def test_most_tries_of_a_long_bound_is_counted_not_stepped() -> None:
    """Waits of 0.5, 1, 2 and 4 s, then one of 8 s for every 8 s left: stepped one wait at a
    time, a bound of 10^12 s was 1.25 * 10^11 steps (a publish that never started)."""
    assert BusyRetry(within=1e12).most_tries == 5 + int((1e12 - 7.5) // 8)
    assert BusyRetry(within=63.5).most_tries == 12  # 7.5 + 7 * 8: the last wait fits exactly
    assert BusyRetry(within=1.0, first_delay=1.0, max_delay=1.0).most_tries == 2


class CountCalls(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Counts the unary calls made through a channel, by method."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return continuation(details, request)


def test_parts_left_by_a_publish_out_of_retries_are_named_with_their_command_and_refused_after(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part refused busy until the bound ran out: the first stays stored (a publisher
    may not delete). The refusal was raised as it came, without the note naming what was left
    and how to free it, and publishing the version again asked for a data key and failed at the
    first part (ALREADY_EXISTS MODEL_EXISTS). Now the failure says which parts, and the command
    that removes them; a publish of the version again is refused PARTS_LEFT_BEHIND before any
    data key or upload, until an admin has removed them."""
    shards = _shards(tmp_path / "shards", 3)
    uploads = BusyBefore(stack, publisher, refused={1}, end_stall=False)
    try:
        with pytest.raises(FailedPrecondition) as info:
            _publish(
                stack,
                publisher,
                shards,
                "busy/left",
                _store(stack, publisher, uploads),
                retry=BusyRetry(within=1.0, first_delay=0.2),
            )
    finally:
        uploads.end()
    assert info.value.reason == "PARTS_LEFT_BEHIND"
    message = info.value.message
    assert "RESOURCE_EXHAUSTED TOO_MANY_STREAMS_PER_CERTIFICATE" in message
    assert "1 part(s) it stored could not be removed" in message
    assert "`strongroom model rm busy/left 1+part.0`" in message
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert _records(stack, "busy/left") == [("busy/left", "1+part.0")]

    admin = store_grpc.ModelStoreServiceStub(stack.channel(stack.identity("admin"), "modelstore"))

    def admin_stat(version: str) -> store_pb.ModelInfo:
        request = store_pb.StatModelRequest(name="busy/left", version=version)
        return admin.StatModel(request, timeout=30).model

    message = _refused_left_behind(stack, publisher, shards, "busy/left")
    assert "`strongroom model rm busy/left 1+part.0`" in message
    # This publish cannot tell a failed publish's parts from a running one's: the commands,
    # run once that one stored its manifest, removed a published model's parts (every load of
    # it then failed). They come with the condition, and when the last part was stored.
    stored_at = admin_stat("1+part.0").stored_at.ToDatetime(tzinfo=UTC)
    assert f"the last stored at {stored_at.isoformat(timespec='seconds')}" in message
    assert (
        "that publish failed, or is still running (a publish that completes makes them its "
        "model's parts); nothing was published. Once no publish of it is running and "
        "busy/left/1 is still not stored (`strongroom model ls busy/left` lists it if so), the "
        "version cannot be published again until an admin removes them"
    ) in message

    admin.DeleteModel(store_pb.DeleteModelRequest(name="busy/left", version="1+part.0"))
    _publish(stack, publisher, shards, "busy/left", stack.channel(publisher, "modelstore"))
    assert len(_records(stack, "busy/left")) == 4


def test_a_multi_part_publish_of_a_version_already_stored_is_refused_before_any_part(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """It stored every part, then was refused at the manifest (MODEL_EXISTS), and the parts it
    could not delete were left."""
    path = _model_file(tmp_path, 5000)
    store = stack.channel(publisher, "modelstore")
    broker = stack.channel(publisher, "keybroker")
    publish_model(path, name="busy/taken", version="1", key_id=KEY_ID, broker=broker, store=store)
    uploads = BusyBefore(stack, publisher, set())
    with pytest.raises(AlreadyExists) as info:
        _publish(
            stack,
            publisher,
            _shards(tmp_path / "shards", 2),
            "busy/taken",
            _store(stack, publisher, uploads),
        )
    assert info.value.reason == "MODEL_EXISTS"
    assert uploads.outcomes == []
    assert _records(stack, "busy/taken") == [("busy/taken", "1")]


def test_the_command_for_many_parts_left_is_one_loop() -> None:
    versions = [f"1+part.{i}" for i in range(40)]
    assert _rm_commands("org/m", versions) == (
        '`for n in $(seq 0 39); do strongroom model rm org/m "1+part.$n"; done`'
    )
    assert _rm_commands("org/m", ["1+part.0", "1+part.2"]) == (
        "`strongroom model rm org/m 1+part.0`; `strongroom model rm org/m 1+part.2`"
    )


def test_parts_left_and_a_part_that_may_be_stored_are_one_note_with_one_command_form() -> None:
    """Each case alone keeps its wording; together, what is blocked until when is said once,
    and every part is in one command form: one loop for more than three."""
    unblock = "the version cannot be published again until an admin removes them "
    assert _left_note("org/m", "1", {"1+part.0": "PERMISSION_DENIED"}) == (
        "1 part(s) it stored could not be removed (a publisher may not delete): 1+part.0; "
        f"{unblock}(PARTS_LEFT_BEHIND until then): `strongroom model rm org/m 1+part.0`"
    )
    assert _left_note("org/m", "1", {}, ("1+part.0", publish.ANSWER_LOST)) == (
        "the part 1+part.0 may be stored: its upload reached the store, whose answer was lost "
        "(stored by this publish, or by another of the version that stored it first). Once no "
        "publish of it is running and org/m/1 is still not stored (`strongroom model ls org/m` "
        f"lists it if so), {unblock}(PARTS_LEFT_BEHIND until then): `strongroom model rm org/m "
        "1+part.0` (a part that is not stored is NOT_FOUND: nothing to do)"
    )
    failed = {f"1+part.{i}": "UNAVAILABLE" for i in range(3)}
    assert _left_note("org/m", "1", failed, ("1+part.3", publish.ANSWER_LOST)) == (
        "3 part(s) it stored could not be removed (deleting them failed: UNAVAILABLE): 1+part.0, "
        "1+part.1, 1+part.2; the part 1+part.3 may be stored: its upload reached the store, "
        "whose answer was lost (stored by this publish, or by another of the version that "
        "stored it first). Once no publish of it is running and org/m/1 is still not stored "
        f"(`strongroom model ls org/m` lists it if so), {unblock}(PARTS_LEFT_BEHIND until then): "
        '`for n in $(seq 0 3); do strongroom model rm org/m "1+part.$n"; done` (a part that is '
        "not stored is NOT_FOUND: nothing to do)"
    )


def _leave_parts(
    stack: DevStack, publisher: WorkloadIdentity, shards: list[Path], name: str, at: int
) -> None:
    """A publish of ``shards`` as ``name`` version 1 refused busy at part ``at`` until its bound
    ran out: parts 0 to ``at`` - 1 stay stored (a publisher may not delete)."""
    uploads = BusyBefore(stack, publisher, refused={at}, end_stall=False)
    try:
        with pytest.raises(FailedPrecondition):
            _publish(
                stack,
                publisher,
                shards,
                name,
                _store(stack, publisher, uploads),
                retry=BusyRetry(within=1.0, first_delay=0.2),
            )
    finally:
        uploads.end()
    assert _records(stack, name) == [(name, f"1+part.{i}") for i in range(at)]


def test_parts_left_with_a_gap_are_all_named_and_refused_before_any_data_key(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """An admin's rm loop that failed on some parts (it carries on), or parts removed by hand,
    left part 0 gone and later ones stored. The check stopped at the first missing part: the
    publish asked the broker for a data key (a release, audited), stored part 0 and failed at
    part 1 (MODEL_EXISTS), its commands naming part 0 only; following them repeated the cycle.
    Now every part is looked at first, and the one command removes every part left."""
    shards = _shards(tmp_path / "shards", 7)
    _leave_parts(stack, publisher, shards, "busy/gap", 6)
    admin = store_grpc.ModelStoreServiceStub(stack.channel(stack.identity("admin"), "modelstore"))
    for gone in ("1+part.0", "1+part.2"):
        admin.DeleteModel(store_pb.DeleteModelRequest(name="busy/gap", version=gone), timeout=30)

    message = _refused_left_behind(stack, publisher, shards, "busy/gap")
    assert "4 part(s) a publish of it stored are left (1+part.1 to 1+part.5, with gaps" in message
    command = '`for n in 1 $(seq 3 5); do strongroom model rm busy/gap "1+part.$n"; done`'
    assert command in message
    assert (
        "Once no publish of it is running and busy/gap/1 is still not stored (`strongroom model "
        "ls busy/gap` lists it if so), the version cannot be published again"
    ) in message
    assert _records(stack, "busy/gap") == [("busy/gap", f"1+part.{i}") for i in (1, 3, 4, 5)]

    # What the command removes (1, 3, 4, 5) frees the version.
    for index in (1, 3, 4, 5):
        request = store_pb.DeleteModelRequest(name="busy/gap", version=f"1+part.{index}")
        admin.DeleteModel(request, timeout=30)
    _publish(stack, publisher, shards, "busy/gap", stack.channel(publisher, "modelstore"))
    assert len(_records(stack, "busy/gap")) == 8


def test_parts_left_past_the_count_of_a_smaller_publish_are_named_too(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """A failed publish of 7 parts left parts 0 to 5; the next try has 3 parts (the model
    re-sharded). The check stat'ed only the indices the new publish would store: the refusal
    named parts 0 to 2, their removal let the publish through, and parts 3 to 5 stayed stored
    for good, named by no manifest and by no message (the check before it, which went on from
    part 0 until one was missing, named all six). Every part left from part 0 on is named."""
    _leave_parts(stack, publisher, _shards(tmp_path / "seven", 7), "busy/fewer", 6)
    message = _refused_left_behind(stack, publisher, _shards(tmp_path / "three", 3), "busy/fewer")
    assert "6 part(s) a publish of it stored are left (1+part.0 to 1+part.5, the last" in message
    command = '`for n in $(seq 0 5); do strongroom model rm busy/fewer "1+part.$n"; done`'
    assert command in message
    admin = store_grpc.ModelStoreServiceStub(stack.channel(stack.identity("admin"), "modelstore"))
    for index in range(6):
        request = store_pb.DeleteModelRequest(name="busy/fewer", version=f"1+part.{index}")
        admin.DeleteModel(request, timeout=30)


def test_the_command_for_parts_left_with_gaps_is_one_loop_over_every_part() -> None:
    left = ["1+part.1", "1+part.2", "1+part.5", *(f"1+part.{i}" for i in range(7, 12))]
    assert _rm_commands("org/m", left) == (
        '`for n in 1 2 5 $(seq 7 11); do strongroom model rm org/m "1+part.$n"; done`'
    )
    # Not every version a part of one version: a command each, none left out.
    assert _rm_commands("org/m", ["1+part.1", "1+part.2", "2+part.3", "1+part.04"]) == "; ".join(
        f"`strongroom model rm org/m {v}`"
        for v in ("1+part.1", "1+part.2", "2+part.3", "1+part.04")
    )


class StopStoreBefore(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Stops the store before the publisher's upload numbered ``at`` (from 0)."""

    def __init__(self, stack: DevStack, at: int) -> None:
        self._stack = stack
        self._at = at
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        if self.uploads == self._at:
            self._stack.services.pop("modelstore").stop()
        self.uploads += 1
        return continuation(details, request_iterator)


def _assert_part_left_by_outage(error: Unavailable, stack: DevStack, name: str, status: str) -> str:
    """``error`` ended a publish of ``name`` version 1 whose second part's upload failed
    ``status`` once the first was stored, the store then down (its delete failed UNAVAILABLE):
    an outage, the part named with the command that removes it, and still stored. Returns the
    message."""
    assert error.reason == "UNAVAILABLE"
    message = error.message
    assert message.startswith(f"{name}/1 was not published ({status}: "), message
    assert "1 part(s) it stored could not be removed (deleting them failed: UNAVAILABLE)" in message
    assert f"`strongroom model rm {name} 1+part.0`" in message
    assert _records(stack, name) == [(name, "1+part.0")]
    return message


def _assert_outage_stored_nothing(
    error: Unavailable, stack: DevStack, name: str, undone: str
) -> None:
    """``error`` ended a call for ``name`` version 1 whose store stopped before its first
    upload: UNAVAILABLE, its message ``NAME/1 was not UNDONE (UNAVAILABLE: ...``, the
    grpc.RpcError its cause, and nothing of ``name`` stored."""
    assert error.reason == "UNAVAILABLE"
    assert error.message.startswith(f"{name}/1 was not {undone} (UNAVAILABLE: ")
    assert isinstance(error.__cause__, grpc.RpcError)
    assert _records(stack, name) == []


def test_a_publish_the_store_went_away_under_keeps_unavailable_and_names_the_parts_left(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The store stopped after the first part: the second's upload and the delete of the first
    failed UNAVAILABLE. That was reported as FAILED_PRECONDITION PARTS_LEFT_BEHIND, its note
    saying a publisher may not delete: an outage read as a refusal. Now the status is the
    failure's, and the note says why the part stayed and how to remove it."""
    shards = _shards(tmp_path / "shards", 3)
    stops = StopStoreBefore(stack, 1)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        _publish(stack, publisher, shards, "busy/down", _store(stack, publisher, stops))
    assert stops.uploads == 2
    message = _assert_part_left_by_outage(info.value, stack, "busy/down", "UNAVAILABLE")
    assert "a publisher may not delete" not in message
    assert isinstance(info.value.__cause__, grpc.RpcError)

    # The store back, the version is still blocked by the part (refused before any data key).
    _refused_left_behind(stack, publisher, shards, "busy/down")
    _admin_rm(stack, "busy/down", "1+part.0")


def test_a_part_out_of_time_keeps_deadline_exceeded_and_says_a_publisher_may_not_delete(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part's upload ran past its deadline (its reading held until the publish has
    failed): DEADLINE_EXCEEDED, not PARTS_LEFT_BEHIND; the store was up, so the first part stayed
    because a publisher may not delete it, and the note says so."""
    shards = _shards(tmp_path / "shards", 3)
    first = shards[0].stat().st_size
    failed = threading.Event()

    def progress(done: int, _total: int) -> None:
        if done > first:  # the second part is being read
            failed.wait(60)

    try:
        with pytest.raises(DeadlineExceeded) as info:
            _publish(
                stack,
                publisher,
                shards,
                "busy/slow",
                stack.channel(publisher, "modelstore"),
                progress=progress,
                timeout=5,
            )
    finally:
        failed.set()
    assert info.value.reason == "DEADLINE_EXCEEDED"
    message = info.value.message
    assert message.startswith("busy/slow/1 was not published (DEADLINE_EXCEEDED: ")
    assert "1 part(s) it stored could not be removed (a publisher may not delete)" in message
    assert "`strongroom model rm busy/slow 1+part.0`" in message
    assert _records(stack, "busy/slow") == [("busy/slow", "1+part.0")]
    _admin_rm(stack, "busy/slow", "1+part.0")


class CancelledThenStopped(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) ends CANCELLED, as a draining store's
    call does, then the store stops (so the deletes that follow fail UNAVAILABLE).

    The CANCELLED is gRPC's own, of a real upload to the store cancelled at once: the store the
    dev stack stops in-process answers a call in flight UNAVAILABLE ("Cancelling all calls"),
    and a process's drain answers CANCELLED only to a call that lands in the moment between its
    stop and its GOAWAY (tests/soak), which a test cannot aim at."""

    def __init__(self, stack: DevStack, publisher: WorkloadIdentity, at: int) -> None:
        self._stack = stack
        self._raw = stack.channel(publisher, "modelstore")
        self._at = at
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return continuation(details, request_iterator)
        ended = threading.Event()

        def held() -> Iterator[bytes]:
            ended.wait(60)
            yield from ()

        put = self._raw.stream_unary(
            PUT,
            request_serializer=None,
            response_deserializer=store_pb.PutModelResponse.FromString,
        )
        upload = put.future(held(), timeout=60)
        upload.cancel()
        ended.set()
        self._stack.services.pop("modelstore").stop()
        assert upload.code() == grpc.StatusCode.CANCELLED
        return _Ended(upload)


class _Ended:
    """A call's outcome that raises what gRPC's blocking call raises for ``call`` failed."""

    def __init__(self, call: Any) -> None:
        self._error = _CallError(call)

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def exception(self, timeout: float | None = None) -> Any:
        return self._error


class _CallError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed call as a ``grpc.RpcError``: everything asked of it is the call's own answer."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def code(self) -> grpc.StatusCode:
        return self._call.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._call.details()  # type: ignore[no-any-return]

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def test_a_store_draining_under_a_part_is_an_outage_with_the_parts_left_named(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part's upload ended CANCELLED (a draining store), then the store stopped: the
    delete of the first part failed (UNAVAILABLE). remote.py counted a
    CANCELLED as an outage, the publisher's own table did not: FAILED_PRECONDITION
    PARTS_LEFT_BEHIND. One table now: Unavailable, CANCELLED in its message."""
    shards = _shards(tmp_path / "shards", 3)
    cancels = CancelledThenStopped(stack, publisher, 1)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        _publish(stack, publisher, shards, "busy/drained", _store(stack, publisher, cancels))
    assert cancels.uploads == 2
    _assert_part_left_by_outage(info.value, stack, "busy/drained", "CANCELLED")
    _admin_rm(stack, "busy/drained", "1+part.0")


def test_an_outage_that_left_no_part_is_the_same_domain_error(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The store stopped before the first part: nothing stored, nothing to delete. The same
    outage that is Unavailable when parts are left was raised as the raw grpc.RpcError here."""
    stops = StopStoreBefore(stack, 0)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        _publish(
            stack,
            publisher,
            _shards(tmp_path / "shards", 2),
            "busy/none-left",
            _store(stack, publisher, stops),
        )
    assert stops.uploads == 1
    _assert_outage_stored_nothing(info.value, stack, "busy/none-left", "published")
    assert "could not be removed" not in info.value.message


def _interrupt_when_stored(stack: DevStack, name: str, version: str) -> threading.Thread:
    """Sends SIGINT to this process's main thread (the publish's, held opening a FIFO part) once
    the store holds ``version`` of ``name``."""
    main = threading.main_thread().ident
    assert main is not None

    def interrupt() -> None:
        # Sent whatever happens here: a look at the store that failed (a busy refusal on a loaded
        # machine) left the publish opening its FIFO for good, and the test hanging; now the
        # test's own checks of what was stored say what went wrong.
        try:
            settled(lambda: (name, version) in _records(stack, name))
        finally:
            signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=interrupt, daemon=True)
    sender.start()
    return sender


def _with_fifo(folder: Path) -> list[Path]:
    """Three parts, the second a FIFO nobody writes: a publish opening it waits there."""
    shards = _shards(folder, 3)
    shards[1].unlink()
    os.mkfifo(shards[1])
    return shards


def test_an_interrupted_publish_stops_at_once_and_names_what_may_be_left(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Ctrl-C (a real SIGINT) while the second part is opened: the KeyboardInterrupt ran the
    deletes first (up to 30 s each) and said nothing of the parts left. Now no delete is made,
    and the interrupt carries the note: the parts that may be stored, and the command."""
    calls = CountCalls()
    store = _store(stack, publisher, calls)
    sender = _interrupt_when_stored(stack, "busy/interrupted", "1+part.0")
    with pytest.raises(KeyboardInterrupt) as info:
        _publish(stack, publisher, _with_fifo(tmp_path / "shards"), "busy/interrupted", store)
    sender.join(60)
    assert "DeleteModel" not in calls.methods
    (note,) = info.value.__notes__
    # Part 1 too once its upload has begun (the signal may come while part 0's answer is read).
    assert note.startswith("interrupted: busy/interrupted/1 was not published; ")
    assert "whose upload had begun may be stored (1+part.0" in note
    assert "nothing was deleted: an interrupt does not wait for deletes" in note
    # Part 0 may be another publish's of the version: its command only under the condition.
    assert (
        "Once no publish of it is running and busy/interrupted/1 is still not stored "
        "(`strongroom model ls busy/interrupted` lists it if so), the version cannot be "
        "published again until an admin removes them"
    ) in note
    assert "`strongroom model rm busy/interrupted 1+part.0`" in note
    assert _records(stack, "busy/interrupted") == [("busy/interrupted", "1+part.0")]
    _admin_rm(stack, "busy/interrupted", "1+part.0")


def test_an_interrupted_publish_command_prints_what_may_be_left(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`strongroom model publish` ended 130 on Ctrl-C, silent on the parts it left."""
    shards = _with_fifo(tmp_path / "shards")
    sender = _interrupt_when_stored(stack, "busy/cli-interrupted", "1+part.0")
    code, err = _publish_command(stack, capsys, shards, "busy/cli-interrupted")
    sender.join(60)
    assert code == 130
    assert "strongroom: interrupted: busy/cli-interrupted/1 was not published; " in err
    assert "`strongroom model rm busy/cli-interrupted 1+part.0`" in err
    _admin_rm(stack, "busy/cli-interrupted", "1+part.0")


@pytest.mark.parametrize("fill_stderr", [True, False], ids=["stderr-full", "stderr-read"])
def test_an_interrupted_publish_command_exits_with_a_full_stderr(
    stack: DevStack, tmp_path: Path, fill_stderr: bool
) -> None:
    """The interrupted command's notes were printed blocking: on a full stderr pipe whose
    collector had stopped reading, the command waited there for good. They are written as its
    error line is, only if stderr takes them at once: status 130 either way, the note written
    when stderr is read. (The command as a process of its own, Ctrl-C a real SIGINT to it once
    its first part is stored, its second a FIFO it waits to open.)"""
    name = f"busy/cli-full-{fill_stderr}".lower()
    config = str(stack.write_client_config("publisher"))
    shards = map(str, _with_fifo(tmp_path / "shards"))
    argv = ["model", "publish", *shards, "--name", name, "--version", "1", "--key-id", KEY_ID]

    def interrupt(process: subprocess.Popen[bytes]) -> None:
        try:  # sent whatever the look did, as _interrupt_when_stored's
            settled(lambda: (name, "1+part.0") in _records(stack, name))
        finally:
            process.send_signal(signal.SIGINT)

    status, written = command_with_stderr(
        [*argv, "--no-progress", "--client-config", config],
        fill_stderr=fill_stderr,
        meanwhile=interrupt,
    )
    assert status == 130
    if fill_stderr:
        assert written == []
    else:
        (line,) = written
        assert line.startswith(f"strongroom: interrupted: {name}/1 was not published; ")
        assert f"`strongroom model rm {name} 1+part.0`" in line
    assert _records(stack, name) == [(name, "1+part.0")]
    _admin_rm(stack, name, "1+part.0")


class SlowStats(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Holds each StatModel ``seconds`` before it is sent (a slow store, as its client sees it),
    and counts the calls by method."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self.methods: list[str] = []

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        method = details.method.rsplit("/", 1)[-1]
        self.methods.append(method)
        if method == "StatModel":
            time.sleep(self._seconds)
        return continuation(details, request)


def test_the_look_for_parts_left_ends_within_its_bound(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Each StatModel of the look for parts left had its own 30 s and 60 s of busy retries, and
    the look none in all: 4,096 parts on a slow store held a publish for hours. Now it ends
    within check_within, DEADLINE_EXCEEDED, before any data key or upload."""
    stats = SlowStats(0.3)
    broker = CountCalls()
    uploads = BusyBefore(stack, publisher, set())
    store = grpc.intercept_channel(_store(stack, publisher, uploads), stats)
    with pytest.raises(DeadlineExceeded) as info:
        _publish(
            stack,
            publisher,
            _shards(tmp_path / "shards", 12),
            "busy/slow-check",
            store,
            broker=grpc.intercept_channel(stack.channel(publisher, "keybroker"), broker),
            check_within=1.0,
        )
    # Its own reason: a plain DEADLINE_EXCEEDED read as the upload's deadline passing.
    assert info.value.reason == "PUBLISH_CHECK_DEADLINE_EXCEEDED"
    message = info.value.message
    assert message.startswith("looking for parts a failed publish of busy/slow-check/1 left took")
    assert "more than 1 s (check_within; " in message
    assert "nothing was published, no data key asked for" in message
    assert "(this check's own bound, --check-within; no upload had begun)" in message
    assert (broker.methods, uploads.outcomes) == ([], [])
    assert stats.methods.count("StatModel") < 13  # stopped before looking at every part


def _interrupt_past(first: int) -> Callable[[int, int], None]:
    """A progress callback that raises KeyboardInterrupt once reading has gone past ``first``
    bytes (a library caller's Ctrl-C check, or one ending its work with a BaseException)."""

    def progress(done: int, _total: int) -> None:
        if done > first:
            raise KeyboardInterrupt

    return progress


def test_an_interrupt_raised_by_the_progress_callback_ends_the_publish(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The progress callback runs on gRPC's thread feeding the upload; put_model's guard kept
    an Exception only, so a KeyboardInterrupt ended that thread without ending the upload, and
    the publish waited for the call's deadline (an hour by default) and then reported the
    DEADLINE_EXCEEDED of an outage. Now the interrupt is raised as it came, with its note."""
    shards = _shards(tmp_path / "shards", 3)
    with pytest.raises(KeyboardInterrupt) as info:
        _publish(
            stack,
            publisher,
            shards,
            "busy/progress-interrupt",
            stack.channel(publisher, "modelstore"),
            progress=_interrupt_past(shards[0].stat().st_size),
            timeout=20,
        )
    (note,) = info.value.__notes__
    assert note.startswith("interrupted: busy/progress-interrupt/1 was not published; ")
    assert "2 part(s) whose upload had begun may be stored (1+part.0, 1+part.1;" in note
    # The second part's upload ended short of its last chunk: not stored.
    assert _records(stack, "busy/progress-interrupt") == [("busy/progress-interrupt", "1+part.0")]
    _admin_rm(stack, "busy/progress-interrupt", "1+part.0")


def test_an_interrupt_raised_by_a_single_publish_s_progress_callback_ends_it(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """publish_model's progress runs on gRPC's thread too: the same hang, the same end."""
    model = _model_file(tmp_path, 3 * 1024 * 1024)
    with pytest.raises(KeyboardInterrupt):
        _publish_one(
            stack,
            publisher,
            model,
            "busy/single-interrupt",
            progress=_interrupt_past(1024 * 1024),
            timeout=20,
        )
    assert _records(stack, "busy/single-interrupt") == []


def test_a_single_publish_the_store_went_away_under_is_the_multi_part_publisher_s_outage(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """publish_model raised an outage as the raw grpc.RpcError, where publish_parts raises the
    domain error of remote.TRANSIENT: the same store down, two answers to catch. Now both are
    Unavailable, the status in the message."""
    model = _model_file(tmp_path, 3000)
    stops = StopStoreBefore(stack, 0)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        _publish_one(
            stack,
            publisher,
            model,
            "busy/single-down",
            store=_store(stack, publisher, stops),
        )
    assert stops.uploads == 1
    _assert_outage_stored_nothing(info.value, stack, "busy/single-down", "published")


def test_a_single_publish_out_of_time_is_deadline_exceeded(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """A single publish's upload past its deadline: DeadlineExceeded, as a part's is."""
    model = _model_file(tmp_path, 3 * 1024 * 1024)
    failed = threading.Event()

    def progress(done: int, _total: int) -> None:
        if done > 1024 * 1024:
            failed.wait(60)

    try:
        with pytest.raises(DeadlineExceeded) as info:
            _publish_one(stack, publisher, model, "busy/single-slow", progress=progress, timeout=3)
    finally:
        failed.set()
    assert info.value.reason == "DEADLINE_EXCEEDED"
    assert info.value.message.startswith(
        "busy/single-slow/1 was not published (DEADLINE_EXCEEDED: "
    )
    assert _records(stack, "busy/single-slow") == []


def test_a_single_publish_s_refusal_that_is_no_outage_is_raised_as_it_came(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Only outages become domain errors: the broker's refusal of an unknown key stays gRPC's."""
    model = _model_file(tmp_path, 3000)
    with pytest.raises(grpc.RpcError) as info:
        _publish_one(stack, publisher, model, "busy/single-refused", key_id="no-such-key")
    assert not isinstance(info.value, Unavailable)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_the_command_s_look_for_parts_left_takes_its_bound_from_check_within(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README item 76 says to raise check_within for a store that needs longer than 600 s, but
    `strongroom model publish` had no way to: a slow store's multi-part publish (it finished,
    however slowly, before c4ededb) failed there for good. --check-within sets it; a bound no
    look fits in shows that it reached the check."""
    shards = _shards(tmp_path / "shards", 3)
    code, err = _publish_command(stack, capsys, shards, "busy/cli-bound", "--check-within", "1e-9")
    assert code == 1
    assert (
        "strongroom: error: PUBLISH_CHECK_DEADLINE_EXCEEDED: looking for parts a failed publish"
        in err
    )
    assert "more than 1e-09 s (check_within; 0 of at least 4 looked at)" in err
    assert _records(stack, "busy/cli-bound") == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_check_bound_that_is_no_positive_number_of_seconds_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN or infinity made no bound at all (every comparison with it false), 0 or less one that
    refused every publish: refused by the command line, before anything is asked."""
    with pytest.raises(SystemExit) as info:
        main(
            [
                "model",
                "publish",
                "m.onnx",
                "--name",
                "m",
                "--version",
                "1",
                "--key-id",
                "k",
                "--check-within",
                value,
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --check-within: {value!r} is not a positive number of seconds" in err


def test_an_upload_the_store_went_away_under_is_unavailable(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """upload_artifact (`strongroom model upload`) raised an outage as the raw grpc.RpcError,
    where publish_model and publish_parts raise Unavailable: now it does too, the status in the
    message."""
    path = _artifact_file(tmp_path, "busy/upload-down", 5000)
    stops = StopStoreBefore(stack, 0)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        upload_artifact(path, store=_store(stack, publisher, stops))
    assert stops.uploads == 1
    _assert_outage_stored_nothing(info.value, stack, "busy/upload-down", "uploaded")


def test_an_upload_s_refusal_that_is_no_outage_is_raised_as_it_came(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Only outages become domain errors: the store's refusal of a version it holds stays
    gRPC's, the stored version untouched."""
    path = _artifact_file(tmp_path, "busy/upload-twice", 5000)
    store = stack.channel(publisher, "modelstore")
    first = upload_artifact(path, store=store)
    with pytest.raises(grpc.RpcError) as info:
        upload_artifact(path, store=store)
    assert not isinstance(info.value, Unavailable)
    assert (info.value.code(), peer_reason(info.value)) == (  # type: ignore[attr-defined]
        grpc.StatusCode.ALREADY_EXISTS,
        "MODEL_EXISTS",
    )
    stub = store_grpc.ModelStoreServiceStub(store)
    stat = stub.StatModel(store_pb.StatModelRequest(name="busy/upload-twice", version="1"))
    assert stat.model.artifact_sha256 == first.model.artifact_sha256


class _CallbackFailed(Exception):
    """What a library caller's progress callback raised."""


def test_an_upload_s_progress_callback_that_raises_at_the_end_leaves_nothing_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """upload_artifact called its progress callback after the last message was handed over: one
    that raised there ended the upload once the whole artifact had been sent, so the store kept
    it while the caller got the exception. Now it runs before: the upload ends short of its last
    byte, nothing stored."""
    path = _artifact_file(tmp_path, "busy/upload-callback", 3 * 1024 * 1024)
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if done == total:
            raise _CallbackFailed

    with pytest.raises(_CallbackFailed):
        upload_artifact(path, store=stack.channel(publisher, "modelstore"), progress=progress)
    assert calls[-1] == (path.stat().st_size, path.stat().st_size)
    assert _records(stack, "busy/upload-callback") == []


@pytest.mark.parametrize("within", [0.0, -1.0, math.nan, math.inf])
def test_a_check_bound_that_is_no_positive_finite_number_is_refused_by_the_library(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, within: float
) -> None:
    """The command line refused such a --check-within, publish_parts did not: 0 or less failed
    every publish DEADLINE_EXCEEDED at once, NaN or infinity looked without any bound. Now
    InvalidArgument INVALID_DURATION, before anything is asked."""
    broker = CountCalls()
    stats = CountCalls()
    uploads = BusyBefore(stack, publisher, set())
    name = f"busy/check-{within}".replace("--", "-neg")
    with pytest.raises(InvalidArgument) as info:
        _publish(
            stack,
            publisher,
            _shards(tmp_path / "shards", 2),
            name,
            grpc.intercept_channel(_store(stack, publisher, uploads), stats),
            broker=grpc.intercept_channel(stack.channel(publisher, "keybroker"), broker),
            check_within=within,
        )
    assert info.value.reason == "INVALID_DURATION"
    assert info.value.message == (
        f"check_within must be a positive, finite number of seconds, not {within!r}"
    )
    assert (broker.methods, stats.methods, uploads.outcomes) == ([], [], [])
    assert _records(stack, name) == []


class InterruptAfterUpload(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Ctrl-C (a real SIGINT, to this thread: the publish's) once the store has answered an
    upload: the moment a publish can be interrupted with its version stored."""

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        outcome = continuation(details, request_iterator)
        assert outcome.exception() is None
        signal.raise_signal(signal.SIGINT)
        return outcome  # pragma: no cover - the interrupt is raised before


class InterruptBefore(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Ctrl-C (a real SIGINT) before a unary call is made."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        signal.raise_signal(signal.SIGINT)
        return continuation(details, request)  # pragma: no cover - the interrupt is raised before


def test_a_single_publish_interrupted_after_its_upload_says_the_version_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """An interrupted single-file publish said nothing, though an interrupt after its last byte
    leaves the version stored (the publisher's next try refused MODEL_EXISTS, unexplained). Now
    the interrupt carries a note, as a multi-part publish's does: it may be stored, when to keep
    it, and the command that removes it; its condition in the words every publisher's note uses
    (the note kept its own second clause)."""
    model = _model_file(tmp_path, 3000)
    with pytest.raises(KeyboardInterrupt) as info:
        _publish_one(
            stack,
            publisher,
            model,
            "busy/single-stopped",
            store=_store(stack, publisher, InterruptAfterUpload()),
        )
    (note,) = info.value.__notes__
    # The removal is handed out with its condition: a version stored is a whole, loadable model,
    # this publish's or another's (whose MODEL_EXISTS refusal of this one the interrupt lost).
    assert note == (
        "interrupted: its upload had begun, so busy/single-stopped/1 may be stored, whole and "
        "loadable: this publish's, if its last byte was sent, or another publish's of the same "
        "version (the store's refusal of this one, MODEL_EXISTS, lost to the interrupt). Once no "
        "publish of it is running and busy/single-stopped/1 is still not stored (`strongroom "
        "model ls busy/single-stopped` lists it if so), nothing was stored: publish it again; if "
        "it is stored, keep it (publishing it again is refused MODEL_EXISTS): only to replace it "
        "with another model does an admin remove it: `strongroom model rm busy/single-stopped 1`"
    )
    assert _records(stack, "busy/single-stopped") == [("busy/single-stopped", "1")]
    _admin_rm(stack, "busy/single-stopped", "1")


def test_a_single_publish_interrupted_before_its_upload_says_nothing_was_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Ctrl-C while the data key is asked for: the note says nothing was stored."""
    model = _model_file(tmp_path, 3000)
    with pytest.raises(KeyboardInterrupt) as info:
        _publish_one(
            stack,
            publisher,
            model,
            "busy/single-early",
            broker=grpc.intercept_channel(stack.channel(publisher, "keybroker"), InterruptBefore()),
        )
    assert info.value.__notes__ == [
        "interrupted: busy/single-early/1 was not published; nothing was stored"
    ]
    assert _records(stack, "busy/single-early") == []


def test_an_upload_interrupted_after_the_store_answered_says_it_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """`strongroom model upload` interrupted the same way said nothing either."""
    path = _artifact_file(tmp_path, "busy/upload-stopped", 5000)
    with pytest.raises(KeyboardInterrupt) as info:
        upload_artifact(
            path,
            store=_store(stack, publisher, InterruptAfterUpload()),
        )
    (note,) = info.value.__notes__
    assert note.startswith("interrupted: its upload had begun, so busy/upload-stopped/1 may be ")
    assert (
        "Once no publish of it is running and busy/upload-stopped/1 is still not stored "
        "(`strongroom model ls busy/upload-stopped` lists it if so), nothing was stored: publish "
        "it again; if it is stored, keep it (publishing it again is refused MODEL_EXISTS): only "
        "to replace it with another model does an admin remove it: `strongroom model rm "
        "busy/upload-stopped 1`"
    ) in note
    assert _records(stack, "busy/upload-stopped") == [("busy/upload-stopped", "1")]
    _admin_rm(stack, "busy/upload-stopped", "1")


def test_an_interrupted_single_publish_command_prints_what_may_be_stored(
    stack: DevStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`strongroom model publish FILE` ended 130 on Ctrl-C, silent on the version it may have
    stored: it prints the publisher's note now, as a multi-part publish's. (The command's own
    channel to the store, with the interceptor that interrupts once the store has answered.)"""
    channel = Client.channel

    def interrupting(client: Client, service: str) -> grpc.Channel:
        opened = channel(client, service)
        if service != "modelstore":
            return opened
        return grpc.intercept_channel(opened, InterruptAfterUpload())

    monkeypatch.setattr(Client, "channel", interrupting)
    code, err = _publish_command(stack, capsys, [_model_file(tmp_path, 3000)], "busy/cli-single")
    assert code == 130
    assert "strongroom: interrupted: its upload had begun, so busy/cli-single/1 may be " in err
    assert "`strongroom model ls busy/cli-single` lists it if so), nothing was stored: " in err
    assert "admin remove it: `strongroom model rm busy/cli-single 1`" in err
    assert _records(stack, "busy/cli-single") == [("busy/cli-single", "1")]
    _admin_rm(stack, "busy/cli-single", "1")


class _Lost:
    """A finished call's status as ``_CallError`` reads it: ``code`` and ``details`` only."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()


class AnswerLostAt(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) reaches the real store, which stores it,
    and its answer is then lost: the call ends ``code`` for the publisher (a deadline passing, or
    the connection dropping, as the store commits)."""

    def __init__(self, at: int, code: grpc.StatusCode) -> None:
        self._at = at
        self._code = code
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        outcome = continuation(details, request_iterator)
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return outcome
        assert outcome.exception() is None  # stored
        return _Ended(_Lost(self._code, "Deadline Exceeded"))


def test_a_manifest_whose_answer_was_lost_to_an_outage_keeps_its_parts_and_says_so(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The manifest's upload reached the store, which stored it (the version published), and its
    answer was lost (DEADLINE_EXCEEDED as the store committed). The publisher said the version
    was not published, deleted its parts (a publisher that may delete broke the published model
    for every load: PartMissing), and where it could not, handed the admin the commands that
    would. Now an outage at the manifest deletes nothing and says the version may be published:
    its parts are its own if it is; the commands only for the case it is not, once no publish
    of it runs (the store may commit the manifest after its answer was lost: "if it is not
    stored" alone could hand out the removal of the parts of a version being committed)."""
    shards = _shards(tmp_path / "shards", 3)
    counted = CountCalls()
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"),
        AnswerLostAt(3, grpc.StatusCode.DEADLINE_EXCEEDED),
        counted,
    )
    with pytest.raises(DeadlineExceeded) as info:
        _publish(stack, publisher, shards, "busy/manifest-lost", store)
    assert "DeleteModel" not in counted.methods
    message = info.value.message
    assert message.startswith(
        "busy/manifest-lost/1 may be published: its manifest reached the store, whose answer was "
        "lost (DEADLINE_EXCEEDED: Deadline Exceeded)"
    ), message
    assert "was not published" not in message
    # The store may commit the manifest after the answer was lost: the parts' commands come
    # under the guard a part's and an interrupt's do ("if it is not stored" alone handed out the
    # removal of a version's parts while the store could still be committing it).
    assert message.endswith(
        "; if it is, its 3 part(s) (1+part.0, 1+part.1, 1+part.2) are its own: keep them. Once no "
        "publish of it is running and busy/manifest-lost/1 is still not stored (`strongroom model "
        "ls busy/manifest-lost` lists it if so), the version cannot be published again until an "
        "admin removes them (PARTS_LEFT_BEHIND until then): `strongroom model rm "
        "busy/manifest-lost 1+part.0`; `strongroom model rm busy/manifest-lost 1+part.1`; "
        "`strongroom model rm busy/manifest-lost 1+part.2`"
    ), message
    assert _records(stack, "busy/manifest-lost") == [
        ("busy/manifest-lost", "1"),
        ("busy/manifest-lost", "1+part.0"),
        ("busy/manifest-lost", "1+part.1"),
        ("busy/manifest-lost", "1+part.2"),
    ]
    admin = store_grpc.ModelStoreServiceStub(stack.channel(stack.identity("admin"), "modelstore"))
    for version in ("1", "1+part.0", "1+part.1", "1+part.2"):
        admin.DeleteModel(store_pb.DeleteModelRequest(name="busy/manifest-lost", version=version))


def test_a_part_whose_answer_was_lost_to_an_outage_is_named_as_maybe_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part's upload reached the store, which stored it, and its answer was lost
    (DEADLINE_EXCEEDED as the store committed). The error named only the first part (stored, and
    a publisher may not delete it): the second, stored too, blocked the version unnamed until the
    next publish's check found it. Now the note says it may be stored, in the one sentence that
    says what blocks the version, with one command form for both parts (a note each said it
    twice, each with its own commands)."""
    shards = _shards(tmp_path / "shards", 3)
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerLostAt(1, grpc.StatusCode.DEADLINE_EXCEEDED)
    )
    with pytest.raises(DeadlineExceeded) as info:
        _publish(stack, publisher, shards, "busy/part-lost", store)
    assert info.value.message == (
        "busy/part-lost/1 was not published (DEADLINE_EXCEEDED: Deadline Exceeded); 1 part(s) it "
        "stored could not be removed (a publisher may not delete): 1+part.0; the part 1+part.1 "
        "may be stored: its upload reached the store, whose answer was lost (stored by this "
        "publish, or by another of the version that stored it first). Once no publish of it is "
        "running and busy/part-lost/1 is still not stored (`strongroom model ls busy/part-lost` "
        "lists it if so), the version cannot be published again until an admin removes them "
        "(PARTS_LEFT_BEHIND until then): "
        "`strongroom model rm busy/part-lost 1+part.0`; `strongroom model rm busy/part-lost "
        "1+part.1` (a part that is not stored is NOT_FOUND: nothing to do)"
    )
    assert _records(stack, "busy/part-lost") == [
        ("busy/part-lost", "1+part.0"),
        ("busy/part-lost", "1+part.1"),
    ]
    for version in ("1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/part-lost", version)


class InterruptedDeletes(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Ctrl-C as the publisher's first DeleteModel waits (raised in the publishing thread, where
    Python delivers SIGINT); every other call goes through."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        if details.method.endswith("/DeleteModel"):
            raise KeyboardInterrupt
        return continuation(details, request)


def test_an_interrupt_of_the_deletes_names_the_part_whose_answer_was_lost(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part was stored and its answer lost (DEADLINE_EXCEEDED), and Ctrl-C came while
    the publisher deleted the first: the interrupt's note named the first part alone, the second
    blocking the version unnamed until the next publish's check found it. It is named too, under
    the same condition."""
    shards = _shards(tmp_path / "shards", 3)
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"),
        AnswerLostAt(1, grpc.StatusCode.DEADLINE_EXCEEDED),
        InterruptedDeletes(),
    )
    with pytest.raises(KeyboardInterrupt) as info:
        _publish(stack, publisher, shards, "busy/deletes-stopped", store)
    (note,) = info.value.__notes__
    assert note.startswith(
        "interrupted: busy/deletes-stopped/1 was not published; 2 part(s) whose upload had begun "
        "may be stored (1+part.0, 1+part.1; none was removed before the interrupt). Once no "
        "publish of it is running and busy/deletes-stopped/1 is still not "
        "stored (`strongroom model ls busy/deletes-stopped` lists it if so), "
    ), note
    assert "`strongroom model rm busy/deletes-stopped 1+part.1`" in note
    assert _records(stack, "busy/deletes-stopped") == [
        ("busy/deletes-stopped", "1+part.0"),
        ("busy/deletes-stopped", "1+part.1"),
    ]
    for version in ("1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/deletes-stopped", version)


class DeletesAsAdminUntil(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's deletes made as a caller that may delete: each goes to the real store over
    the admin's channel, until the one numbered ``at`` (from 0), where Ctrl-C comes (raised in
    the publishing thread); every other call goes through."""

    def __init__(self, admin: grpc.Channel, at: int) -> None:
        self._admin = store_grpc.ModelStoreServiceStub(admin)
        self._at = at
        self.deletes = 0

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        if not details.method.endswith("/DeleteModel"):
            return continuation(details, request)
        self.deletes += 1
        if self.deletes - 1 == self._at:
            raise KeyboardInterrupt
        return self._admin.DeleteModel.future(request, timeout=details.timeout)


def test_an_interrupt_of_the_deletes_says_which_parts_were_removed(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """A caller that may delete: the third part was stored and its answer lost, and Ctrl-C came
    as the second part's delete waited, the first's done. The note said "nothing was deleted",
    and named the first part, gone, with its command. It now says which were removed before the
    interrupt, and names only those that may be left."""
    shards = _shards(tmp_path / "shards", 3)
    deletes = DeletesAsAdminUntil(stack.channel(stack.identity("admin"), "modelstore"), 1)
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"),
        AnswerLostAt(2, grpc.StatusCode.DEADLINE_EXCEEDED),
        deletes,
    )
    with pytest.raises(KeyboardInterrupt) as info:
        _publish(stack, publisher, shards, "busy/deletes-half", store)
    assert deletes.deletes == 2
    (note,) = info.value.__notes__
    assert note.startswith(
        "interrupted: busy/deletes-half/1 was not published; 2 part(s) whose upload had begun "
        "may be stored (1+part.1, 1+part.2; removed before the interrupt: 1+part.0). Once no "
        "publish of it is running and busy/deletes-half/1 is still not stored "
    ), note
    assert "nothing was deleted" not in note
    assert "busy/deletes-half 1+part.0" not in note
    assert _records(stack, "busy/deletes-half") == [
        ("busy/deletes-half", "1+part.1"),
        ("busy/deletes-half", "1+part.2"),
    ]
    for version in ("1+part.1", "1+part.2"):
        _admin_rm(stack, "busy/deletes-half", version)


class DeleteDoneThenEnded(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's first delete reaches the real store (over the admin's channel), which
    removes the part; its answer is then lost as the ``ServerConnection``'s connection ends
    (``ConnectionEnded``). Every delete after it is counted and refused alike."""

    def __init__(self, admin: grpc.Channel) -> None:
        self._admin = store_grpc.ModelStoreServiceStub(admin)
        self.deletes = 0

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        if not details.method.endswith("/DeleteModel"):
            return continuation(details, request)
        self.deletes += 1
        if self.deletes == 1:
            self._admin.DeleteModel(request, timeout=details.timeout)
        return _Raising(ConnectionEnded("the connection to the store has ended"))


def test_a_delete_the_connection_ended_under_is_not_said_untried_and_its_command_is_guarded(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The third part could not reach the store (UNAVAILABLE); the first part's delete went,
    removed it, and its answer was lost as the connection ended. The note said "2 part(s) it
    stored were not removed (..., so no delete was tried)", and handed out the first part's rm
    unguarded, though the version was then free for another publish to store that part as its
    model's. It now says the first delete failed (it was tried), the second was not tried, and
    gives the commands under the once-no-publish guard, a part not stored being NOT_FOUND."""
    name = "busy/delete-ended"
    deletes = DeleteDoneThenEnded(stack.channel(stack.identity("admin"), "modelstore"))
    unreached = _CallError(_Lost(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), EndedBeforeSentAt(2, unreached), deletes
    )
    with pytest.raises(Unavailable) as info:
        _publish(stack, publisher, _shards(tmp_path / "shards", 3), name, store)
    assert deletes.deletes == 1  # none tried after the connection ended
    assert _records(stack, name) == [(name, "1+part.1")]  # the first delete did remove its part
    message = str(info.value)
    assert message.endswith(
        "1 part(s) it stored could not be removed (deleting them failed: UNAVAILABLE): "
        "1+part.0; 1 part(s) it stored were not removed (the connection to the store had ended, "
        f"so no delete was tried): 1+part.1. Once no publish of it is running and {name}/1 is "
        f"still not stored (`strongroom model ls {name}` lists it if so), the version cannot be "
        "published again until an admin removes them (PARTS_LEFT_BEHIND until then): "
        f"`strongroom model rm {name} 1+part.0`; `strongroom model rm {name} 1+part.1` (a part "
        "that is not stored is NOT_FOUND: nothing to do)"
    ), message
    _admin_rm(stack, name, "1+part.1")


class WinnerFirstAt(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) is read whole (its last byte handed over)
    while ``winner``, another publish of the same version, runs to its end; the call then ends
    UNAVAILABLE for the publisher, never reaching the store (had it, the store's refusal,
    MODEL_EXISTS, was the answer the outage lost)."""

    def __init__(self, at: int, winner: Callable[[], object]) -> None:
        self._at = at
        self._winner = winner
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return continuation(details, request_iterator)
        for _request in request_iterator:
            pass
        self._winner()
        return _Ended(_Lost(grpc.StatusCode.UNAVAILABLE, "connection reset"))


def test_a_part_that_may_be_another_publishs_is_removed_only_once_none_is_running(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """Two publishes of one version race: the winner stores its parts and its manifest while the
    loser's first part is sent whole, and the loser's call then ends in an outage. The loser
    named that part as may be stored with its `strongroom model rm` and no condition: an admin
    following it removed the winner's part, and every load of the published model failed
    PART_MISSING. The command now comes with the condition the check and the interrupt give:
    once no publish of the version is running and it is still not stored."""
    shards = _shards(tmp_path / "shards", 2)
    own = stack.channel(publisher, "modelstore")
    race = WinnerFirstAt(0, lambda: _publish(stack, publisher, shards, "busy/race", own))
    store = grpc.intercept_channel(stack.channel(publisher, "modelstore"), race)
    with pytest.raises(Unavailable) as info:
        _publish(stack, publisher, shards, "busy/race", store)
    message = info.value.message
    assert message.startswith(
        "busy/race/1 was not published (UNAVAILABLE: connection reset); the part 1+part.0 may be "
        "stored: its upload reached the store, whose answer was lost (stored by this publish, or "
        "by another of the version that stored it first). Once no publish of it is running and "
        "busy/race/1 is still not stored (`strongroom model ls busy/race` lists it if so), the "
        "version cannot be published again until an admin removes them (PARTS_LEFT_BEHIND until "
        "then): `strongroom model rm busy/race 1+part.0`"
    ), message
    # The winner's model, whole: the condition (busy/race/1 is stored) says to remove nothing.
    assert _records(stack, "busy/race") == [
        ("busy/race", "1"),
        ("busy/race", "1+part.0"),
        ("busy/race", "1+part.1"),
    ]
    for version in ("1", "1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/race", version)


class _Raising:
    """A finished call's outcome that raises ``error``, as a ``ServerConnection``'s does."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def exception(self, timeout: float | None = None) -> BaseException:
        return self._error


class ConnectionEndedAt(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) reaches the real store, which stores it;
    the call then ends for the publisher as one on a ``ServerConnection`` whose connection ended
    meanwhile: ``ConnectionEnded``, in place of gRPC's UNAVAILABLE."""

    def __init__(self, at: int) -> None:
        self._at = at
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        outcome = continuation(details, request_iterator)
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return outcome
        assert outcome.exception() is None  # stored
        return _Raising(ConnectionEnded("the connection to the store has ended"))


def test_a_lost_server_connection_is_an_answer_lost() -> None:
    """ConnectionEnded (a StrongroomError, so not read by its status) said nothing may be
    stored; its answer was lost with the connection, as an outage's."""
    assert publish.unanswered(ConnectionEnded("ended")) == publish.ANSWER_LOST


def test_an_upload_is_left_open_only_once_its_last_byte_went_and_until_it_is_answered() -> None:
    """The one rule every publisher's path asks (SentWhole.left_open): a part's, a manifest's
    and a single artifact's each checked the last byte on their own, and the manifest's check
    had once missed it."""
    lost = ConnectionEnded("ended")
    whole = SentWhole()
    assert whole.left_open(lost) is None  # no try yet
    sent = whole.next_try()
    assert whole.left_open(lost) is None  # its last byte not yet handed over
    sent()
    assert whole.left_open(lost) == publish.ANSWER_LOST
    assert whole.left_open(InvalidArgument("refused")) is None  # the store's word: nothing stored
    whole.answered()
    assert whole.left_open(lost) is None  # stored, its answer read: a later failure is another's
    sent()  # an answered try's late mark changes nothing
    assert whole.left_open(lost) is None


def test_a_part_whose_server_connection_ended_is_named_as_maybe_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part reached the store, which stored it, and the connection then ended
    (ConnectionEnded, a ServerConnection's channel): the error named only the first part, the
    second blocking the version unnamed. It is now named as may be stored, as after an outage.
    And the first is not deleted over the connection that ended (each delete failed there): the
    note says none was tried, and why."""
    shards = _shards(tmp_path / "shards", 3)
    counted = CountCalls()
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), ConnectionEndedAt(1), counted
    )
    with pytest.raises(ConnectionEnded) as info:
        _publish(stack, publisher, shards, "busy/part-ended", store)
    assert "DeleteModel" not in counted.methods
    assert info.value.message.endswith(
        "; 1 part(s) it stored were not removed (the connection to the store had ended, so no "
        "delete was tried): 1+part.0; the "
        "part 1+part.1 may be stored: its upload reached the store, whose answer was lost (stored "
        "by this publish, or by another of the version that stored it first). Once no publish "
        "of it is running and busy/part-ended/1 is still not stored (`strongroom model ls "
        "busy/part-ended` lists it if so), the version cannot be published again until an "
        "admin removes them (PARTS_LEFT_BEHIND until then): "
        "`strongroom model rm busy/part-ended 1+part.0`; `strongroom model rm busy/part-ended "
        "1+part.1` (a part that is not stored is NOT_FOUND: nothing to do)"
    ), info.value.message
    assert _records(stack, "busy/part-ended") == [
        ("busy/part-ended", "1+part.0"),
        ("busy/part-ended", "1+part.1"),
    ]
    for version in ("1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/part-ended", version)


def test_a_manifest_whose_server_connection_ended_keeps_its_parts(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The manifest reached the store, which stored it (the version published), and the
    connection then ended: the parts were deleted (or handed to an admin to remove), breaking the
    published model. Now nothing is deleted and the error says the version may be published."""
    shards = _shards(tmp_path / "shards", 2)
    counted = CountCalls()
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), ConnectionEndedAt(2), counted
    )
    with pytest.raises(ConnectionEnded) as info:
        _publish(stack, publisher, shards, "busy/manifest-ended", store)
    assert "DeleteModel" not in counted.methods
    assert (
        "; busy/manifest-ended/1 may be published: its manifest reached the store, whose answer "
        "was lost; if it is, its 2 part(s) (1+part.0, 1+part.1) are its own: keep them. Once no "
        "publish of it is running and busy/manifest-ended/1 is still not stored (`strongroom "
        "model ls busy/manifest-ended` lists it if so), the version cannot be published again "
    ) in info.value.message
    assert _records(stack, "busy/manifest-ended") == [
        ("busy/manifest-ended", "1"),
        ("busy/manifest-ended", "1+part.0"),
        ("busy/manifest-ended", "1+part.1"),
    ]
    for version in ("1", "1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/manifest-ended", version)


class EndedBeforeSentAt(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) ends with ``error`` before a byte of it is
    sent (its requests never read): a ``ServerConnection``'s call made once its connection had
    ended (``ConnectionEnded``), or a channel's that could not connect (UNAVAILABLE)."""

    def __init__(self, at: int, error: BaseException) -> None:
        self._at = at
        self._error = error
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return continuation(details, request_iterator)
        return _Raising(self._error)


@pytest.mark.parametrize(
    ("error", "raised", "deletes", "why"),
    [
        (
            ConnectionEnded("the connection to the store has ended"),
            ConnectionEnded,
            0,
            "were not removed (the connection to the store had ended, so no delete was tried)",
        ),
        (
            _CallError(_Lost(grpc.StatusCode.UNAVAILABLE, "failed to connect")),
            Unavailable,
            2,
            "could not be removed (a publisher may not delete)",
        ),
    ],
    ids=["connection-ended", "unavailable"],
)
def test_a_manifest_call_that_ended_before_its_last_byte_removes_the_parts(
    stack: DevStack,
    publisher: WorkloadIdentity,
    tmp_path: Path,
    error: BaseException,
    raised: type[Exception],
    deletes: int,
    why: str,
) -> None:
    """The manifest's call ended before any of it was sent (the ServerConnection's connection
    had ended as the last part was answered, or the store could not be reached): no store can
    have stored it, yet the publisher said the version may be published, "its manifest reached
    the store", and kept the parts it could have removed. Now, as after any failure, the version
    was not published and the parts it stored are removed or named with their commands (over a
    connection that ended, none is tried: each failed there)."""
    shards = _shards(tmp_path / "shards", 2)
    counted = CountCalls()
    name = f"busy/manifest-unsent-{raised.__name__.lower()}"
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), EndedBeforeSentAt(2, error), counted
    )
    with pytest.raises(raised) as info:
        _publish(stack, publisher, shards, name, store)
    assert counted.methods.count("DeleteModel") == deletes
    message = str(info.value)
    assert "may be published" not in message and "reached the store" not in message, message
    assert message.endswith(
        f"2 part(s) it stored {why}: 1+part.0, "
        f"1+part.1; the version cannot be published again until an admin removes them "
        f"(PARTS_LEFT_BEHIND until then): `strongroom model rm {name} 1+part.0`; "
        f"`strongroom model rm {name} 1+part.1`"
    ), message
    assert _records(stack, name) == [(name, "1+part.0"), (name, "1+part.1")]
    for version in ("1+part.0", "1+part.1"):
        _admin_rm(stack, name, version)


def test_a_manifest_refused_by_a_real_ended_server_connection_does_not_say_it_may_be_published(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """A real ServerConnection to the store, which stops once both parts are stored: the
    connection ends, and the manifest's call is refused at once (ConnectionEnded, not a byte
    sent). The publisher said the version may be published, its manifest having reached the
    store; now it says which parts it stored and did not remove, and their commands. Its deletes
    went over the ended connection, each refused there ("deleting them failed: UNAVAILABLE"):
    none is tried now, and the note says why."""
    shards = _shards(tmp_path / "shards", 2)
    connection = ServerConnection.of_identity(
        publisher,
        stack.address("modelstore"),
        server_name="modelstore",
        server_id=stack.spiffe_id("modelstore"),
    )
    probe = store_grpc.ModelStoreServiceStub(connection.channel)

    def ended() -> bool:
        try:
            probe.StatModel(store_pb.StatModelRequest(name="x", version="1"), timeout=1)
        except ConnectionEnded:
            return True
        except grpc.RpcError:
            pass
        return False

    stops = StopStoreBefore(stack, 2)
    counted = CountCalls()

    class Wait(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
        """The manifest's call (the store stopped) goes on once the connection has ended."""

        def intercept_stream_unary(
            self, continuation: Callable[..., Any], details: Any, request_iterator: Any
        ) -> Any:
            if stops.uploads == 3:
                assert settled(ended)
            return continuation(details, request_iterator)

    with connection, _store_restarted(stack), pytest.raises(ConnectionEnded) as info:
        _publish(
            stack,
            publisher,
            shards,
            "busy/manifest-refused",
            grpc.intercept_channel(connection.channel, stops, Wait(), counted),
        )
    assert "DeleteModel" not in counted.methods
    message = str(info.value)
    assert "may be published" not in message, message
    assert message.endswith(
        "2 part(s) it stored were not removed (the connection to the store had ended, so no "
        "delete was tried): 1+part.0, 1+part.1; the version cannot be published again until an admin removes them "
        "(PARTS_LEFT_BEHIND until then): `strongroom model rm busy/manifest-refused 1+part.0`; "
        "`strongroom model rm busy/manifest-refused 1+part.1`"
    ), message
    assert _records(stack, "busy/manifest-refused") == [
        ("busy/manifest-refused", "1+part.0"),
        ("busy/manifest-refused", "1+part.1"),
    ]
    for version in ("1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/manifest-refused", version)


def test_a_single_publish_whose_server_connection_ended_says_it_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """publish_model's whole artifact reached the store, which stored it, and the connection then
    ended: ConnectionEnded said nothing of the version, which the store held."""
    store = grpc.intercept_channel(stack.channel(publisher, "modelstore"), ConnectionEndedAt(0))
    with pytest.raises(ConnectionEnded) as info:
        _publish_one(
            stack, publisher, _model_file(tmp_path, 3000), "busy/single-ended", store=store
        )
    assert info.value.message.endswith(
        "; busy/single-ended/1 may be stored (`strongroom model ls busy/single-ended` lists it if "
        "so): its whole artifact was sent, and the store's answer was lost"
    ), info.value.message
    assert _records(stack, "busy/single-ended") == [("busy/single-ended", "1")]
    _admin_rm(stack, "busy/single-ended", "1")


class _Answered:
    """A finished call's outcome whose answer is ``response``."""

    def __init__(self, response: store_pb.PutModelResponse) -> None:
        self._response = response

    def result(self, timeout: float | None = None) -> store_pb.PutModelResponse:
        return self._response

    def exception(self, timeout: float | None = None) -> None:
        return None


class AnswerRewrittenAt(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) reaches the real store, which stores it
    and answers OK; the answer the publisher gets describes the artifact with ``change`` applied
    (a store answering about another artifact)."""

    def __init__(self, at: int, **change: object) -> None:
        self._at = at
        self._change = change
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        outcome = continuation(details, request_iterator)
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return outcome
        answer = store_pb.PutModelResponse()
        answer.CopyFrom(outcome.result())  # stored
        for field, value in self._change.items():
            setattr(answer.model, field, value)
        return _Answered(answer)


class RefusedWholeAt(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """The publisher's upload numbered ``at`` (from 0) is read whole (its last byte handed
    over), then refused ``FAILED_PRECONDITION`` without reaching the store: the store's word that
    it stored nothing."""

    def __init__(self, at: int) -> None:
        self._at = at
        self.uploads = 0

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        self.uploads += 1
        if self.uploads - 1 != self._at:
            return continuation(details, request_iterator)
        for _request in request_iterator:
            pass
        return _Ended(_Lost(grpc.StatusCode.FAILED_PRECONDITION, "refused"))


def test_a_part_whose_answer_describes_another_artifact_is_named_as_maybe_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part's upload reached the real store, which stored it and answered OK, but
    about another artifact (DATA_LOSS STORE_ANSWER_MISMATCH). The error named only the first part:
    the second, stored, blocked the version unnamed until the next publish's check found it. Now
    every failure after a part was sent whole that is no refusal of the store's takes the lost
    answer's path: the part is named as may be stored, with its command, and not deleted."""
    shards = _shards(tmp_path / "shards", 3)
    counted = CountCalls()
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerRewrittenAt(1, artifact_size=1), counted
    )
    with pytest.raises(DataLoss) as info:
        _publish(stack, publisher, shards, "busy/part-mismatch", store)
    assert info.value.reason == "STORE_ANSWER_MISMATCH"
    message = info.value.message
    assert message.startswith(
        "the model store answered that it recorded 'busy/part-mismatch' version '1+part.1' (1 "
        "bytes) for 'busy/part-mismatch' version '1+part.1' ("
    ), message
    assert message.endswith(
        "; 1 part(s) it stored could not be removed (a publisher may not delete): 1+part.0; the "
        "part 1+part.1 may be stored: its upload reached the store, whose answer did not describe "
        "it (stored by this publish, or by another of the version that stored it first). Once "
        "no publish of it is running and busy/part-mismatch/1 is still not stored (`strongroom "
        "model ls busy/part-mismatch` lists it if so), the version cannot be published again "
        "until an admin removes them "
        "(PARTS_LEFT_BEHIND until then): `strongroom model rm busy/part-mismatch 1+part.0`; "
        "`strongroom model rm busy/part-mismatch 1+part.1` (a part that is not stored is "
        "NOT_FOUND: nothing to do)"
    ), message
    assert counted.methods.count("DeleteModel") == 1  # the first part's only
    assert _records(stack, "busy/part-mismatch") == [
        ("busy/part-mismatch", "1+part.0"),
        ("busy/part-mismatch", "1+part.1"),
    ]
    for version in ("1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/part-mismatch", version)


def test_a_single_publish_answered_about_another_artifact_says_it_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """publish_model's upload reached the real store, which stored it and answered OK about
    another artifact (DATA_LOSS STORE_ANSWER_MISMATCH). The error said only what the store
    answered: not that the version may be stored, so the next publish's MODEL_EXISTS came
    unexplained. The one rule (publish.unanswered) a multi-part publish's part follows now says
    it, as a lost answer does."""
    model = _model_file(tmp_path, 5000)
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerRewrittenAt(0, artifact_size=1)
    )
    with pytest.raises(DataLoss) as info:
        _publish_one(stack, publisher, model, "busy/one-mismatch", store=store)
    assert info.value.reason == "STORE_ANSWER_MISMATCH"
    message = info.value.message
    assert message.startswith(
        "the model store answered that it recorded 'busy/one-mismatch' version '1' (1 bytes)"
    ), message
    assert message.endswith(
        "; busy/one-mismatch/1 may be stored (`strongroom model ls busy/one-mismatch` lists it if "
        "so): its whole artifact was sent, and the store's answer did not describe it"
    ), message
    assert _records(stack, "busy/one-mismatch") == [("busy/one-mismatch", "1")]
    _admin_rm(stack, "busy/one-mismatch", "1")


def test_an_upload_answered_about_another_artifact_says_it_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """upload_artifact, the same."""
    path = _artifact_file(tmp_path, "busy/upload-mismatch", 5000)
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerRewrittenAt(0, version="2")
    )
    with pytest.raises(DataLoss) as info:
        upload_artifact(path, store=store)
    assert info.value.reason == "STORE_ANSWER_MISMATCH"
    assert info.value.message.endswith(
        "; busy/upload-mismatch/1 may be stored (`strongroom model ls busy/upload-mismatch` lists "
        "it if so): its whole artifact was sent, and the store's answer did not describe it"
    ), info.value.message
    assert _records(stack, "busy/upload-mismatch") == [("busy/upload-mismatch", "1")]
    _admin_rm(stack, "busy/upload-mismatch", "1")


def test_a_manifest_answered_about_another_artifact_keeps_the_parts(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The manifest's upload reached the real store, which stored it (the version published)
    and answered OK about another artifact. The publisher took it for a failure like any other:
    it tried to delete the parts (a caller that may delete, deleted them) and handed an admin
    their rm commands with no word of the version: a published model whose every load failed
    for want of its parts. An answer that does not describe the manifest now leaves the version
    as a lost answer does: may be published, its parts its own, no delete tried."""
    shards = _shards(tmp_path / "shards", 2)
    counted = CountCalls()
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerRewrittenAt(2, artifact_size=1), counted
    )
    with pytest.raises(DataLoss) as info:
        _publish(stack, publisher, shards, "busy/manifest-mismatch", store)
    assert info.value.reason == "STORE_ANSWER_MISMATCH"
    message = info.value.message
    assert message.endswith(
        "; busy/manifest-mismatch/1 may be published: its manifest reached the store, whose "
        "answer did not describe it; if it is, its 2 part(s) (1+part.0, 1+part.1) are its own: "
        "keep them. Once no publish of it is running and busy/manifest-mismatch/1 is still not "
        "stored (`strongroom model ls busy/manifest-mismatch` lists it if so), the version cannot "
        "be published again until an admin removes them (PARTS_LEFT_BEHIND until then): "
        "`strongroom model rm "
        "busy/manifest-mismatch 1+part.0`; `strongroom model rm busy/manifest-mismatch 1+part.1`"
    ), message
    assert "DeleteModel" not in counted.methods
    assert _records(stack, "busy/manifest-mismatch") == [
        ("busy/manifest-mismatch", "1"),
        ("busy/manifest-mismatch", "1+part.0"),
        ("busy/manifest-mismatch", "1+part.1"),
    ]
    for version in ("1", "1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/manifest-mismatch", version)


def test_a_part_refused_after_its_last_byte_is_not_named_as_maybe_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The rule's other side: a refusal (no outage) after the second part's whole upload is the
    store's word that it stored nothing: PARTS_LEFT_BEHIND naming the first part alone."""
    shards = _shards(tmp_path / "shards", 3)
    refuses = RefusedWholeAt(1)
    with pytest.raises(FailedPrecondition) as info:
        _publish(stack, publisher, shards, "busy/part-refused", _store(stack, publisher, refuses))
    assert refuses.uploads == 2
    assert info.value.reason == "PARTS_LEFT_BEHIND"
    message = info.value.message
    assert message.startswith("busy/part-refused/1 was not published (FAILED_PRECONDITION: "), (
        message
    )
    assert "`strongroom model rm busy/part-refused 1+part.0`" in message
    assert "may be stored" not in message and "1+part.1" not in message
    assert _records(stack, "busy/part-refused") == [("busy/part-refused", "1+part.0")]
    _admin_rm(stack, "busy/part-refused", "1+part.0")


def test_a_part_refused_before_its_last_byte_is_not_named_as_maybe_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """An outage before a part's last byte was sent stores nothing of it: no "may be stored".
    The first part's reading is held until the publish has failed (its deadline passed): a
    timeout of 1e-6 s alone let gRPC hand over a small part whole before the deadline's timer
    fired, now and then, and the part was rightly named."""
    shards = _shards(tmp_path / "shards", 2)
    store = stack.channel(publisher, "modelstore")
    failed = threading.Event()
    try:
        with pytest.raises(DeadlineExceeded) as info:
            _publish(
                stack,
                publisher,
                shards,
                "busy/part-short",
                store,
                progress=lambda _done, _total: failed.wait(60),
                timeout=1.0,
            )
    finally:
        failed.set()
    assert info.value.message.startswith("busy/part-short/1 was not published (DEADLINE_EXCEEDED")
    assert "may be stored" not in info.value.message
    assert _records(stack, "busy/part-short") == []


class HeldAtItsEnd:
    """Wraps what makes a try's pieces or requests (``multipart._messages``,
    ``publish.encrypt_stream``, ``publish._artifact_messages``): the first call's iterator, once
    done, holds the thread reading it (gRPC's, feeding the call) inside that last next(), before
    ``put_model`` learns the try was sent whole, until :meth:`release`. No callback runs there,
    so the thread is held by the wrapping; everything else is real."""

    def __init__(self, real: Callable[..., Iterator[Any]]) -> None:
        self._real = real
        self.calls = 0
        self._reached = threading.Event()
        self._go = threading.Event()
        self._thread: list[threading.Thread] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self.calls += 1
        made = self._real(*args, **kwargs)
        return self._held(made) if self.calls == 1 else made

    def _held(self, made: Iterator[Any]) -> Iterator[Any]:
        yield from made
        self._thread.append(threading.current_thread())
        self._reached.set()
        self._go.wait(60)

    def reached(self) -> None:
        """Waits until the first call's thread is held in its last next()."""
        assert self._reached.wait(30), "the first try's last next() was never reached"

    def release(self) -> None:
        """Lets the held thread go on (its try then marked sent whole) and waits until it ended."""
        self.reached()
        self._go.set()
        self._thread[0].join(30)
        assert not self._thread[0].is_alive()


def _read_at_once(requests: Iterator[Any]) -> Iterator[Any]:
    """``requests``, every one read in the first next() made of this: by gRPC's feeding thread,
    which is then in the try's last next() however early the call ends."""
    yield from list(requests)


class WholeRefusedThenStopped(BusyBefore):
    """:class:`BusyBefore` whose refused uploads had handed gRPC every byte before the store's
    busy refusal came (gRPC sends while the store decides: a small part is all out); before the
    upload numbered ``stop_at`` (from 0) the store stops.

    With ``held``, a refused upload's requests are read by gRPC's feeding thread instead, all in
    its first next() (:func:`_read_at_once`), where ``held`` keeps it in the try's last next()
    past the refusal; it is let go on (:meth:`HeldAtItsEnd.release`) before the store stops, so
    after the retry's try had begun. The refused upload's answer reaches the publisher only once
    that thread is held: gRPC's thread may first run after the refusal came (a loaded machine),
    and the try's file, which the publisher closes once the answer reaches it, was then closed
    before a byte of it was read."""

    def __init__(
        self,
        stack: DevStack,
        publisher: WorkloadIdentity,
        refused: set[int],
        stop_at: int,
        held: HeldAtItsEnd | None = None,
    ) -> None:
        super().__init__(stack, publisher, refused)
        self._stop_at = stop_at
        self._held = held

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        if len(self.outcomes) == self._stop_at:
            if self._held is not None:
                self._held.release()
            self._stack.services.pop("modelstore").stop()
            return continuation(details, request_iterator)
        if len(self.outcomes) in self._refused:
            if self._held is not None:
                outcome = super().intercept_stream_unary(
                    continuation, details, _read_at_once(request_iterator)
                )
                self._held.reached()  # before put_model learns of the refusal (see above)
                return outcome
            request_iterator = iter(list(request_iterator))  # its last byte handed over
        return super().intercept_stream_unary(continuation, details, request_iterator)


def test_a_part_whose_busy_try_was_sent_whole_is_not_named_when_its_retry_stored_nothing(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The second part's first try went out whole and was refused busy (nothing stored); its
    retry then met the store stopped before a byte went out. Only the try that ended the publish
    says whether the part may be stored: the refused try's last byte must not name it."""
    shards = _shards(tmp_path / "shards", 3)
    uploads = WholeRefusedThenStopped(stack, publisher, refused={1}, stop_at=2)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        _publish(stack, publisher, shards, "busy/whole-refused", _store(stack, publisher, uploads))
    assert uploads.outcomes == [("OK", None), REFUSED]
    message = _assert_part_left_by_outage(info.value, stack, "busy/whole-refused", "UNAVAILABLE")
    assert "may be stored" not in message
    _admin_rm(stack, "busy/whole-refused", "1+part.0")


def _refused_try_marked_late(
    stack: DevStack,
    publisher: WorkloadIdentity,
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    maker: str,
    run: Callable[[grpc.Channel, BusyRetry], object],
) -> str:
    """``run`` (a publish or upload through the store channel and the retry it is given): its
    first try refused busy, its feeding thread held in the try's last next() (``maker`` of
    ``module`` wrapped by :class:`HeldAtItsEnd`) until the retry's try has begun, then let go:
    it hands over its last byte then. The store stops before the retry's upload, which ends
    UNAVAILABLE before its last byte. Returns the error's message."""
    held = HeldAtItsEnd(getattr(module, maker))
    monkeypatch.setattr(module, maker, held)
    uploads = WholeRefusedThenStopped(stack, publisher, refused={0}, stop_at=1, held=held)
    with _store_restarted(stack), pytest.raises(Unavailable) as info:
        run(_store(stack, publisher, uploads), BusyRetry(sleep=lambda _seconds: None))
    assert uploads.outcomes == [REFUSED]
    assert held.calls == 2  # the race was run, not missed: the late mark came in the retry
    assert info.value.reason == "UNAVAILABLE"
    return info.value.message


def test_a_refused_part_s_late_last_byte_does_not_name_the_part_its_retry_left_unsent(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tries of a part shared one "sent whole" mark, cleared at each try: the refused try's
    feeding thread, still in its last next() when the busy refusal ended the call, set it after
    the retry had cleared it, and the retry's outage before its last byte said `the part
    1+part.0 may be stored` of a part nothing of which was stored. Each try has its own now."""
    shards = _shards(tmp_path / "shards", 2)

    def run(store: grpc.Channel, retry: BusyRetry) -> object:
        return _publish(stack, publisher, shards, "busy/late-mark", store, retry=retry)

    message = _refused_try_marked_late(stack, publisher, monkeypatch, multipart, "_messages", run)
    assert message.startswith("busy/late-mark/1 was not published (UNAVAILABLE: "), message
    assert "may be stored" not in message
    assert _records(stack, "busy/late-mark") == []


def test_a_refused_single_publish_s_late_last_byte_does_not_say_its_retry_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_model, the same: the refused try's late mark said `may be stored ...: its whole
    artifact was sent` of a retry whose upload the store's outage ended before its last byte."""
    model = _model_file(tmp_path, 5000)

    def run(store: grpc.Channel, retry: BusyRetry) -> object:
        return _publish_one(stack, publisher, model, "busy/late-single", store=store, retry=retry)

    message = _refused_try_marked_late(
        stack, publisher, monkeypatch, publish, "encrypt_stream", run
    )
    assert message.startswith("busy/late-single/1 was not published (UNAVAILABLE: "), message
    assert _records(stack, "busy/late-single") == []


def test_a_refused_upload_s_late_last_byte_does_not_say_its_retry_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upload_artifact (`strongroom model upload`), the same."""
    path = _artifact_file(tmp_path, "busy/late-upload", 5000)

    def run(store: grpc.Channel, retry: BusyRetry) -> object:
        return upload_artifact(path, store=store, retry=retry)

    message = _refused_try_marked_late(
        stack, publisher, monkeypatch, publish, "_artifact_messages", run
    )
    assert message.startswith("busy/late-upload/1 was not uploaded (UNAVAILABLE: "), message
    assert _records(stack, "busy/late-upload") == []


class _RefusedTrysCall:
    """A progress callback whose first call (the first try's, from gRPC's thread feeding it) is
    held in flight until the retry calls it too, or until the retry waits for that call to
    return (:meth:`publish._ProgressGate.drain`, wrapped: the one thing a retry does while it
    waits); records every call's (thread, bytes done) as it returns, each call that began
    while another was running, and each wait that returned while a call was still running."""

    #: How long the released first call goes on running, unless the wait returns before. The
    #: verdict does not hang on it: a wait that returns at once finds the call running for any
    #: length, and one that waits finds it over for any length; only the test's time does.
    HELD_AFTER_RELEASE = 0.5

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.returned: list[tuple[threading.Thread, int]] = []
        self.overlapping: list[int] = []
        self.drained_running: list[int] = []
        self.first: threading.Thread | None = None
        self._running = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._drained = threading.Event()
        drain = publish._ProgressGate.drain

        def draining(gate: Any) -> None:
            self._release.set()
            drain(gate)
            with self._lock:
                if self._running:
                    self.drained_running.append(self._running)
            self._drained.set()

        monkeypatch.setattr(publish._ProgressGate, "drain", draining)

    def __call__(self, done: int, _total: int) -> None:
        me = threading.current_thread()
        with self._lock:
            if self._running:
                self.overlapping.append(done)
            self._running += 1
            held = self.first is None
            if held:
                self.first = me
            else:
                self._release.set()
        if held:
            assert self._release.wait(60), "the retry neither called progress nor waited"
            # Still running once the retry began to wait: a wait that did not (the gate only
            # closed) let the retry on with this call in flight.
            self._drained.wait(self.HELD_AFTER_RELEASE)
        with self._lock:
            self._running -= 1
            self.returned.append((me, done))


def _refused_try_s_progress(
    stack: DevStack,
    publisher: WorkloadIdentity,
    monkeypatch: pytest.MonkeyPatch,
    run: Callable[[grpc.Channel, BusyRetry, Callable[[int, int], None]], object],
) -> list[tuple[threading.Thread, int]]:
    """``run`` (a publish or upload through the store channel, the retry and the progress
    callback it is given): its first try refused busy while its feeding thread's first progress
    call is held in flight (:class:`_RefusedTrysCall`). Asserts that no call began while another
    ran, that the refused try's thread made no call once the retry had, and that each thread's
    calls never went back; returns the calls, (thread, bytes done), in the order they returned."""
    progress = _RefusedTrysCall(monkeypatch)
    uploads = BusyBefore(stack, publisher, refused={0})
    run(_store(stack, publisher, uploads), BusyRetry(sleep=lambda _seconds: None), progress)
    assert uploads.outcomes[0] == REFUSED
    calls = progress.returned
    assert progress.overlapping == []
    assert progress.drained_running == []  # the retry began only once the call had returned
    refused = progress.first
    assert refused is not None
    began = next(i for i, (thread, _done) in enumerate(calls) if thread is not refused)
    assert [done for thread, done in calls[began:] if thread is refused] == []
    for thread in {thread for thread, _done in calls}:
        done = [d for t, d in calls if t is thread]
        assert done == sorted(done), done
    return calls


def test_a_refused_part_s_progress_call_ends_before_its_retry_calls_progress(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first part's first try was refused busy while gRPC's thread feeding it was inside the
    caller's progress callback: the retry went on and called the callback too, while that call
    ran (a progress bar's update of the refused try's position landing after the retry's, so
    progress went back). A try's progress now ends with the try, and the next try begins only
    once a call of it still running has returned."""
    shards = _shards(tmp_path / "shards", 2)
    total = sum(p.stat().st_size for p in shards)

    def run(store: grpc.Channel, retry: BusyRetry, progress: Callable[[int, int], None]) -> object:
        return _publish(
            stack, publisher, shards, "busy/late-progress", store, retry=retry, progress=progress
        )

    calls = _refused_try_s_progress(stack, publisher, monkeypatch, run)
    assert calls[-1][1] == total
    for version in ("1", "1+part.0", "1+part.1"):
        _admin_rm(stack, "busy/late-progress", version)


def test_a_refused_single_publish_s_progress_call_ends_before_its_retry_calls_progress(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_model, the same."""
    model = _model_file(tmp_path, 5000)

    def run(store: grpc.Channel, retry: BusyRetry, progress: Callable[[int, int], None]) -> object:
        return _publish_one(
            stack,
            publisher,
            model,
            "busy/late-progress-single",
            store=store,
            retry=retry,
            progress=progress,
        )

    calls = _refused_try_s_progress(stack, publisher, monkeypatch, run)
    assert calls[-1][1] == 5000
    _admin_rm(stack, "busy/late-progress-single", "1")


def test_a_refused_upload_s_progress_call_ends_before_its_retry_calls_progress(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upload_artifact, the same."""
    path = _artifact_file(tmp_path, "busy/late-progress-upload", 5000)
    size = path.stat().st_size

    def run(store: grpc.Channel, retry: BusyRetry, progress: Callable[[int, int], None]) -> object:
        return upload_artifact(path, store=store, retry=retry, progress=progress)

    calls = _refused_try_s_progress(stack, publisher, monkeypatch, run)
    assert calls[-1][1] == size
    _admin_rm(stack, "busy/late-progress-upload", "1")


class _HeldSecondRead:
    """A file as ``publish._open_readable`` opens it, whose second ``read`` returns its bytes
    only once ``go`` is set (``reached`` set first): the thread reading (gRPC's, feeding the
    upload) is held with them in hand, before the progress call for them."""

    def __init__(self, real: BinaryIO, reached: threading.Event, go: threading.Event) -> None:
        self._real = real
        self._reached = reached
        self._go = go
        self._reads = 0
        self.thread: threading.Thread | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._real.read(size)
        self._reads += 1
        if self._reads == 2:
            self.thread = threading.current_thread()
            self._reached.set()
            assert self._go.wait(60)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _HeldSecondRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()


class RefusedOnceReached(BusyBefore):
    """:class:`BusyBefore` whose refused uploads' requests gRPC's feeding thread reads all in its
    first next() (:func:`_read_at_once`), and whose refusal the publisher sees only once
    ``reached`` is set."""

    def __init__(
        self,
        stack: DevStack,
        publisher: WorkloadIdentity,
        refused: set[int],
        reached: threading.Event,
    ) -> None:
        super().__init__(stack, publisher, refused)
        self._reached = reached

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        if len(self.outcomes) not in self._refused:
            return super().intercept_stream_unary(continuation, details, request_iterator)
        outcome = super().intercept_stream_unary(
            continuation, details, _read_at_once(request_iterator)
        )
        assert self._reached.wait(30)
        return outcome


def test_a_refused_upload_s_feeding_thread_calls_no_progress_once_the_upload_ended(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's only try was refused busy (no retry allowed) while gRPC's thread feeding it
    held its second message's bytes, read before the refusal; let go on once the upload had
    failed, it called the caller's progress with them: a report of a try long over, after the
    call that made it had returned. A try's progress ends when the try does."""
    path = _artifact_file(tmp_path, "busy/progress-after", publish.UPLOAD_MESSAGE_BYTES)
    reached = threading.Event()
    go = threading.Event()
    opened: list[Any] = []
    real = publish._open_readable

    def open_readable(file: Path) -> Any:
        if len(opened) + 1 != 2:  # the check's own handle first, then the try's
            opened.append(real(file))
            return opened[-1]
        opened.append(_HeldSecondRead(real(file), reached, go))
        return opened[-1]

    monkeypatch.setattr(publish, "_open_readable", open_readable)
    calls: list[int] = []
    uploads = RefusedOnceReached(stack, publisher, {0}, reached)
    try:
        with pytest.raises(grpc.RpcError):
            upload_artifact(
                path,
                store=_store(stack, publisher, uploads),
                retry=NO_RETRY,
                progress=lambda done, _total: calls.append(done),
            )
    finally:
        made = list(calls)
        go.set()
    assert uploads.outcomes == [REFUSED]
    held = opened[1]
    assert isinstance(held, _HeldSecondRead) and held.thread is not None
    held.thread.join(30)
    assert not held.thread.is_alive()
    assert calls == made == [publish.UPLOAD_MESSAGE_BYTES]
    assert _records(stack, "busy/progress-after") == []


def test_a_fetch_out_of_time_is_the_publisher_s_class_of_outage(stack: DevStack) -> None:
    """One table (remote.TRANSIENT) for every client: the fetch library made a store's call out
    of time Unavailable, the publisher DeadlineExceeded. A real GetModel whose deadline passes:
    its 1 µs has passed before the call is sent, but gRPC's timer may fire after the store's
    answer (NOT_FOUND: no such model) has come back, about one run in 60 under load; such a run
    says nothing of the deadline's class and is made again."""
    download = grpc_source(stack.channel(stack.identity("inference"), "modelstore"), timeout=1e-6)
    for _ in range(20):
        try:
            b"".join(download("busy/fetch-late", "1"))
        except NotFound:
            continue  # the store answered before the deadline's timer fired
        except DeadlineExceeded as exc:
            assert exc.reason == "FETCH_UNAVAILABLE"
            assert "(DEADLINE_EXCEEDED)" in exc.message
            return
        pytest.fail("a download of a model the store does not hold succeeded")
    pytest.fail("no call out of 20 met its deadline before the store's answer")


def test_a_single_publish_whose_answer_was_lost_says_it_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """The whole artifact reached the store, which stored it, and its answer was lost
    (DEADLINE_EXCEEDED as the store committed): the outage said 'was not published', and the
    publisher's next try was refused MODEL_EXISTS, unexplained. Now it says it may be stored."""
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(3000))
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerLostAt(0, grpc.StatusCode.DEADLINE_EXCEEDED)
    )
    with pytest.raises(DeadlineExceeded) as info:
        publish_model(
            model,
            name="busy/single-lost",
            version="1",
            key_id=KEY_ID,
            broker=stack.channel(publisher, "keybroker"),
            store=store,
        )
    assert info.value.message == (
        "busy/single-lost/1 may be stored (`strongroom model ls busy/single-lost` lists it if "
        "so): its whole artifact was sent, and the store's answer was lost (DEADLINE_EXCEEDED: "
        "Deadline Exceeded)"
    )
    assert _records(stack, "busy/single-lost") == [("busy/single-lost", "1")]
    _admin_rm(stack, "busy/single-lost", "1")


def test_an_upload_whose_answer_was_lost_says_it_may_be_stored(
    stack: DevStack, publisher: WorkloadIdentity, tmp_path: Path
) -> None:
    """`strongroom model upload` the same: 'was not uploaded' of a stored artifact."""
    path = tmp_path / "model.artifact"
    path.write_bytes(make_artifact("busy/upload-lost", "1", os.urandom(5000)))
    store = grpc.intercept_channel(
        stack.channel(publisher, "modelstore"), AnswerLostAt(0, grpc.StatusCode.UNAVAILABLE)
    )
    with pytest.raises(Unavailable) as info:
        upload_artifact(path, store=store)
    assert info.value.message.startswith(
        "busy/upload-lost/1 may be stored (`strongroom model ls busy/upload-lost` lists it if "
        "so): its whole artifact was sent, and the store's answer was lost (UNAVAILABLE: "
    )
    assert _records(stack, "busy/upload-lost") == [("busy/upload-lost", "1")]
    _admin_rm(stack, "busy/upload-lost", "1")
