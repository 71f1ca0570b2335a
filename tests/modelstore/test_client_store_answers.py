"""The client library against a model store whose answers are wrong (a real gRPC server,
misbehaving on purpose).

`strongroom model ls` and key rotation's listing followed ``next_page_token`` as long as the store
handed one out: a store that repeated a token kept them going for ever (the rotation's walk
stopped after a million pages). A publish reported whatever the store answered it recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import parse_header
from strongroom.client.fetch import ModelFetcher
from strongroom.client.keyrelease import ReleasedDataKey
from strongroom.client.listing import iter_models
from strongroom.client.publish import publish_model
from strongroom.errors import DataLoss, FailedPrecondition
from strongroom.modelstore.service import add_to_server


class _PagingStore(pb_grpc.ModelStoreServiceServicer):
    """Hands out ``pages`` pages of one model each; ``token_for(n)`` names the n-th next page."""

    def __init__(self, pages: int, token_for: Callable[[int], str]) -> None:
        self.pages = pages
        self.token_for = token_for
        self.calls = 0

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        self.calls += 1
        token = self.token_for(self.calls) if self.calls < self.pages else ""
        model = pb.ModelInfo(name=f"m{self.calls}", version="1")
        return pb.ListModelsResponse(models=[model], next_page_token=token)


@pytest.fixture
def serve() -> Iterator[Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel]]:
    servers: list[grpc.Server] = []

    def start(store: pb_grpc.ModelStoreServiceServicer) -> grpc.Channel:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        # As the store registers itself: GetModel's messages go out as the servicer made them.
        add_to_server(store, server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return grpc.insecure_channel(f"127.0.0.1:{port}")

    yield start
    for server in servers:
        server.stop(None)


def test_every_page_is_walked(
    serve: Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel],
) -> None:
    store = _PagingStore(5, lambda n: f"after-{n}")  # type: ignore[abstract]  # only ListModels
    names = [m.name for m in iter_models(pb_grpc.ModelStoreServiceStub(serve(store)), timeout=10)]
    assert names == ["m1", "m2", "m3", "m4", "m5"]


def test_a_repeated_page_token_stops_the_walk(
    serve: Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel],
) -> None:
    store = _PagingStore(10**9, lambda n: "same-token")  # type: ignore[abstract]  # only ListModels
    with pytest.raises(FailedPrecondition) as info:
        list(iter_models(pb_grpc.ModelStoreServiceStub(serve(store)), timeout=10))
    assert info.value.reason == "STORE_LISTING_LOOPS"
    assert store.calls == 2


def test_a_token_cycle_stops_the_walk(
    serve: Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel],
) -> None:
    store = _PagingStore(10**9, lambda n: f"t{n % 3}")  # type: ignore[abstract]  # only ListModels
    with pytest.raises(FailedPrecondition, match="does not advance"):
        list(iter_models(pb_grpc.ModelStoreServiceStub(serve(store)), timeout=10))
    assert store.calls == 4


def test_a_listing_without_end_stops_at_the_page_cap(
    serve: Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel],
) -> None:
    store = _PagingStore(10**9, lambda n: f"fresh-{n}")  # type: ignore[abstract]  # only ListModels
    with pytest.raises(FailedPrecondition, match="within 50 pages"):
        list(iter_models(pb_grpc.ModelStoreServiceStub(serve(store)), timeout=10, max_pages=50))
    assert store.calls == 50


def test_key_rotation_stops_on_a_looping_store(
    serve: Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel],
) -> None:
    """Rotation's listing (``models_needing``) walked up to a million pages of a repeated token;
    the store here gives up after 200 calls, so the old walk fails on its error instead."""
    from strongroom.client.rewrap import models_needing

    class _GivingUp(_PagingStore):
        def ListModels(
            self, request: pb.ListModelsRequest, context: grpc.ServicerContext
        ) -> pb.ListModelsResponse:
            if self.calls >= 200:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "called in a loop")
            return super().ListModels(request, context)

    store = _GivingUp(10**9, lambda n: "same-token")  # type: ignore[abstract]  # only ListModels
    with pytest.raises(FailedPrecondition) as info:
        models_needing("model-key", 0, store=serve(store))
    assert info.value.reason == "STORE_LISTING_LOOPS"


class _MalformedDownload(pb_grpc.ModelStoreServiceServicer):
    """Streams one GetModel message that is not protobuf: a length running past its end."""

    def GetModel(  # type: ignore[override]  # serialised messages, as the store sends them
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        yield b"\x1a\xff\x01artifact bytes"


def test_a_malformed_download_message_is_data_loss(
    serve: Callable[[pb_grpc.ModelStoreServiceServicer], grpc.Channel],
) -> None:
    """The fetch's decoder raised inside gRPC, which made it INTERNAL 'Exception deserializing
    response!' and the library a FAILED_PRECONDITION FETCH_REFUSED (the inference service's load
    too): neither said that the store sent a broken message. Now it is DATA_LOSS, as a part
    streamed short or long is, and no key is asked for."""

    def release(key_id: str, key_version: int, wrapped: bytes) -> ReleasedDataKey:
        raise AssertionError("no key may be released for a broken download")

    channel = serve(_MalformedDownload())  # type: ignore[abstract]  # only GetModel
    with pytest.raises(DataLoss) as info:
        ModelFetcher(channel, release).fetch("acme/m", "1")
    assert info.value.reason == "STORE_MESSAGE_MALFORMED"
    assert "acme/m/1" in info.value.message


class _Broker(kb_grpc.KeyBrokerServiceServicer):
    generated = 0

    def GenerateDataKey(
        self, request: kb_pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> kb_pb.GenerateDataKeyResponse:
        _Broker.generated += 1
        return kb_pb.GenerateDataKeyResponse(
            data_key=os.urandom(32),
            wrapped_data_key=os.urandom(40),
            key_version=1,
            mechanism=kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD,
            bound_model_name=request.model_name,
            bound_model_version=request.model_version,
        )


class _Store(pb_grpc.ModelStoreServiceServicer):
    """Reads the whole upload, then answers with ``change`` applied to the true ModelInfo."""

    def __init__(self, change: dict[str, object]) -> None:
        self.change = change

    def PutModel(
        self, requests: Iterator[pb.PutModelRequest], context: grpc.ServicerContext
    ) -> pb.PutModelResponse:
        artifact = b"".join(r.data for r in requests)
        header = parse_header(artifact[: 64 * 1024])
        model = pb.ModelInfo(
            name=header.model_name, version=header.model_version, artifact_size=len(artifact)
        )
        for field, value in self.change.items():
            setattr(model, field, value)
        return pb.PutModelResponse(model=model)


@pytest.fixture
def publish(tmp_path: Path) -> Iterator[Callable[[dict[str, object]], object]]:
    servers: list[grpc.Server] = []
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(300_000))

    def run(change: dict[str, object]) -> object:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kb_grpc.add_KeyBrokerServiceServicer_to_server(_Broker(), server)  # type: ignore[abstract]
        pb_grpc.add_ModelStoreServiceServicer_to_server(_Store(change), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return publish_model(
            model, name="fraud", version="3", key_id="k", broker=channel, store=channel
        )

    yield run
    for server in servers:
        server.stop(None)


def test_a_truthful_answer_is_reported(publish: Callable[[dict[str, object]], object]) -> None:
    published = publish({})
    assert published.model.name == "fraud" and published.model.version == "3"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change",
    [{"name": "other"}, {"version": "2"}, {"artifact_size": 1}, {"name": "\x1b[2Kok"}],
    ids=["name", "version", "size", "escape"],
)
def test_an_answer_about_something_else_fails_the_publish(
    publish: Callable[[dict[str, object]], object], change: dict[str, object]
) -> None:
    with pytest.raises(DataLoss) as info:
        publish(change)
    assert info.value.reason == "STORE_ANSWER_MISMATCH"
    assert "\x1b" not in info.value.message  # the store's text is quoted, not replayed


def test_an_unreadable_file_asks_the_broker_for_no_key(tmp_path: Path) -> None:
    """publish_model asked the broker for a data key (an audited broker decision) before it found
    that the model file could not be read."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    kb_grpc.add_KeyBrokerServiceServicer_to_server(_Broker(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    before = _Broker.generated
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(FailedPrecondition) as info:
            publish_model(
                tmp_path / "missing.onnx",
                name="fraud",
                version="3",
                key_id="k",
                broker=channel,
                store=channel,
            )
    finally:
        server.stop(None)
    assert info.value.reason == "MODEL_FILE_UNREADABLE"
    assert _Broker.generated == before


