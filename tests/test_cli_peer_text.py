"""What the command line takes from a server it cannot trust: text it prints, bytes it reads."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import InvalidArtifact
from strongroom.cli._text import printable
from strongroom.client.rewrap import MAX_HEAD_SIZE, _read_head


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("acme/model", "acme/model"),
        ("été", "été"),
        ("a\x1b]0;owned\x07b", "a\\x1b]0;owned\\x07b"),  # an OSC title sequence
        ("x\x1b[2J", "x\\x1b[2J"),  # clear screen
        ("col\tcol\nrow", "col\\tcol\\nrow"),  # forged columns and lines
        ("\u202eevil", "\\u202eevil"),  # right-to-left override
    ],
)
def test_printable_escapes_what_would_drive_a_terminal(text: str, shown: str) -> None:
    assert printable(text) == shown


class _Generous(pb_grpc.ModelStoreServiceServicer):
    """A model store that answers a range read with far more than was asked."""

    def GetModel(
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetModelResponse]:
        for _ in range(64):
            yield pb.GetModelResponse(data=bytes(request.length))


def test_a_rewrap_stops_reading_a_store_that_sends_more_than_asked() -> None:
    """The artifact head was joined from everything the store streamed: a store could grow the
    operator's memory without bound."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ModelStoreServiceServicer_to_server(_Generous(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            model = pb.ModelInfo(name="m", version="1", artifact_size=10 * MAX_HEAD_SIZE)
            with pytest.raises(InvalidArtifact, match="more than the"):
                _read_head(pb_grpc.ModelStoreServiceStub(channel), model, timeout=10)
    finally:
        server.stop(None)