class _RotatingStore(pb_grpc.ModelStoreServiceServicer):
    """One stored model of ``size`` bytes (its head real); records ReplaceKeySlot's deadline."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head = head
        self.info = pb.ModelInfo(
            name="big", version="1", key_id="k", key_version=1, artifact_size=size
        )
        self.deadlines: list[float] = []

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.info])

    def GetModel(
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetModelResponse]:
        yield pb.GetModelResponse(model=self.info, data=self.head[: request.length])

    def ReplaceKeySlot(
        self, request: pb.ReplaceKeySlotRequest, context: grpc.ServicerContext
    ) -> pb.ReplaceKeySlotResponse:
        remaining = context.time_remaining()
        assert remaining is not None
        self.deadlines.append(remaining)
        return pb.ReplaceKeySlotResponse(model=self.info, replaced=True)


class _RewrappingBroker(kb_grpc.KeyBrokerServiceServicer):
    def ReWrap(
        self, request: kb_pb.ReWrapRequest, context: grpc.ServicerContext
    ) -> kb_pb.ReWrapResponse:
        return kb_pb.ReWrapResponse(wrapped_data_key=os.urandom(40), key_version=2)


@pytest.mark.parametrize("gib", [1, 64])
def test_a_key_slot_replacement_gets_time_for_the_artifacts_copy(tmp_path: Path, gib: int) -> None:
    """ReplaceKeySlot rewrites the whole artifact, and it had the run's one 60 s deadline: the
    rotation of a model above a few GB failed (reported ``failed``) while the store went on to
    finish the copy. Its deadline now grows with the artifact's size."""
    from strongroom.artifact import WrapMechanism, encrypt_stream
    from strongroom.client.rewrap import REPLACE_MIN_BYTES_PER_SECOND, rewrap_models

    plain = tmp_path / "m.onnx"
    plain.write_bytes(b"m" * 1000)
    with plain.open("rb") as source:
        head = b"".join(
            encrypt_stream(
                source,
                bytearray(32),
                model_name="big",
                model_version="1",
                content_type="application/vnd.onnx",
                key_id="k",
                key_version=1,
                wrapped_dek=os.urandom(40),
                wrap_mechanism=WrapMechanism.AES_KEY_WRAP_PAD,
                block_size=1024,
            )
        )
    size = gib << 30
    store = _RotatingStore(head, size)  # type: ignore[abstract]  # no PutModel etc.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ModelStoreServiceServicer_to_server(store, server)  # type: ignore[abstract]
    kb_grpc.add_KeyBrokerServiceServicer_to_server(_RewrappingBroker(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        results = list(
            rewrap_models("k", current_version=2, broker=channel, store=channel, timeout=60)
        )
    finally:
        server.stop(None)
    assert [r.outcome for r in results] == ["rewrapped"]
    (deadline,) = store.deadlines
    # A configured allowance, not a measured time: 60 s plus the copy at the slowest rate allowed.
    assert deadline > 60 + 0.9 * size / REPLACE_MIN_BYTES_PER_SECOND
